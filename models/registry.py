"""Registry of sequence mixers and model families.

A model is a stack of pre-norm residual blocks; each block wraps one *mixer*. A mixer registers
under a name and a one-character symbol, so a stack is described by a layer pattern string
(Megatron-style): `M` Mamba, `2` Mamba-2, `G` GSS, `*` causal self-attention, `-` SwiGLU MLP.
A *family* is a named default pattern unit repeated `n_layer` times (`mamba` -> "M",
`transformer` -> "*-"); the `hybrid` family takes `model.layer_pattern` verbatim.

A mixer class must provide:
  - `__init__(config, layer_idx)` and `forward(hidden (batch, L, d_model), state=None)`;
    with a freshly allocated `state`, forward also fills it so decoding can continue;
  - `allocate_state(batch, device, dtype)` (None when stateless) and
    `step(hidden (batch, d_model), state)` for decoding one token;
  - a classmethod `validate(config, prefix)` raising ConfigError for impossible shapes;
  - `forward_flops_per_token(seq_len)` (for MFU; attention depends on the context length) and
    `external_parameters()`: child-module weights that forward reads directly, which ZeRO-3 must
    gather with the mixer.
"""
from __future__ import annotations

from typing import Callable

MIXERS: dict[str, type] = {}  # mixer name -> class
SYMBOLS: dict[str, str] = {}  # layer-pattern character -> mixer name

# family -> the pattern unit repeated n_layer times (None: the config's layer_pattern is the stack)
FAMILIES: dict[str, str | None] = {
    "mamba": "M",
    "mamba2": "2",
    "gss": "G",
    "transformer": "*-",
    "hybrid": None,
}


def register_mixer(name: str, symbol: str) -> Callable[[type], type]:
    """Class decorator: make a mixer available under `name` and as `symbol` in layer patterns."""

    def add(cls: type) -> type:
        if name in MIXERS or symbol in SYMBOLS:
            raise ValueError(f"mixer {name!r} or symbol {symbol!r} is registered twice")
        MIXERS[name] = cls
        SYMBOLS[symbol] = name
        cls.mixer_name = name
        return cls

    return add
