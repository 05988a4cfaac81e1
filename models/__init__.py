"""Language models built from registered sequence-mixer families (Mamba first)."""
from . import mamba  # noqa: F401  (registers the "mamba" family)
from . import mamba2  # noqa: F401  (registers the "mamba2" mixer, 2)
from . import attention  # noqa: F401  (registers the "attention" mixer, *)
from . import mlp  # noqa: F401  (registers the "mlp" mixer, -)
from . import gss  # noqa: F401  (registers the "gss" mixer, G)
from .config import ModelConfig
from ssmforge.errors import CheckpointError, ConfigError, DataError, SsmforgeError
from .generation import generate, sample_next
from .hf import load_pretrained, save_pretrained
from .lm import InferenceState, LanguageModel
from .registry import FAMILIES, MIXERS, SYMBOLS, register_mixer

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InferenceState",
    "LanguageModel",
    "ModelConfig",
    "SsmforgeError",
    "generate",
    "load_pretrained",
    "MIXERS",
    "SYMBOLS",
    "register_mixer",
    "sample_next",
    "save_pretrained",
]
