"""Long causal convolution by FFT: O(L log L) for a kernel as long as the sequence (S4, DSS, GSS).

A direct depthwise convolution with a length-L kernel costs O(L^2); multiplying spectra costs
O(L log L). Zero padding to at least 2L - 1 turns the FFT's circular convolution into a linear one, so no output
position sees inputs from its future; the padded size is the next 2^a 3^b 5^c (`fft_size`): a size with a large
prime factor (2 x 4,112 = 2^5 x 257, a selective-copying row) takes a slow generic transform: on CPU, one thread,
an rfft and irfft of (32, 64, 4,112) took 0.73 s at 8,224 and 0.26 s at 8,640. Computed in float32 for every
narrower input dtype (float64 inputs stay float64, for oracle comparisons): half-precision FFTs lose the small tail
of long kernels, and cuFFT takes half precision only at power-of-2 sizes.

Documents (seq_idx, see kernels.documents). With resets the operator is block-diagonal Toeplitz: each
document is convolved with the kernel's first len(document) taps, on its own. One FFT of the row cannot do
that, and the exact alternatives were weighed at the shape that matters (Pile rows of 2048 tokens holding 1
to ~50 documents, many short; the kernel as long as L):

(a) FFT of the whole row, then subtract what crossed a boundary. The kernel reaches across the whole row,
    so every earlier document leaks into every later one; removing the leaks is one more convolution per
    document: O(documents x L log L), 50x the FFT.
(b) Chunks of Q: masked Toeplitz products within a chunk (O(L Q)) plus the part from earlier chunks by FFT.
    The earlier-chunk part of step t sums only over t's own document, whose start differs from chunk to
    chunk; with a long kernel that again is one FFT per document that crosses a chunk boundary, and the
    within-chunk masks differ per (row, chunk, channel): O(batch x channels x L x Q) memory to batch them.
(c) Per-document segments (chosen). The documents are gathered into zero-padded slots whose sizes are
    FFT-friendly (16, 24, 32, 48, ... 2^a 3^b below L, and L), slots of one size batched into one FFT of
    twice the slot, and the outputs gathered back. Exact; the FFT work sum_d 2P_d log 2P_d is at most
    about that of the row's FFT (slots add < 50% padding, short documents take small, cheap FFTs), and the
    memory is the row's: the slots hold each position once plus that padding. A batch of one-document
    rows takes the no-reset path itself; on fake tensors (a memory planner's trace) the slots are the rows.
    The cost: the document lengths must be known on the host to size the slots,
    one device sync per call (the plan is cached by seq_idx's contents, so the layers of one step build it
    once), and torch.compile breaks its graph here.

Forward and backward are one autograd Function whose backward is written out (correlations by FFT, and
gathers with the inverse index: deterministic, no atomics); it saves the slots and the kernel spectra only.
Measured on CPU (batch 4, 256 channels, L 2048, fp32 forward + backward, 1 thread, min CPU time of 7; the
2-core machine was shared and busy, so +-25% noise): no resets 0.12-0.18 s; 1 document per row takes the
no-reset path; 8 documents 0.16-0.18 s; 50 documents 0.15 s. Saved for backward 40 MB without resets,
17.5 MB (8) and 11.7 MB (50); peak RSS growth 190-225 MB vs 110-120 MB. Not yet measured on a GPU, where
the sync and the ~4 kernels per slot size (up to ~12 sizes) weigh more than on a CPU.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .documents import check_seq_idx

MIN_SLOT = 16  # shortest slot: below it an FFT is all overhead anyway
_PLANS: OrderedDict = OrderedDict()  # (device, shape, seq_idx bytes) -> _Plan, a few recent ones
_PLANS_KEPT = 8


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution y[b, c, t] = sum_{s <= t} k[c, t - s] * u[b, c, s].

    u (batch, channels, L), k (channels, Lk) with Lk <= L (taps beyond Lk are zero) ->
    y (batch, channels, L) float32 (float64 when u or k is). Differentiable in both arguments. seq_idx (batch, L) integers or None:
    the document of each position (kernels.documents); the sum then runs over s in t's document only
    (`ssmforge.kernels.ref.long_conv_ref`). With seq_idx the host reads the boundaries (one device sync).
    """
    if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1] or k.shape[1] > u.shape[2]:
        raise ValueError(f"fft_causal_conv: u must be (batch, channels, L) and k (channels, <= L); got "
                         f"{tuple(u.shape)} and {tuple(k.shape)}")
    batch, _, L = u.shape
    seq_idx = check_seq_idx(seq_idx, batch, L)
    work = torch.float64 if torch.float64 in (u.dtype, k.dtype) else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        if seq_idx is None:
            return _fft_conv(u.to(work), k.to(work))
        plan = _plan(seq_idx, u.device)
        if plan is None:  # one document per row: the plain convolution is exact
            return _fft_conv(u.to(work), k.to(work))
        return _segmented_conv(u, k.to(work), plan)


