"""Registry of model families: a name in the config -> the mixer block that the stack repeats.

A family registers the class of its sequence mixer. The language model (`models.lm`) builds
`n_layer` residual blocks around it, so a new family only writes its mixer. A mixer class must
provide:
  - `__init__(config, layer_idx)` and `forward(hidden (batch, L, d_model), state=None)`;
  - `allocate_state(batch, device, dtype)` and `step(hidden (batch, d_model), state)` for O(1) decoding;
  - a classmethod `validate(config, prefix)` raising ConfigError for impossible shapes;
  - `forward_flops_per_token()` (for MFU) and `external_parameters()`: child-module weights that
    forward reads directly, which ZeRO-3 must gather with the mixer.
"""
from __future__ import annotations

from typing import Callable

FAMILIES: dict[str, type] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: make a mixer available as `model.family: <name>`."""

    def add(cls: type) -> type:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        FAMILIES[name] = cls
        return cls

    return add
