"""QuadraNet: quadratic-neuron vision backbones, timm-compatible.

Importing the package registers every model with timm, so
`timm.create_model("quadranet36_t")` works after `import quadranet`.
"""

from quadranet import models  # noqa: F401  (registers the models with timm)
from quadranet.blocks import reparameterize
from quadranet.hub import save_for_hf
from quadranet.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "reparameterize", "save_for_hf", "__version__"]