def fft_conv_flops(seq_len: int) -> float:
    """Forward FLOPs per channel and position of fft_causal_conv over seq_len positions: a real FFT of the input and
    an inverse one, about 2.5 n log2 n each for n = 2L, so 10 log2(2L) per position, plus 6 for the complex product
    of the spectra (the kernel's own FFT is once per batch and left out)."""
    return 10 * math.log2(2 * max(seq_len, 1)) + 6


def fft_size(P: int) -> int:
    """The smallest 2^a 3^b 5^c >= 2P - 1: the FFT size at which the first P outputs of a circular convolution of two
    length-P sequences equal their linear convolution, with only the radices FFT libraries do fast."""
    need = max(2 * P - 1, 1)
    best = 1 << (need - 1).bit_length()  # the power of 2
    fives = 1
    while fives < best:
        odd = fives  # 3^b 5^c
        while odd < best:
            best = min(best, odd << ((need - 1) // odd).bit_length())  # odd x the least 2^a reaching need
            odd *= 3
        fives *= 5
    return best


def _fft_conv(u: torch.Tensor, k: torch.Tensor, channel_dim: int = -2) -> torch.Tensor:
    """Causal convolution of every length-P row of u (float32, channels at channel_dim) with its channel's
    k (channels, <= P), by FFTs of fft_size(P) (zero padding: no wrap-around)."""
    P = u.shape[-1]
    n = fft_size(P)
    u_f = torch.fft.rfft(u, n=n)  # (..., n // 2 + 1) complex
    k_f = torch.fft.rfft(k[:, :P], n=n)  # (channels, n // 2 + 1)
    if channel_dim != -2:
        k_f = k_f.view(k_f.shape[0], *([1] * (-channel_dim - 2)), n // 2 + 1)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :P]


@dataclass
class _Plan:
    """Where each document goes. Slots (channels, S): buckets of `count` slots of `size` steps, one after
    the other; gather (S,): the flat position (b * L + t) each slot step reads, b * L for padding;
    scatter (b * L,): the slot step holding each position (so gather[scatter] is the identity)."""
    buckets: list[tuple[int, int]]  # (size, count), sizes increasing
    gather: torch.Tensor
    scatter: torch.Tensor


def slot_sizes(L: int) -> list[int]:
    """The slot sizes for rows of L: 2^a 3^b from MIN_SLOT (16, 24, 32, 48, ...) below L, then L itself
    (a document as long as the row takes the row's FFT)."""
    sizes = sorted({m << i for m in (2, 3) for i in range(3, max(L, MIN_SLOT).bit_length() + 1)})
    return [s for s in sizes if MIN_SLOT <= s < L] + [L]


def _plan(seq_idx: torch.Tensor, device: torch.device) -> _Plan | None:
    """The slot plan of seq_idx (batch, L), or None when every row is one document."""
    batch, L = seq_idx.shape
    from torch._guards import detect_fake_mode

    if detect_fake_mode((seq_idx,)) is not None:
        # tracing on fake tensors (a memory planner): no values to plan from; one document per row has the
        # real path's buffers (the slots are the rows)
        n = batch * L
        return _Plan([(L, batch)], torch.zeros(n, dtype=torch.long, device=device),
                     torch.zeros(n, dtype=torch.long, device=device))
    seq = seq_idx.cpu()  # the one sync
    key = (str(device), batch, L, seq.numpy().tobytes())
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    plan = _build_plan(seq, device)
    _PLANS[key] = plan
    if len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def _build_plan(seq: torch.Tensor, device: torch.device) -> _Plan | None:
    batch, L = seq.shape
    n = batch * L
    starts = torch.ones(batch, L, dtype=torch.bool)
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]  # a row always starts a document
    starts = starts.reshape(-1)
    start = starts.nonzero().squeeze(1)  # (documents,) flat positions
    if start.numel() == batch:
        return None
    length = torch.diff(start, append=torch.tensor([n]))
    sizes = torch.tensor(slot_sizes(L))
    bucket = torch.searchsorted(sizes, length)  # the smallest slot that holds the document
    size = sizes[bucket]
    order = torch.argsort(bucket, stable=True)  # documents by slot size
    doc_base = torch.empty_like(start)
    doc_base[order] = torch.cumsum(size[order], 0) - size[order]  # first slot step of each document
    doc = torch.cumsum(starts.long(), 0) - 1  # (b * L,) the document of each position
    scatter = doc_base[doc] + torch.arange(n) - start[doc]
    gather = torch.full((int(size.sum()),), n, dtype=torch.long)
    gather[scatter] = torch.arange(n)
    counts = torch.bincount(bucket, minlength=len(sizes)).tolist()
    buckets = [(s, c) for s, c in zip(sizes.tolist(), counts) if c]
    return _Plan(buckets, gather.to(device, non_blocking=True), scatter.to(device, non_blocking=True))


def _segmented_conv(u: torch.Tensor, k: torch.Tensor, plan: _Plan) -> torch.Tensor:
    return _SegmentedConv.apply(u, k, plan.gather, plan.scatter, plan.buckets)


def _flat_with_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (batch, channels, L) -> (channels, batch * L + 1) of `dtype`, the last column zero (what padding reads)."""
    batch, channels, L = x.shape
    flat = x.new_empty(channels, batch * L + 1, dtype=dtype)
    flat[:, :-1].view(channels, batch, L).copy_(x.transpose(0, 1))
    flat[:, -1] = 0
    return flat


class _SegmentedConv(torch.autograd.Function):
    """u (batch, channels, L), k (channels, Lk) float32 -> y (batch, channels, L) float32, per document.

    Forward: gather the documents into slots, per bucket y = irfft(rfft(u) rfft(k))[:size], gather back.
    Backward by the adjoints, without autograd's generic FFT backward (a complex transform of the full
    spectrum each): du = irfft(rfft(dy) conj(rfft(k))) (a correlation), dk = irfft(sum over slots of
    rfft(dy) conj(rfft(u))), truncated; zero padding to fft_size(slot) keeps both free of wrap-around. The
    gathers' adjoints are gathers with the other index. Saves the kernel spectra and the slots (the
    document spectra are recomputed: half the memory of saving them, one real FFT more)."""

    @staticmethod
    def forward(ctx, u, k, gather, scatter, buckets):
        batch, channels, L = u.shape
        slots = _flat_with_zero(u, k.dtype).index_select(1, gather)  # (channels, S)
        spectra = [torch.fft.rfft(k[:, :size], n=fft_size(size)) for size, _ in buckets]
        outs = []
        for segment, K, (size, count) in zip(_by_bucket(slots, buckets), spectra, buckets):
            n = fft_size(size)
            y_f = torch.fft.rfft(segment, n=n) * K[:, None]
            outs.append(torch.fft.irfft(y_f, n=n)[..., :size].reshape(channels, count * size))
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(slots, gather, scatter, *spectra)
        ctx.buckets, ctx.shape, ctx.dtype, ctx.Lk = buckets, u.shape, u.dtype, k.shape[1]
        return out.index_select(1, scatter).view(channels, batch, L).transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        slots, gather, scatter, *spectra = ctx.saved_tensors
        batch, channels, L = ctx.shape
        g = _flat_with_zero(dy, slots.dtype).index_select(1, gather)  # slot gradients, padding zero
        dus, dk = [], g.new_zeros(channels, ctx.Lk) if ctx.needs_input_grad[1] else None
        for segment, slot, K, (size, count) in zip(_by_bucket(g, ctx.buckets), _by_bucket(slots, ctx.buckets),
                                                   spectra, ctx.buckets):
            n = fft_size(size)
            G = torch.fft.rfft(segment, n=n)  # (channels, count, n // 2 + 1)
            if ctx.needs_input_grad[0]:
                dus.append(torch.fft.irfft(G * K.conj()[:, None], n=n)[..., :size].reshape(channels, -1))
            if dk is not None:
                taps = min(size, ctx.Lk)
                U = torch.fft.rfft(slot, n=n)
                dk[:, :taps] += torch.fft.irfft((G * U.conj()).sum(1), n=n)[:, :taps]
        du = None
        if dus:
            du = (torch.cat(dus, 1) if len(dus) > 1 else dus[0]).index_select(1, scatter)
            du = du.view(channels, batch, L).transpose(0, 1).to(ctx.dtype)
        return du, dk, None, None, None


def _by_bucket(slots: torch.Tensor, buckets) -> list[torch.Tensor]:
    """slots (channels, S) -> a (channels, count, size) view per bucket."""
    channels = slots.shape[0]
    return [part.view(channels, count, size)
            for part, (size, count) in zip(slots.split([s * c for s, c in buckets], dim=1), buckets)]
