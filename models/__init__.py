"""Language models built from registered sequence mixers (Mamba, Mamba-2, GSS, attention, MLP).

Importing this package is cheap and torch-free: `ssmforge.models.config` (the run config's model section)
loads without torch, and the public names below are imported from their submodules on first use (PEP 562).
"""
from __future__ import annotations

from ssmforge import refuse_bare_import

refuse_bare_import(__name__)

import importlib

from ssmforge.errors import CheckpointError, ConfigError, DataError, SsmforgeError

# public name -> the submodule that defines it; names of the mixer modules' registry (MIXERS) come
# through models.lm, which imports every mixer
_LAZY = {
    "AttentionConfig": "config",
    "GSSConfig": "config",
    "MLPConfig": "config",
    "Mamba2Config": "config",
    "MambaConfig": "config",
    "ModelConfig": "config",
    "RENAMED_MODEL_KEYS": "config",
    "FAMILIES": "registry",
    "SECTIONS": "registry",
    "SYMBOLS": "registry",
    "mixer_config": "registry",
    "register_mixer": "registry",
    "MIXERS": "lm",
    "InferenceState": "lm",
    "LanguageModel": "lm",
    "generate": "generation",
    "sample_next": "generation",
    "load_pretrained": "hf",
    "save_pretrained": "hf",
}

__all__ = sorted([*_LAZY, "CheckpointError", "ConfigError", "DataError", "SsmforgeError"])


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
