"""Building blocks shared by the mixers and the stack."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def keep_fp32(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter that must stay float32 whatever the training precision (see pretrain.engine)."""
    param._ssmforge_fp32 = True
    param._no_weight_decay = True
    return param


def cap_lr(params: list[nn.Parameter], cap: float | None) -> None:
    """Train `params` at min(train.lr, cap) (pretrain.engine.param_groups): the S4-family convention of a smaller
    rate for the SSM's state matrix, input matrix and step size, and Hyena's for its filter FFN. None: no cap."""
    if cap is not None:
        for param in params:
            param._ssmforge_lr_cap = float(cap)


def scale_lr(params: list[nn.Parameter], factor: float | None) -> None:
    """Train `params` at train.lr * factor (pretrain.engine.param_groups): LRU's convention for its recurrence.
    None: at train.lr."""
    if factor is not None:
        for param in params:
            param._ssmforge_lr_factor = float(factor)


def rate_of(param: nn.Parameter, lr: float) -> float | None:
    """The learning rate cap_lr or scale_lr set for `param` at train.lr `lr`; None: train.lr itself."""
    cap, factor = getattr(param, "_ssmforge_lr_cap", None), getattr(param, "_ssmforge_lr_factor", None)
    return min(lr, cap) if cap is not None else lr * factor if factor is not None else None


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """n biases b with softplus(b) log-uniform in [dt_min, dt_max], floored at `floor` (Mamba paper,
    section 3.6): the step sizes a selective SSM starts from."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


def kernel_backend(config) -> str | None:
    """The `backend=` every kernel call of a mixer passes: None lets each kernel pick by device
    (model.kernel_backend auto), else the named backend ("ref", "triton")."""
    return None if config.kernel_backend == "auto" else config.kernel_backend


class Projection(nn.Linear):
    """A mixer's linear projection with the init every mixer shares: bias (config.bias) zeroed and, for the
    projection back into the residual stream, the weights scaled by 1/sqrt(number of blocks) when
    config.rescale_out_proj (GPT-2, mamba_ssm: each block adds to the stream). Done in its own constructor,
    because under DeepSpeed's ZeRO-3 a module's parameters are partitioned as soon as it is built."""

    def __init__(self, in_features: int, out_features: int, config, residual: bool = False):
        super().__init__(in_features, out_features, bias=config.bias)
        with torch.no_grad():
            if residual and config.rescale_out_proj:
                self.weight /= math.sqrt(len(config.layer_kinds))
            if self.bias is not None:
                self.bias.zero_()


def conv_state_after(conv_state: torch.Tensor, conv_inputs: torch.Tensor,
                     seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The decoding cache (batch, channels, d_conv) like `conv_state` that follows conv inputs (batch, channels,
    L): their last d_conv, oldest first, zeros in front when L < d_conv, what the next `step` convolves with. With
    seq_idx (batch, L), inputs of documents before the last one are left out too (decoding continues the last
    document). A new tensor: the cache it replaces may be saved for backward."""
    width = conv_state.shape[-1]
    tail = conv_inputs[..., -width:].to(conv_state.dtype)
    if seq_idx is not None:
        tail = tail * (seq_idx[:, -tail.shape[-1]:] == seq_idx[:, -1:])[:, None, :].to(tail.dtype)
    return F.pad(tail, (width - tail.shape[-1], 0))


def with_conv_history(conv_state: torch.Tensor, x: torch.Tensor, seq_idx: torch.Tensor | None):
    """x (batch, channels, L) continuing a sequence whose last conv inputs `conv_state` (batch, channels,
    d_conv) holds -> (the width - 1 inputs before x, then x), its seq_idx (the history belongs to x's first
    document) or None: a causal conv of that, less its first width - 1 outputs, continues the sequence."""
    history = conv_state[..., 1:].to(x.dtype)
    extended = torch.cat([history, x], dim=-1)
    if seq_idx is None:
        return extended, None
    return extended, torch.cat([seq_idx[:, :1].expand(-1, history.shape[-1]), seq_idx], dim=1)


def recomputed(function, *args):
    """function(*args) keeping, under autograd, only its inputs: its intermediates are recomputed in backward."""
    return checkpoint(function, *args, use_reentrant=False) if torch.is_grad_enabled() else function(*args)


def kernel_block_bytes(config) -> int:
    """The most bytes of (channels, length, states) work an SSM kernel builds at once (model.kernel_block_mib)."""
    return max(1, round(config.kernel_block_mib * 2**20))


