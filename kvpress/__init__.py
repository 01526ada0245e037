"""kvpress: KV-cache compression and sparse attention for Hugging Face transformers.

    import kvpress
    kvpress.patch(model, "duo", config="duo.safetensors")
    model.generate(...)
    kvpress.unpatch(model)
"""

from .adapters import FAMILIES, ModelShape
from .api import make_cache, patch, unpatch
from .cache import kv_cache_bytes
from .methods import METHODS, DuoConfig

__all__ = ["FAMILIES", "METHODS", "DuoConfig", "ModelShape", "kv_cache_bytes", "make_cache", "patch", "unpatch"]
__version__ = "0.2.0.dev0"
