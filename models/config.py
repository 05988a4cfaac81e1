"""Model configuration: one dataclass for every language-model family, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass
class ModelConfig:
    """Shape and initialisation of a language model. Defaults are the Mamba paper's."""

    family: str = "mamba"  # a name in models.registry.FAMILIES
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 8  # the embedding is padded so matmuls hit aligned shapes
    # Mamba mixer
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16) as in the paper
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False  # bias in in_proj / out_proj
    # stack
    rms_norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    initializer_range: float = 0.02  # std of the embedding init
    rescale_out_proj: bool = True  # out_proj weights scaled by 1/sqrt(n_layer) at init

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first impossible value (key given as `prefix.key`)."""
        from .registry import FAMILIES

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: {allowed}")

        need(self.family in FAMILIES, "family", f"one of {sorted(FAMILIES)}")
        for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "expand"):
            need(getattr(self, key) >= 1, key, "must be a positive integer")
        need(2 <= self.d_conv <= 8, "d_conv", "must be between 2 and 8")
        need(self.dt_rank is None or self.dt_rank >= 1, "dt_rank", "must be a positive integer or null (auto)")
        need(0 < self.dt_min <= self.dt_max, "dt_min", f"must satisfy 0 < dt_min <= dt_max ({self.dt_max})")
        need(self.dt_init_floor > 0, "dt_init_floor", "must be > 0")
        need(self.dt_scale > 0, "dt_scale", "must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.initializer_range > 0, "initializer_range", "must be > 0")
        FAMILIES[self.family].validate(self, prefix)
        return self
