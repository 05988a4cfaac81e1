"""Model configuration: one dataclass for every language-model family, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ssmforge.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape and initialisation of a language model. Defaults are the Mamba paper's."""

    family: str = "mamba"  # a name in models.registry.FAMILIES
    d_model: int = 768
    n_layer: int = 24  # for `hybrid`: the length of layer_pattern
    # one character per block, `hybrid` family only: M mamba, 2 mamba2, G gss, * attention, - mlp
    layer_pattern: str | None = None
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
    # Mamba-2 mixer (Dao & Gu 2024); shares d_conv, expand, dt_* and conv_bias with Mamba
    mamba2_d_state: int = 128
    mamba2_headdim: int = 64
    mamba2_ngroups: int = 1  # B/C groups shared by nheads / ngroups heads each
    mamba2_chunk_size: int = 256
    # GSS mixer (Mehta et al. 2022)
    gss_expand: int = 3  # gated branch width = gss_expand * d_model
    gss_ssm_dim: int | None = None  # narrowed SSM branch width; None: d_model // 2 (paper: 512 at d 1024)
    gss_d_state: int = 64  # DSS state size per channel
    # causal self-attention
    attn_heads: int = 8
    attn_kv_heads: int | None = None  # grouped-query heads; None: attn_heads (multi-head)
    attn_rope_theta: float = 10000.0
    attn_window: int | None = None  # sliding window (tokens attended, incl. itself); None: full causal
    # SwiGLU MLP
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 64
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
    def layer_kinds(self) -> list[str]:
        """The mixer name of every block, bottom to top."""
        from .registry import FAMILIES, SYMBOLS

        unit = FAMILIES[self.family]
        pattern = self.layer_pattern if unit is None else unit * self.n_layer
        return [SYMBOLS[c] for c in pattern]

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first impossible value (key given as `prefix.key`)."""
        from .registry import FAMILIES, MIXERS, SYMBOLS

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r} is invalid: {allowed}")

        need(self.family in FAMILIES, "family", f"one of {sorted(FAMILIES)}")
        unit = FAMILIES[self.family]
        if unit is None:
            need(bool(self.layer_pattern), "layer_pattern", f"family {self.family!r} needs a pattern such as 'MMM*MMMM'")
            bad = sorted(set(self.layer_pattern) - set(SYMBOLS))
            need(not bad, "layer_pattern", f"unknown symbol(s) {bad}; allowed: " +
                 ", ".join(f"{c} {n}" for c, n in SYMBOLS.items()))
            need(self.n_layer == len(self.layer_pattern), "n_layer",
                 f"must equal the length of model.layer_pattern ({len(self.layer_pattern)})")
        else:
            need(self.layer_pattern is None, "layer_pattern", "only the 'hybrid' family takes a layer pattern")
            need(set(unit) <= set(SYMBOLS), "family", "is not available in this installation")
        for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "expand"):
            need(getattr(self, key) >= 1, key, "must be a positive integer")
        need(2 <= self.d_conv <= 8, "d_conv", "must be between 2 and 8")
        need(self.dt_rank is None or self.dt_rank >= 1, "dt_rank", "must be a positive integer or null (auto)")
        need(0 < self.dt_min <= self.dt_max, "dt_min", f"must satisfy 0 < dt_min <= dt_max ({self.dt_max})")
        need(self.dt_init_floor > 0, "dt_init_floor", "must be > 0")
        need(self.dt_scale > 0, "dt_scale", "must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.initializer_range > 0, "initializer_range", "must be > 0")
        for name in dict.fromkeys(self.layer_kinds):
            MIXERS[name].validate(self, prefix)
        return self
