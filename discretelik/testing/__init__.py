"""Reusable checks for heads and backbones, for our tests and for plugin authors.

```python
from discretelik.testing import check_causality
check_causality(my_backbone, (3, 8, 8))
```
"""

from .causality import check_causality, dependency_map, receptive_field

__all__ = ["check_causality", "dependency_map", "receptive_field"]
