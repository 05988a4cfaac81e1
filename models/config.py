"""Model configuration: the stack-wide ModelConfig and one typed section per mixer (`model.<mixer>.*`).

This module is torch-free on purpose: the run config (`ssmforge.pretrain.config`) is built on these dataclasses and
the CLI answers config errors without importing torch, so a mixer's section lives here and not in its
module file (`models/<mixer>.py`, which needs torch). Adding a mixer: its section below, decorated
`@mixer_config(name, symbol=...)`, one field line in ModelConfig, its module file decorated
`@register_mixer(name)`, and one import line in models/lm.py.

Every field has a docstring on the line below it: the one source for `ssmforge config show` and the docs.
Each section validates itself (`validate(model, prefix)`), naming the full key in a ConfigError.
Defaults are the papers'.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ssmforge.errors import ConfigError

from .registry import FAMILIES, SECTIONS, SYMBOLS, mixer_config

KERNEL_BACKENDS = ("auto", "ref", "triton")  # model.kernel_backend values (see ModelConfig.kernel_backend)


def _need(ok: bool, prefix: str, config: Any, key: str, allowed: str) -> None:
    """Raise ConfigError `prefix.key=value is invalid: allowed` unless ok."""
    if not ok:
        raise ConfigError(f"{prefix}.{key}={getattr(config, key)!r} is invalid: {allowed}")


def _positive(prefix: str, config: Any, *keys: str) -> None:
    for key in keys:
        _need(getattr(config, key) >= 1, prefix, config, key, "must be a positive integer")


def _check_dt(prefix: str, config: Any) -> None:
    """The step-size range every selective/diagonal SSM section shares."""
    _need(0 < config.dt_min <= config.dt_max, prefix, config, "dt_min",
          f"must satisfy 0 < dt_min <= dt_max ({config.dt_max})")
    if hasattr(config, "dt_init_floor"):
        _need(config.dt_init_floor > 0, prefix, config, "dt_init_floor", "must be > 0")


def _check_own_rate(prefix: str, config: Any, key: str = "ssm_lr") -> None:
    """A per-parameter learning rate (a cap or a factor of train.lr): positive, or null for train.lr itself."""
    value = getattr(config, key)
    _need(value is None or value > 0, prefix, config, key, "must be > 0, or null (train.lr)")


def _check_conv(prefix: str, config: Any, model: "ModelConfig", optional: bool = False) -> None:
    """The depthwise conv width: 2..8, and 2..4 where the Triton conv1d must run it; 0 (no conv) too if optional."""
    if optional and config.d_conv == 0:
        return
    _need(2 <= config.d_conv <= 8, prefix, config, "d_conv",
          "must be 0 (no conv) or between 2 and 8" if optional else "must be between 2 and 8")
    _need(model.kernel_backend != "triton" or config.d_conv <= 4, prefix, config, "d_conv",
          "must be between 2 and 4 with model.kernel_backend=triton (the Triton conv1d's widths)")


@mixer_config("mamba", symbol="M")
@dataclass
class MambaConfig:
    """Mamba (Gu & Dao 2023): causal conv, selective scan with input-dependent dt/B/C, SiLU(z) gate.

    Paper init: S4D-real A = -(1..N) per channel, dt log-uniform in [dt_min, dt_max]."""

    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Width of the causal depthwise convolution before the scan."""
    expand: int = 2
    """Inner width d_inner = expand * d_model."""
    dt_rank: int | None = None
    """Rank of the dt projection; null: ceil(d_model / 16), as in the paper."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    dt_init_floor: float = 1e-4
    """Lower clamp of the initial step sizes."""
    dt_scale: float = 1.0
    """Scale of the dt_proj weight init (uniform in +-dt_scale / sqrt(dt_rank))."""
    conv_bias: bool = True
    """Bias in the depthwise convolution."""

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def resolved_dt_rank(self, d_model: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state", "expand")
        _check_conv(prefix, self, model)
        _need(self.dt_rank is None or self.dt_rank >= 1, prefix, self, "dt_rank",
              "must be a positive integer or null (auto)")
        d_inner = self.d_inner(model.d_model)
        if self.resolved_dt_rank(model.d_model) > d_inner:
            raise ConfigError(f"{prefix}.dt_rank={self.resolved_dt_rank(model.d_model)} is invalid: must be <= "
                              f"expand * d_model ({d_inner})")
        _check_dt(prefix, self)
        _need(self.dt_scale > 0, prefix, self, "dt_scale", "must be > 0")


@mixer_config("mamba2", symbol="2")
@dataclass
class Mamba2Config:
    """Mamba-2 (Dao & Gu 2024): SSD with a scalar decay per head, B/C shared by head groups, gated RMSNorm.

    The conv runs over (x, B, C); the scan is the chunked SSD algorithm. Defaults as Mamba's where shared."""

    d_state: int = 128
    """SSM state size N per head."""
    headdim: int = 64
    """Channels per head P; nheads = expand * d_model / headdim."""
    ngroups: int = 1
    """B/C groups, each shared by nheads / ngroups heads."""
    chunk_size: int = 256
    """Steps per chunk of the SSD algorithm (a power of two >= 16)."""
    d_conv: int = 4
    """Width of the causal depthwise convolution over (x, B, C)."""
    expand: int = 2
    """Inner width d_inner = expand * d_model."""
    dt_min: float = 0.001
    """Smallest initial step size dt per head (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    dt_init_floor: float = 1e-4
    """Lower clamp of the initial step sizes."""
    conv_bias: bool = True
    """Bias in the depthwise convolution."""

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state", "headdim", "ngroups", "expand")
        _check_conv(prefix, self, model)
        _check_dt(prefix, self)
        d_inner = self.d_inner(model.d_model)
        _need(d_inner % self.headdim == 0, prefix, self, "headdim",
              f"must divide expand * d_model ({d_inner}) into heads")
        nheads = d_inner // self.headdim
        _need(nheads % self.ngroups == 0, prefix, self, "ngroups",
              f"must divide the number of heads (expand * d_model / headdim = {nheads})")
        chunk = self.chunk_size
        _need(chunk >= 16 and chunk & (chunk - 1) == 0, prefix, self, "chunk_size", "must be a power of two >= 16")


@mixer_config("gss", symbol="G")
@dataclass
class GSSConfig:
    """GSS (Mehta et al. 2022): a wide GELU gate over a narrow DSS-EXP SSM branch applied by FFT convolution.

    The DSS kernel (a diagonal complex SSM) is built for the whole length; decoding runs its recurrence."""

    expand: int = 3
    """Width of the multiplicative gate: expand * d_model."""
    ssm_dim: int | None = None
    """Width H of the narrowed SSM branch; null: d_model // 2 (the paper: 512 at d_model 1024)."""
    d_state: int = 64
    """DSS state size N per channel."""
    dt_min: float = 0.001
    """Smallest initial DSS step size (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial DSS step size."""
    d_conv: int = 0
    """Width of a causal depthwise convolution on the SSM branch before its GELU (Mamba's short conv); 0: none,
    the paper's GSS. Without it GSS does not learn induction heads (README, "The survey's comparison"); with 4
    it does."""
    ssm_lr: float | None = None
    """The DSS's Lambda and dt train at min(train.lr, ssm_lr), without weight decay; null (the default): at train.lr
    like every other parameter. 0.001 is the rate the DSS reference gives them (`model.dss.ssm_lr`'s default)."""

    def resolved_ssm_dim(self, d_model: int) -> int:
        return self.ssm_dim if self.ssm_dim is not None else max(1, d_model // 2)

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "expand", "d_state")
        _need(self.ssm_dim is None or self.ssm_dim >= 1, prefix, self, "ssm_dim",
              "must be a positive integer or null (d_model // 2)")
        _check_dt(prefix, self)
        _check_conv(prefix, self, model, optional=True)
        _check_own_rate(prefix, self)