def recomputed_by_channels(function, length: int, bytes_per_channel: int, *tensors: torch.Tensor,
                           block_bytes: int) -> torch.Tensor:
    """function(*tensors, length) -> (channels, ...), for a function whose channels (dim 0 of every tensor) are
    independent: applied to blocks of channels whose work (bytes_per_channel each) stays within block_bytes
    (kernel_block_bytes), each block recomputed in backward on its own. An SSM kernel's (channels, length,
    states) temporaries then peak at one block's, forward and backward, not the whole layer's (2 GiB and more at
    d_model 2048, L 2048)."""
    channels = tensors[0].shape[0]
    block = max(1, block_bytes // max(bytes_per_channel, 1))
    if block >= channels:
        return recomputed(function, *tensors, length)
    return torch.cat([recomputed(function, *(t[start:start + block] for t in tensors), length)
                      for start in range(0, channels, block)])


def conv_in_context(conv, x: torch.Tensor, seq_idx: torch.Tensor | None, context, width: int) -> torch.Tensor:
    """A causal conv of `width` taps, conv(inputs, seq_idx) -> outputs, over one chunk x (batch, channels, L) of a
    row split between the ranks of a context group: the chunk's conv from zero history, then its first width - 1
    outputs again with the previous rank's last width - 1 inputs in front (context.halo). The same outputs as
    the conv of the whole row, and autograd keeps no concatenated copy of the chunk."""
    reach = width - 1
    if x.shape[-1] < reach:
        raise ValueError(f"a chunk of {x.shape[-1]} positions is shorter than the conv's reach of {reach}")
    out = conv(x, seq_idx)
    head_in = torch.cat([context.halo(x[..., x.shape[-1] - reach:]), x[..., :reach]], dim=-1)
    head = conv(head_in, context.halo_seq_idx(reach, None if seq_idx is None else seq_idx[:, :reach]))
    return torch.cat([head[..., reach:], out[..., reach:]], dim=-1)


def depthwise_causal_conv(conv1d: nn.Conv1d, backend: str | None, x: torch.Tensor, seq_idx: torch.Tensor | None,
                          state=None, context=None, activation: str | None = None) -> torch.Tensor:
    """A mixer's depthwise causal conv (conv1d's taps and bias, then `activation`: None or "silu") of x (batch,
    channels, L): over one chunk of a context group, continuing a decoding state, or from zeros (continued_conv)."""
    from ssmforge import kernels

    def conv(inputs, inputs_seq_idx):
        return kernels.causal_conv1d(inputs, conv1d.weight.squeeze(1), conv1d.bias, activation=activation,
                                     backend=backend, seq_idx=inputs_seq_idx)

    return continued_conv(conv, conv1d.kernel_size[0], x, seq_idx, state, context)


def continued_conv(conv, width: int, x: torch.Tensor, seq_idx: torch.Tensor | None, state=None,
                   context=None) -> torch.Tensor:
    """A causal conv of `width` taps, conv(inputs, seq_idx) -> outputs, of x (batch, channels, L): over one chunk of
    a row split between the ranks of a context group (conv_in_context); continuing the conv inputs of a decoding
    state's `conv` (batch, channels, width) (unless the state is fresh), which is left holding the new last ones;
    or from zeros."""
    if context is not None:
        return conv_in_context(conv, x, seq_idx, context, width)
    continuing = state is not None and not state.fresh
    conv_in, conv_seq_idx = with_conv_history(state.conv, x, seq_idx) if continuing else (x, seq_idx)
    if state is not None:
        state.conv = conv_state_after(state.conv, conv_in, conv_seq_idx)
    return conv(conv_in, conv_seq_idx)[..., conv_in.shape[-1] - x.shape[-1]:]


def in_first_document(seq_idx: torch.Tensor | None, batch: int, L: int, device) -> torch.Tensor:
    """(batch, L) bool: the positions a state carried in from before the sequence reaches (all of them
    without seq_idx; with it, those of each row's first document)."""
    if seq_idx is None:
        return torch.ones(batch, L, dtype=torch.bool, device=device)
    return seq_idx == seq_idx[:, :1]


def in_last_document(seq_idx: torch.Tensor | None, batch: int, L: int, device) -> torch.Tensor:
    """(batch, L) bool: the positions whose inputs reach the state after the last position (all of them without
    seq_idx; with it, those of each row's last document)."""
    if seq_idx is None:
        return torch.ones(batch, L, dtype=torch.bool, device=device)
    return seq_idx == seq_idx[:, -1:]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, returned in the input dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.weight._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GLUOutput(nn.Module):
    """The S4 block's output (state-spaces/s4, and the S4D, DSS, LRU and Liquid-S4 layers built on it):
    GELU of the SSM's output y (..., d), then a linear map to 2d halved by a GLU: W1 a * sigmoid(W2 a)."""

    def __init__(self, d: int, config):
        super().__init__()
        self.proj = Projection(d, 2 * d, config, residual=True)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.proj(F.gelu(y)), dim=-1)

    def flops_per_token(self) -> int:
        """Forward FLOPs per position: the matmul, the GLU's product (the GELU and sigmoid left out)."""
        return 2 * self.proj.in_features * self.proj.out_features + self.proj.in_features
