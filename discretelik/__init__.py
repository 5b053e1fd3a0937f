"""discretelik: pluggable likelihood heads and autoregressive backbones for discrete data.

```python
from discretelik import DiscretizedLogisticMixture, build
model = build("pixelcnn++", "dlm", preset="tiny")
```
"""

from .backbones import Backbone, Conditioning
from .heads import DiscreteImageDistribution, Head
from .metrics import bits_per_dim
from .model import AutoregressiveModel, build
from .registry import (
    backbone_config,
    backbone_presets,
    create_backbone,
    create_head,
    get_backbone,
    get_head,
    list_backbones,
    list_heads,
    register_backbone,
    register_head,
)
from .sampling import sample_raster

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveModel",
    "Backbone",
    "Conditioning",
    "DiscreteImageDistribution",
    "Head",
    "backbone_config",
    "backbone_presets",
    "bits_per_dim",
    "build",
    "create_backbone",
    "create_head",
    "get_backbone",
    "get_head",
    "list_backbones",
    "list_heads",
    "register_backbone",
    "register_head",
    "sample_raster",
]
