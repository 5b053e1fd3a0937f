"""discretelik: pluggable likelihood heads and autoregressive backbones for discrete data.

```python
from discretelik import DiscretizedLogisticMixture, build
model = build("pixelcnn++", "dlm", preset="tiny")
```
"""

from .backbones import Backbone, Conditioning
from .backbones.gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from .backbones.gated_pixelcnn_cache import GatedPixelCNNCache
from .backbones.pixelcnn import PixelCNN, PixelCNNConfig
from .backbones.pixelcnn_pp import PixelCNNPP, PixelCNNPPConfig
from .backbones.pixelcnn_pp_cache import PixelCNNPPCache
from .backbones.pixelrnn import (
    DiagonalBiLSTMBackbone,
    DiagonalBiLSTMConfig,
    RowLSTMBackbone,
    RowLSTMConfig,
)
from .backbones.sampling_cache import SamplingCache
from .heads import DiscreteImageDistribution, Head
from .heads.backend import LogProbBackend
from .heads.gaussian import DiscretizedGaussian, DiscretizedGaussianDistribution
from .heads.logistic import DiscretizedLogisticMixture, DiscretizedLogisticMixtureDistribution
from .heads.mixture.distribution import LocationScaleMixtureDistribution
from .heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution
from .metrics import bits_per_dim
from .model import AutoregressiveModel, build
from .pretrained import load_port_pixelcnn_pp, port_pixelcnn_pp_shapes
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
    # heads and their distributions
    "DiscretizedLogisticMixture",
    "DiscretizedLogisticMixtureDistribution",
    "DiscreteSoftmax",
    "DiscreteSoftmaxDistribution",
    "DiscretizedGaussian",
    "DiscretizedGaussianDistribution",
    "Head",
    "DiscreteImageDistribution",
    "LogProbBackend",
    "LocationScaleMixtureDistribution",
    # backbones and their configs
    "PixelCNN",
    "PixelCNNConfig",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "PixelCNNPP",
    "PixelCNNPPConfig",
    "RowLSTMBackbone",
    "RowLSTMConfig",
    "DiagonalBiLSTMBackbone",
    "DiagonalBiLSTMConfig",
    "Backbone",
    "Conditioning",
    # composition, sampling, metrics, registry
    "AutoregressiveModel",
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
    "load_port_pixelcnn_pp",
    "port_pixelcnn_pp_shapes",
    "register_backbone",
    "register_head",
    "sample_raster",
    "SamplingCache",
    "GatedPixelCNNCache",
    "PixelCNNPPCache",
]