DISCRETIZATIONS = ("bilinear", "zoh")  # model.s4.discretization values
LIQUID_KERNELS = ("polyb", "kb")  # model.liquid_s4.liquid_kernel values


@mixer_config("s4", symbol="S")
@dataclass
class S4Config:
    """S4 (Gu, Goel & Re 2022): HiPPO-LegS in normal-plus-low-rank form, kernel by the Cauchy generating function.

    Per channel an N-state system A = Lambda - P P*, discretised with step dt, applied by FFT convolution, then
    GELU and a GLU output projection (the S4 block); decoding runs the recurrence."""

    d_state: int = 64
    """State size N per channel (N / 2 complex modes and their conjugates)."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    discretization: str = "bilinear"
    """bilinear (the paper's, kernel through the Cauchy sums) or zoh (kernel through powers of the state matrix)."""
    ssm_lr: float | None = 0.001
    """The SSM's Lambda, P, B and dt train at min(train.lr, ssm_lr), without weight decay, as the reference
    trains them (0.001); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state")
        _need(self.d_state % 2 == 0, prefix, self, "d_state", "must be even (complex modes come in conjugate pairs)")
        _check_dt(prefix, self)
        _need(self.discretization in DISCRETIZATIONS, prefix, self, "discretization",
              f"one of {', '.join(DISCRETIZATIONS)}")
        _check_own_rate(prefix, self)


@mixer_config("liquid_s4", symbol="Q")
@dataclass
class LiquidS4Config(S4Config):
    """Liquid-S4 (Hasani et al. 2023): S4 plus liquid kernel terms on the correlations of consecutive inputs.

    Terms of degree 2..liquid_degree: products of that many consecutive inputs, weighted by the S4 kernel's
    first tap (polyb) or convolved with the whole kernel (kb), each scaled by the input matrix's sum."""

    liquid_kernel: str = "polyb"
    """polyb (the reference's default: the kernel's first tap) or kb (the whole S4 kernel)."""
    liquid_degree: int = 2
    """Highest degree of the input correlations (>= 2)."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        super().validate(model, prefix)
        _need(self.liquid_kernel in LIQUID_KERNELS, prefix, self, "liquid_kernel", f"one of {', '.join(LIQUID_KERNELS)}")
        _need(2 <= self.liquid_degree <= 8, prefix, self, "liquid_degree", "must be between 2 and 8")


S4D_INITS = ("lin", "inv")  # model.s4d.init values


@mixer_config("s4d", symbol="D")
@dataclass
class S4DConfig:
    """S4D (Gu et al. 2022): a diagonal complex SSM per channel, zero-order hold, Vandermonde kernel, FFT conv.

    S4D-Lin or S4D-Inv eigenvalues, B = 1, C complex normal; then GELU and a GLU output projection (the S4 block)."""

    d_state: int = 64
    """State size N per channel (N / 2 complex modes and their conjugates)."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    init: str = "lin"
    """Eigenvalues: lin (-1/2 + i pi n) or inv (-1/2 + i N/pi (N/(2n+1) - 1))."""
    ssm_lr: float | None = 0.001
    """The SSM's A and dt train at min(train.lr, ssm_lr), without weight decay, as the reference
    trains them (0.001); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state")
        _need(self.d_state % 2 == 0, prefix, self, "d_state", "must be even (complex modes come in conjugate pairs)")
        _check_dt(prefix, self)
        _need(self.init in S4D_INITS, prefix, self, "init", f"one of {', '.join(S4D_INITS)}")
        _check_own_rate(prefix, self)


DSS_VARIANTS = ("exp", "softmax")  # model.dss.variant values


@mixer_config("dss", symbol="E")
@dataclass
class DSSConfig:
    """DSS (Gupta, Gu & Berant 2022): diagonal state spaces, DSS-EXP or DSS-softmax kernel, FFT conv.

    Then GELU and a GLU output projection (the S4 block); decoding runs the diagonal recurrence."""

    d_state: int = 64
    """Complex modes N per channel."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    variant: str = "exp"
    """exp (Re(Lambda) < 0 through -exp) or softmax (Re(Lambda) free, each mode normalised over softmax_length)."""
    softmax_length: int = 2048
    """DSS-softmax: the kernel length L each mode's softmax normalises over (the paper: the training length)."""
    ssm_lr: float | None = 0.001
    """The SSM's Lambda and dt train at min(train.lr, ssm_lr), without weight decay, as the reference
    trains them (0.001); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state", "softmax_length")
        _check_dt(prefix, self)
        _need(self.variant in DSS_VARIANTS, prefix, self, "variant", f"one of {', '.join(DSS_VARIANTS)}")
        _check_own_rate(prefix, self)


@mixer_config("h3", symbol="H")
@dataclass
class H3Config:
    """H3 (Fu et al. 2023): Q, K, V projections; a shift SSM on K, K V products per head, a diagonal SSM, times Q.

    The shift SSM is a learned length-d_state filter, the diagonal SSM S4D-Lin; heads of head_dim channels."""

    d_state: int = 64
    """State size N of both SSMs (the shift SSM's filter length; the diagonal SSM's N / 2 complex modes)."""
    head_dim: int = 1
    """Channels per head: the K V product is a head_dim x head_dim outer product per head."""
    dt_min: float = 0.001
    """Smallest initial step size dt of the diagonal SSM."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    ssm_lr: float | None = 0.001
    """The SSM's diagonal A and dt train at min(train.lr, ssm_lr), without weight decay, as the reference
    trains them (0.001); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state", "head_dim")
        _need(self.d_state % 2 == 0, prefix, self, "d_state", "must be even (complex modes come in conjugate pairs)")
        _need(model.d_model % self.head_dim == 0, prefix, self, "head_dim", f"must divide d_model ({model.d_model})")
        _check_dt(prefix, self)
        _check_own_rate(prefix, self)


@mixer_config("hyena", symbol="Y")
@dataclass
class HyenaConfig:
    """Hyena (Poli et al. 2023): gates and implicit long convolutions in an order-N recurrence, by FFT.

    Filters are a small sine FFN of positional features, windowed by decaying exponentials; short convs first."""

    order: int = 2
    """Order N (>= 2), as in the reference code: N + 1 projections, N gates, N - 1 implicit long convolutions."""
    filter_order: int = 64
    """Width of the filter FFN."""
    emb_dim: int = 3
    """Positional features of the filter FFN: t and (emb_dim - 1) / 2 sine-cosine bands (odd, >= 3)."""
    short_filter_order: int = 3
    """Width of the short depthwise conv over the projections."""
    l_max: int = 2048
    """Longest sequence: the filters are defined on positions 0..l_max - 1."""
    w: float = 1.0
    """Frequency of the filter FFN's sine activations."""
    fast_decay_pct: float = 0.3
    """The fastest channel's window falls to `decay_target` at this fraction of l_max."""
    slow_decay_pct: float = 1.5
    """The slowest channel's window falls to `decay_target` at this fraction of l_max."""
    decay_target: float = 0.01
    """Window value that sets the decay rates."""
    filter_lr: float | None = 0.001
    """The filter FFN (its linear layers and sine frequencies) trains at min(train.lr, filter_lr), without weight
    decay, as the reference trains it (0.001); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "filter_order", "l_max")
        _need(self.order >= 2, prefix, self, "order", "must be an integer >= 2")
        _need(self.emb_dim >= 3 and self.emb_dim % 2 == 1, prefix, self, "emb_dim", "must be odd and >= 3")
        _need(2 <= self.short_filter_order <= 8, prefix, self, "short_filter_order", "must be between 2 and 8")
        _need(0 < self.fast_decay_pct <= self.slow_decay_pct, prefix, self, "fast_decay_pct",
              f"must satisfy 0 < fast_decay_pct <= slow_decay_pct ({self.slow_decay_pct})")
        _need(0 < self.decay_target < 1, prefix, self, "decay_target", "must be in (0, 1)")
        _check_own_rate(prefix, self, "filter_lr")


@mixer_config("lru", symbol="L")
@dataclass
class LRUConfig:
    """LRU (Orvieto et al. 2023): a complex diagonal linear recurrence, exponential parameterisation, parallel scan.

    lambda = exp(-exp(nu) + i exp(theta)) on a ring, gamma normalisation, complex B and C, then GELU and a GLU
    output projection."""

    d_state: int = 256
    """Complex state size N (shared by the channels: B is N x d_model, C d_model x N)."""
    r_min: float = 0.0
    """Smallest initial |lambda|."""
    r_max: float = 1.0
    """Largest initial |lambda| (eigenvalues uniform on the ring r_min <= |lambda| <= r_max)."""
    max_phase: float = 6.283
    """Largest initial arg(lambda)."""
    ssm_lr_factor: float | None = 0.5
    """The recurrence (nu, theta, gamma and B) trains at train.lr * ssm_lr_factor, without weight decay, as the
    reference trains it (0.5); null: at train.lr like every other parameter."""

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _positive(prefix, self, "d_state")
        _check_own_rate(prefix, self, "ssm_lr_factor")
        _need(0 < self.r_max <= 1, prefix, self, "r_max", "must be in (0, 1]")
        _need(0 <= self.r_min < self.r_max, prefix, self, "r_min", f"must satisfy 0 <= r_min < r_max ({self.r_max})")
        _need(self.max_phase > 0, prefix, self, "max_phase", "must be > 0")


@mixer_config("attention", symbol="*", family=False)
@dataclass
class AttentionConfig:
    """Causal self-attention: rotary positions, grouped-query heads, optional sliding window.

    On torch's scaled_dot_product_attention; decoding keeps a KV cache (a ring buffer with a window)."""

    heads: int = 8
    """Query heads; the head dimension d_model / heads must be even (rotary pairs)."""
    kv_heads: int | None = None
    """Key/value heads shared by groups of query heads (grouped-query); null: heads (multi-head)."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""
    window: int | None = None
    """Sliding window: tokens attended, the query's own included; null: full causal attention."""

    def resolved_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        heads = self.heads
        _need(heads >= 1 and model.d_model % heads == 0, prefix, self, "heads",
              f"must be a positive divisor of d_model ({model.d_model})")
        kv = self.kv_heads
        _need(kv is None or (kv >= 1 and heads % kv == 0), prefix, self, "kv_heads",
              f"must be a positive divisor of heads ({heads}) or null (= heads)")
        _need((model.d_model // heads) % 2 == 0, prefix, self, "heads",
              f"the head dimension d_model / heads ({model.d_model // heads}) must be even for rotary embeddings")
        _need(self.window is None or self.window >= 1, prefix, self, "window",
              "must be >= 1 or null (full causal attention)")
        _need(self.rope_theta > 0, prefix, self, "rope_theta", "must be > 0")


@mixer_config("mlp", symbol="-", family=False)
@dataclass
class MLPConfig:
    """SwiGLU MLP (Shazeer 2020), as in Llama: down(SiLU(gate(x)) * up(x)); stateless."""

    hidden: int | None = None
    """Hidden width; null: 8/3 d_model rounded up to a multiple of 64 (a 4 d_model GELU MLP's parameters)."""

    def resolved_hidden(self, d_model: int) -> int:
        return self.hidden if self.hidden is not None else 64 * math.ceil(8 * d_model / 3 / 64)

    def validate(self, model: "ModelConfig", prefix: str) -> None:
        _need(self.hidden is None or self.hidden >= 1, prefix, self, "hidden",
              "must be a positive integer or null (8/3 d_model rounded up to a multiple of 64)")


@dataclass
class ModelConfig:
    """Shape and initialisation of a language model: the stack, and one section per mixer."""

    family: str = "mamba"
    """The stack: a mixer repeated (mamba, mamba2, gss, s4, s4d, dss, h3, hyena, lru, liquid_s4), transformer (attention and MLP), or hybrid."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layer: int = 24
    """Number of blocks (pattern units for `transformer`); for `hybrid` the length of layer_pattern."""
    layer_pattern: str | None = None
    """One mixer symbol per block, bottom to top (`hybrid` only); `python -m ssmforge.models.registry` lists them."""
    vocab_size: int = 50277
    """Tokens the model reads and predicts (the tokenizer's vocabulary)."""
    pad_vocab_size_multiple: int = 8
    """The embedding is padded to a multiple of this so the matmuls hit aligned shapes."""
    bias: bool = False
    """Biases in the mixers' linear projections."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    residual_in_fp32: bool = True
    """Keep the residual stream in float32 whatever the training precision."""
    tie_embeddings: bool = True
    """The LM head shares the embedding's weights."""
    initializer_range: float = 0.02
    """Standard deviation of the embedding init."""
    rescale_out_proj: bool = True
    """Scale each mixer's output projection by 1/sqrt(number of blocks) at init."""
    kernel_backend: str = "auto"
    """Kernels the mixers' scans and convs call: auto (fastest for the device), ref (the sequential oracles), triton (CUDA, or CPU under TRITON_INTERPRET=1); decoding steps and the FFT conv have one implementation."""
    kernel_block_mib: float = 256.0
    """The most MiB of (channels, length, states) work the FFT families (S4, S4D, DSS, H3, GSS, Liquid-S4) build at once where no fused kernel does it (Vandermonde powers on the ref path, S4's Krylov powers and matrix powers, the carried-state summaries): a block of channels at a time, each recomputed in backward. Larger blocks: fewer, larger launches; smaller: a lower peak."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """Keys of the Mamba mixer."""
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    """Keys of the Mamba-2 mixer."""
    gss: GSSConfig = field(default_factory=GSSConfig)
    """Keys of the GSS mixer."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Keys of the causal self-attention mixer."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Keys of the SwiGLU MLP mixer."""
    s4: S4Config = field(default_factory=S4Config)
    """Keys of the S4 mixer."""
    liquid_s4: LiquidS4Config = field(default_factory=LiquidS4Config)
    """Keys of the Liquid-S4 mixer."""
    s4d: S4DConfig = field(default_factory=S4DConfig)
    """Keys of the S4D mixer."""
    dss: DSSConfig = field(default_factory=DSSConfig)
    """Keys of the DSS mixer."""
    h3: H3Config = field(default_factory=H3Config)
    """Keys of the H3 mixer."""
    hyena: HyenaConfig = field(default_factory=HyenaConfig)
    """Keys of the Hyena mixer."""
    lru: LRUConfig = field(default_factory=LRUConfig)
    """Keys of the LRU mixer."""

    @property
    def layer_kinds(self) -> list[str]:
        """The mixer name of every block, bottom to top."""
        unit = FAMILIES[self.family]
        pattern = self.layer_pattern if unit is None else unit * self.n_layer
        return [SYMBOLS[c] for c in pattern]

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def section(self, name: str):
        """The config section of mixer `name`."""
        return getattr(self, name)

    def check_device(self, device_type: str) -> None:
        """Raise ConfigError when model.kernel_backend cannot run on a device of this type ('cuda', 'cpu')."""
        if self.kernel_backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"model.kernel_backend=triton cannot run on {device_type}: it needs a CUDA GPU "
                              f"(or TRITON_INTERPRET=1 for Triton's slow CPU interpreter); use auto or ref")

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first impossible value (key given as `prefix.key`): the stack,
        then the section of each mixer the stack uses."""

        def need(ok: bool, key: str, allowed: str) -> None:
            _need(ok, prefix, self, key, allowed)

        need(self.family in FAMILIES, "family", f"one of {sorted(FAMILIES)}")
        unit = FAMILIES[self.family]
        if unit is None:
            need(bool(self.layer_pattern), "layer_pattern",
                 f"family {self.family!r} needs a pattern such as 'MMM*MMMM'")
            bad = sorted(set(self.layer_pattern) - set(SYMBOLS))
            need(not bad, "layer_pattern", f"unknown symbol(s) {bad}; allowed: " +
                 ", ".join(f"{c} {n}" for c, n in SYMBOLS.items()))
            need(self.n_layer == len(self.layer_pattern), "n_layer",
                 f"must equal the length of model.layer_pattern ({len(self.layer_pattern)})")
        else:
            need(self.layer_pattern is None, "layer_pattern", "only the 'hybrid' family takes a layer pattern")
            need(set(unit) <= set(SYMBOLS), "family", "is not available in this installation")
        for key in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            need(getattr(self, key) >= 1, key, "must be a positive integer")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.initializer_range > 0, "initializer_range", "must be > 0")
        need(self.kernel_backend in KERNEL_BACKENDS, "kernel_backend", f"one of {', '.join(KERNEL_BACKENDS)}")
        need(isinstance(self.kernel_block_mib, (int, float)) and 0 < self.kernel_block_mib < math.inf,
             "kernel_block_mib", "must be a number > 0 (MiB of kernel work per block of channels)")
        need(self.kernel_backend != "triton" or importlib.util.find_spec("triton") is not None, "kernel_backend",
             "triton is not installed")
        for name in dict.fromkeys(self.layer_kinds):
            section = self.section(name)
            if not isinstance(section, SECTIONS[name]):
                raise ConfigError(f"{prefix}.{name} is invalid: expected a {SECTIONS[name].__name__}, got "
                                  f"{type(section).__name__}")
            section.validate(self, f"{prefix}.{name}")
        return self

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "model") -> "ModelConfig":
        """A ModelConfig from nested dicts (as `dataclasses.asdict` writes it); unknown and renamed keys raise
        ConfigError naming the full key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix} is invalid: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(renamed_model_key_message(key, prefix) or f"{prefix}.{key}: unknown key")
        values = dict(data)
        for name, section_cls in SECTIONS.items():
            if name not in values:
                continue
            section = values[name]
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}.{name} is invalid: expected a mapping, got {type(section).__name__}")
            section_keys = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(section) - section_keys)
            if unknown:
                raise ConfigError(f"{prefix}.{name}.{unknown[0]}: unknown key")
            values[name] = section_cls(**section)
        return cls(**values)


# Keys of the flat ModelConfig before the per-mixer sections -> their one new home under `model.`.
RENAMED_MODEL_KEYS: dict[str, str] = {
    "d_state": "mamba.d_state",
    "d_conv": "mamba.d_conv",
    "expand": "mamba.expand",
    "dt_rank": "mamba.dt_rank",
    "dt_min": "mamba.dt_min",
    "dt_max": "mamba.dt_max",
    "dt_init_floor": "mamba.dt_init_floor",
    "dt_scale": "mamba.dt_scale",
    "conv_bias": "mamba.conv_bias",
    "mamba2_d_state": "mamba2.d_state",
    "mamba2_headdim": "mamba2.headdim",
    "mamba2_ngroups": "mamba2.ngroups",
    "mamba2_chunk_size": "mamba2.chunk_size",
    "gss_expand": "gss.expand",
    "gss_ssm_dim": "gss.ssm_dim",
    "gss_d_state": "gss.d_state",
    "attn_heads": "attention.heads",
    "attn_kv_heads": "attention.kv_heads",
    "attn_rope_theta": "attention.rope_theta",
    "attn_window": "attention.window",
    "mlp_hidden": "mlp.hidden",
}

# Flat keys that other mixers read too before the sections: Mamba-2 shared Mamba's conv and dt keys, GSS its
# dt range. Used to convert old exported configs exactly (a config error only names RENAMED_MODEL_KEYS' home).
_FLAT_KEYS_ALSO_READ_BY: dict[str, tuple[str, ...]] = {
    "d_conv": ("mamba2",),
    "expand": ("mamba2",),
    "dt_min": ("mamba2", "gss"),
    "dt_max": ("mamba2", "gss"),
    "dt_init_floor": ("mamba2",),
    "conv_bias": ("mamba2",),
}


def renamed_model_key_message(key: str, prefix: str = "model") -> str | None:
    """`model.d_state was renamed: use model.mamba.d_state` for a removed flat key, else None."""
    new = RENAMED_MODEL_KEYS.get(key)
    if new is None:
        return None
    message = f"{prefix}.{key} was renamed: use {prefix}.{new}"
    others = _FLAT_KEYS_ALSO_READ_BY.get(key, ())
    if not others:
        return message
    keys = ", ".join(f"{prefix}.{name}.{new.split('.', 1)[1]}" for name in others)
    whose = "have their" if len(others) > 1 else "has its"
    return f"{message} ({' and '.join(others)} {whose} own: {keys})"


def upgrade_flat_model_dict(data: dict) -> dict:
    """A model config dict written before the per-mixer sections (flat keys such as `mamba2_d_state`) ->
    the sectioned form, with every value where the old model read it (a flat `expand` set Mamba's and
    Mamba-2's). Dicts already in the new form come back unchanged."""
    flat = {key: value for key, value in data.items() if key in RENAMED_MODEL_KEYS}
    if not flat:
        return data
    out = {key: value for key, value in data.items() if key not in RENAMED_MODEL_KEYS}
    for key, value in flat.items():
        section, leaf = RENAMED_MODEL_KEYS[key].split(".")
        for name in (section, *_FLAT_KEYS_ALSO_READ_BY.get(key, ())):
            out.setdefault(name, {})
            if isinstance(out[name], dict):
                out[name].setdefault(leaf, value)
    return out


def _check_sections_are_fields() -> None:
    """Every registered section is the ModelConfig field of its name, and every section field is registered."""
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    section_fields = {name for name, kind in fields.items() if kind in {cls.__name__ for cls in SECTIONS.values()}}
    for name, cls in SECTIONS.items():
        if fields.get(name) != cls.__name__:
            raise TypeError(f"mixer section {cls.__name__} needs the field `{name}: {cls.__name__} = "
                            f"field(default_factory={cls.__name__})` in ModelConfig")
    if section_fields != set(SECTIONS):
        raise TypeError(f"ModelConfig fields {sorted(section_fields - set(SECTIONS))} are not registered sections")


_check_sections_are_fields()
