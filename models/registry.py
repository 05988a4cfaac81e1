"""Registry of sequence mixers and model families (torch-free: the config loader reads it).

A model is a stack of pre-norm residual blocks; each block wraps one *mixer*. A mixer has a name, a
one-character symbol and a typed config section `model.<name>`, so a stack is described by a layer
pattern string (Megatron-style) such as "M-M-*-M-". A *family* is a named default pattern unit repeated
`n_layer` times (`mamba` -> "M", `transformer` -> "*-"); the `hybrid` family takes `model.layer_pattern`
verbatim.

A mixer registers in two places, each in its own file:
  - its config section, a dataclass in `models/config.py` decorated `@mixer_config(name, symbol=...)`
    and listed as the field `name` of ModelConfig: the symbol and the section live here, torch-free;
  - its nn.Module, decorated `@register_mixer(name)` in its own file (`models/<name>.py`), imported by
    `models/lm.py`. A module without a section is refused at registration; a section without a module
    is refused once `ssmforge.models.lm` has imported the mixers (`check_complete`).

A mixer class must provide:
  - `__init__(config, layer_idx)` (config: the whole ModelConfig; the mixer reads `config.<name>` and
    the stack-wide fields) and `forward(hidden (batch, L, d_model), state=None, seq_idx=None)`; with a
    `state`, forward continues the sequence it holds (none when freshly allocated) and leaves it ready for
    the next chunk or `step`; with `seq_idx` (batch, L) each document of a packed row is mixed as if it
    ran alone (kernels.documents); to train with context parallelism (train.context_parallel > 1) it also
    takes `context` (models.context_parallel.ContextParallel): hidden is then one chunk of the rows and the
    mixer exchanges what crosses chunk boundaries with the ranks holding the others;
  - `allocate_state(batch, device, dtype)` (None when stateless) and
    `step(hidden (batch, d_model), state)` for decoding one token;
  - `forward_flops_per_token(seq_len)` (for MFU; attention depends on the context length) and
    `external_parameters()`: child-module weights that forward reads directly, which ZeRO-3 must
    gather with the mixer.
Impossible shapes are refused by the section's `validate(model, prefix)`, before any module is built.

`python -m ssmforge.models.registry` prints the README's mixer table from the registry.
"""
from __future__ import annotations

from typing import Callable

SECTIONS: dict[str, type] = {}  # mixer name -> its config section dataclass (models.config)
SYMBOLS: dict[str, str] = {}  # layer-pattern character -> mixer name
MIXERS: dict[str, type] = {}  # mixer name -> nn.Module class (filled when models.lm imports the mixers)

# family -> the pattern unit repeated n_layer times (None: the config's layer_pattern is the stack).
# A mixer registered with family=True adds a family of its own name (that mixer alone).
FAMILIES: dict[str, str | None] = {
    "transformer": "*-",
    "hybrid": None,
}


def mixer_config(name: str, symbol: str, family: bool = True) -> Callable[[type], type]:
    """Class decorator for a mixer's config section (a dataclass in models/config.py): the section
    `model.<name>`, the layer-pattern `symbol`, and with `family` a model family `name` that repeats
    the mixer n_layer times. The first line of the class docstring describes the mixer (README table)."""

    def add(cls: type) -> type:
        if name in SECTIONS or symbol in SYMBOLS or (family and name in FAMILIES):
            raise ValueError(f"mixer {name!r} or symbol {symbol!r} is registered twice")
        if len(symbol) != 1:
            raise ValueError(f"mixer {name!r}: a layer-pattern symbol is one character, got {symbol!r}")
        if not (cls.__doc__ or "").strip():
            raise ValueError(f"mixer {name!r}: the section {cls.__name__} needs a docstring saying what the mixer is")
        SECTIONS[name] = cls
        SYMBOLS[symbol] = name
        if family:
            FAMILIES[name] = symbol
        cls.mixer_name = name
        cls.symbol = symbol
        return cls

    return add


def register_mixer(name: str) -> Callable[[type], type]:
    """Class decorator: the nn.Module that implements mixer `name` (whose section is already registered)."""

    def add(cls: type) -> type:
        if name not in SECTIONS:
            raise ValueError(f"mixer {name!r} has no config section: add a dataclass decorated "
                             f"@mixer_config({name!r}, symbol=...) and a field {name!r} to ModelConfig "
                             f"in models/config.py")
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice ({MIXERS[name].__name__}, {cls.__name__})")
        MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return add


def check_complete() -> None:
    """Raise unless every config section has its module (call after importing the mixer modules)."""
    missing = sorted(set(SECTIONS) - set(MIXERS))
    if missing:
        raise ImportError(f"mixer section(s) {missing} have no module: decorate the nn.Module with "
                          f"@register_mixer(name) and import its file in models/lm.py")


def mixer_description(name: str) -> str:
    """The first line of a section's class docstring: what the mixer is."""
    return SECTIONS[name].__doc__.strip().splitlines()[0].strip()


def mixer_table() -> str:
    """The README's mixer table (markdown), one row per registered mixer in registration order."""
    rows = ["| symbol | section | mixer |", "| --- | --- | --- |"]
    for symbol, name in SYMBOLS.items():
        rows.append(f"| `{symbol}` | `model.{name}` | {mixer_description(name)} |")
    return "\n".join(rows)


# The sections register themselves when models.config is imported (torch-free). Imported last: config
# imports the decorator above, so whichever of the two is imported first, both end up complete.
from . import config as _config  # noqa: E402,F401


if __name__ == "__main__":  # run as __main__, this file is a second copy: print the package's registry
    from ssmforge.models.registry import mixer_table as _table

    print(_table())
