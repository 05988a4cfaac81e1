"""The GPU acceptance check (`make gpu-check`): what only a GPU can show, in under 8 minutes on one of them.

  kernels     every kernel (selective scan, SSD, causal conv1d, FFT conv, Vandermonde, Cauchy) on the GPU against
              its oracle (`ssmforge.kernels.ref`, the sequential definition; a direct conv for the FFT conv; the
              Vandermonde powers in float64; the Cauchy sums in float64, as S4 runs them): the outputs
              and every gradient, fp32 and bf16, L up to 8192, d up to 2048, batch up to 8, packed rows with
              document resets (seq_idx, data.document_boundaries=reset), gates and activations fed inputs
              of +-300 (sigmoid's exp(-x) overflows float32 below -88.7), and one bf16 shape
              past 2^31 elements per tensor where memory allows (its last batch row, whose offsets overflow
              int32, against the oracle on that row alone)
  bandwidth   the scan, SSD and conv kernels timed, as GB/s of the bytes a fused kernel must move and as a
              fraction of the device's bandwidth, measured as a large device-to-device copy
  train_step  one bf16 training step of the Mamba-130M and -370M recipes through DeepSpeed, as `ssmforge
              pretrain` builds it (micro-batch 8, no accumulation): tokens/s, MFU, peak memory, beside the
              `ssmforge plan` estimate of the same step
  resume      configs/tiny.yaml trained 8 steps straight, and stopped at step 4 (train.stop_at_step) then
              resumed, in fp32: the losses of every step of both runs must agree

Each part has a time budget (BUDGET_S, times --budget-scale); a part past it skips its remaining cases with a
note. Targets are printed with ok / not ok; the exit code is 1 when a kernel disagrees with its oracle or the
resumed losses differ, else 0 (performance targets are reported, not enforced). Writes
benchmarks/results/gpu/gpu_check.json and summary.md.

    make gpu-check                                           # the whole check on a CUDA machine
    python benchmarks/gpu_check.py --parts kernels resume    # some parts only
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/check   # every part at tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("kernels", "bandwidth", "train_step", "resume")
BUDGET_S = {"kernels": 210, "bandwidth": 45, "train_step": 150, "resume": 60}  # 465 s: 8 minutes with a margin
TOTAL_S = 480
TARGETS = {"scan_bandwidth_fraction": 0.70, "mfu_370m": 0.40}
# max error / the oracle's max magnitude (tests: 1e-4, 3e-2 at L 37); float64: S4's Cauchy sums
TOL = {torch.float32: 5e-4, torch.bfloat16: 5e-2, torch.float64: 1e-9}
RESUME_TOL = {"cuda": 1e-4, "cpu": 1e-6}  # GPU backward kernels accumulate with atomics: not bit-reproducible
FAST = {"cuda": {"scan": "triton", "ssd": "triton", "conv1d": "triton", "fftconv": "torch", "vandermonde": "triton",
                 "cauchy": "triton", "linear_scan": "triton"},
        "cpu": {"scan": "cpu", "ssd": "torch", "conv1d": "cpu", "fftconv": "torch", "vandermonde": "ref",
                "cauchy": "ref", "linear_scan": "ref"}}
INT32_ELEMENTS = 2**31


class Budget:
    """A part's deadline, cut short by the whole check's."""

    def __init__(self, seconds: float, overall_deadline: float):
        self.deadline = min(time.monotonic() + seconds, overall_deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def over(self) -> bool:
        return self.left() <= 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- kernels


def _randn(shape, device, dtype, generator, scale=1.0):
    return (torch.randn(shape, device=device, generator=generator) * scale).to(dtype)


def _documents(shape: dict, device, generator) -> dict:
    """{"seq_idx": (batch, L) int32} with shape["docs"] documents per row, their boundaries at random
    positions plus shape["edges"] (a chunk edge, where a kernel's own state passing meets the reset);
    {} for rows of one document."""
    if "docs" not in shape:
        return {}
    b, L, docs, edges = shape["batch"], shape["L"], shape["docs"], list(shape.get("edges", ()))
    assert docs - 1 >= len(edges), shape
    candidates = torch.tensor([t for t in range(1, L) if t not in edges], device=device)
    rows = []
    for _ in range(b):
        picks = candidates[torch.randperm(len(candidates), device=device, generator=generator)[: docs - 1 - len(edges)]]
        starts = torch.zeros(L, dtype=torch.int32, device=device)
        starts[picks] = 1
        starts[edges] = 1
        rows.append(torch.cumsum(starts, 0, dtype=torch.int32))
    return {"seq_idx": torch.stack(rows)}


def scan_inputs(shape: dict, dtype, device, generator) -> dict:
    """Mamba's selective scan: u, delta, z (batch, d, L); B, C (batch, n, L) or (batch, groups, n, L); A (d, n),
    D and delta_bias (d,) in fp32 as in the model. shape["scale"] multiplies z and delta: at 100 the z gate's
    sigmoid and delta's softplus see inputs far below -88.7, where exp(-x) overflows float32."""
    b, d, L, n, groups = shape["batch"], shape["d"], shape["L"], shape["n"], shape.get("groups")
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    scale = shape.get("scale", 1.0)
    return dict(u=_randn((b, d, L), device, dtype, generator),
                delta=_randn((b, d, L), device, dtype, generator, 0.5 * scale),
                A=-(torch.rand(d, n, device=device, generator=generator) * 2 + 0.1),
                B=_randn(bc, device, dtype, generator), C=_randn(bc, device, dtype, generator),
                D=_randn(d, device, torch.float32, generator), z=_randn((b, d, L), device, dtype, generator, scale),
                delta_bias=_randn(d, device, torch.float32, generator, 0.3), **_documents(shape, device, generator))


def ssd_inputs(shape: dict, dtype, device, generator) -> dict:
    """Mamba-2's SSD: x (batch, L, heads, headdim); dt (batch, L, heads); B, C (batch, L, groups, n); A, D,
    dt_bias (heads,) and the initial state (batch, heads, headdim, n) in fp32."""
    b, L, h, p, g, n = (shape[k] for k in ("batch", "L", "heads", "headdim", "groups", "n"))
    return dict(x=_randn((b, L, h, p), device, dtype, generator), dt=_randn((b, L, h), device, dtype, generator, 0.5),
                A=-(torch.rand(h, device=device, generator=generator) * 2 + 0.1),
                B=_randn((b, L, g, n), device, dtype, generator), C=_randn((b, L, g, n), device, dtype, generator),
                D=_randn(h, device, torch.float32, generator), dt_bias=_randn(h, device, torch.float32, generator, 0.3),
                initial_state=_randn((b, h, p, n), device, torch.float32, generator), **_documents(shape, device, generator))


def conv_inputs(shape: dict, dtype, device, generator) -> dict:
    """shape["scale"] multiplies x: at 100 the SiLU's pre-activations reach far below -88.7 (see scan_inputs)."""
    b, d, L, width = shape["batch"], shape["d"], shape["L"], shape["width"]
    x = _randn((b, d, L), device, dtype, generator, shape.get("scale", 1.0))
    return dict(x=x, weight=_randn((d, width), device, dtype, generator, 0.5),
                bias=_randn(d, device, dtype, generator), **_documents(shape, device, generator))


def fft_inputs(shape: dict, dtype, device, generator) -> dict:
    b, c, L = shape["batch"], shape["d"], shape["L"]
    decay = torch.exp(-torch.arange(L, device=device) / (L / 8))  # a long kernel with a tail, as S4's
    return dict(u=_randn((b, c, L), device, dtype, generator), k=_randn((c, L), device, torch.float32, generator) * decay,
                **_documents(shape, device, generator))


def vandermonde_inputs(shape: dict, dtype, device, generator) -> dict:
    """A diagonal SSM's parameters as S4D-Lin starts them (dt log-uniform in [0.001, 0.1], modes -1/2 + i pi n),
    as (H, N, 2) real pairs, and w complex normal; float32 whatever `dtype` (the models keep them so)."""
    H, N = shape["H"], shape["N"]
    dt = torch.exp(torch.rand(H, 1, device=device, generator=generator) * math.log(100.0) + math.log(1e-3))
    modes = torch.stack([torch.full((N,), -0.5, device=device), math.pi * torch.arange(N, device=device)], -1)
    return dict(w=_randn((H, N, 2), device, torch.float32, generator), dt_lam=dt[..., None] * modes,
                positions=torch.arange(shape["L"], device=device))


def cauchy_inputs(shape: dict, dtype, device, generator) -> dict:
    """S4's Cauchy sums as models.s4 forms them: four numerator rows, HiPPO-like poles (real parts below -0.5),
    dt log-uniform in [0.001, 0.1] (the nodes and scales come from it and K = L/2 + 1 in `_s4_nodes`), as real
    pairs in float64 whatever `dtype` (S4 builds its kernel in float64)."""
    H, N = shape["H"], shape["N"]
    f64 = dict(device=device, dtype=torch.float64)
    poles = torch.stack([-0.5 - torch.rand(H, N, generator=generator, **f64),
                         10 * torch.randn(H, N, generator=generator, **f64)], -1)
    dt = torch.exp(torch.rand(H, generator=generator, **f64) * math.log(100.0) + math.log(1e-3))
    return dict(numerators=torch.randn(H, 4, N, 2, generator=generator, **f64), poles=poles, dt=dt,
                nodes=torch.arange(shape["K"], device=device))


def _s4_nodes(i):
    """S4's nodes and scales (models.s4.bilinear_nodes) for the K = L/2 + 1 nodes of an even length L."""
    from ssmforge.models.s4_bilinear import bilinear_nodes

    return bilinear_nodes(i["dt"], 2 * (i["nodes"].numel() - 1))


def _cauchy(backend):
    from ssmforge import kernels

    def run(i):
        nodes, scales = _s4_nodes(i)
        sums = kernels.cauchy(torch.view_as_complex(i["numerators"]), torch.view_as_complex(i["poles"]), nodes,
                              scales, backend=backend)
        return {"sums": torch.view_as_real(sums)}

    return run


def _cauchy_oracle(i):
    """The sums pole by pole: no (H, K, N) resolvent, and another order of additions than either backend's."""
    nodes, scales = _s4_nodes(i)
    numerators, poles = torch.view_as_complex(i["numerators"]), torch.view_as_complex(i["poles"])
    sums = sum(numerators[:, :, n, None] / (nodes - scales * poles[:, n, None])[:, None, :]
               for n in range(poles.shape[1]))
    return {"sums": torch.view_as_real(sums)}


def linear_scan_inputs(shape: dict, dtype, device, generator) -> dict:
    """The LRU's scan: a = lambda on the ring 0.9 <= |lambda| <= 0.999 (long memories), one row for the batch when
    shape["shared"], else per row and 0 where a document starts (shape["docs"]); b complex normal; complex64 as
    (..., 2) real pairs whatever `dtype` (the LRU keeps its recurrence so)."""
    batch, L, N = shape["batch"], shape["L"], shape["N"]
    radius = 0.9 + 0.099 * torch.rand(N, device=device, generator=generator)
    phase = 2 * math.pi * torch.rand(N, device=device, generator=generator)
    lam = torch.polar(radius, phase).expand(1 if shape.get("shared") else batch, L, N).clone()
    documents = _documents(shape, device, generator)
    if documents:  # as models/lru.py cuts the recurrence at a document start
        from ssmforge.kernels.documents import document_starts

        lam = lam * (~document_starts(documents["seq_idx"]))[..., None]
    return dict(a=torch.view_as_real(lam).contiguous(), b=_randn((batch, L, N, 2), device, torch.float32, generator))


def _linear_scan(backend):
    from ssmforge import kernels

    return lambda i: {"x": torch.view_as_real(kernels.linear_scan(torch.view_as_complex(i["a"]),
                                                                  torch.view_as_complex(i["b"]), backend))}


def _linear_scan_oracle(i):
    """The recurrence one position at a time, in complex128."""
    a, b = (torch.view_as_complex(i[k].double()) for k in ("a", "b"))
    x, states = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        x = a[:, t] * x + b[:, t]
        states.append(x)
    return {"x": torch.view_as_real(torch.stack(states, 1))}


def _scan(backend):
    from ssmforge import kernels

    return lambda i: dict(zip(("out", "last_state"), kernels.selective_scan(
        **i, delta_softplus=True, return_last_state=True, backend=backend)))


def _scan_oracle(i):
    from ssmforge.kernels import selective_scan_ref

    return dict(zip(("out", "last_state"), selective_scan_ref(**i, delta_softplus=True, return_last_state=True)))


def _ssd(backend, chunk):
    from ssmforge import kernels

    return lambda i: dict(zip(("y", "final_state"), kernels.ssd_scan(
        **i, chunk_size=chunk, dt_softplus=True, return_final_state=True, backend=backend)))


def _ssd_oracle(i):
    from ssmforge.kernels import ssd_scan_ref

    return dict(zip(("y", "final_state"), ssd_scan_ref(**i, dt_softplus=True, return_final_state=True)))


def _conv(backend):
    from ssmforge import kernels

    return lambda i: {"out": kernels.causal_conv1d(i["x"], i["weight"], i["bias"], activation="silu", backend=backend,
                                                   seq_idx=i.get("seq_idx"))}


def _conv_oracle(i):
    from ssmforge.kernels import causal_conv1d_ref

    # in fp32 whatever the inputs: the definition, not torch's bf16 conv
    return {"out": causal_conv1d_ref(i["x"].float(), i["weight"].float(), i["bias"].float(), activation="silu",
                                     seq_idx=i.get("seq_idx"))}


def _fft(backend):
    from ssmforge.kernels.fftconv import fft_causal_conv

    return lambda i: {"out": fft_causal_conv(i["u"], i["k"], seq_idx=i.get("seq_idx"))}


def _fft_oracle(i):
    from ssmforge.kernels import causal_conv1d_ref

    # the direct O(L^2) sum: torch's conv computes a correlation, so the kernel is flipped
    return {"out": causal_conv1d_ref(i["u"].float(), i["k"].flip(-1), seq_idx=i.get("seq_idx"))}


def _vandermonde(backend):
    from ssmforge import kernels

    return lambda i: {"K": kernels.vandermonde(torch.view_as_complex(i["w"]), torch.view_as_complex(i["dt_lam"]),
                                               i["positions"].numel(), backend=backend)}


def _vandermonde_oracle(i):
    from ssmforge.kernels import vandermonde_ref

    # the powers in float64: the definition, not float32's rounding of the phase b l
    w, dt_lam = (torch.view_as_complex(i[k].double()) for k in ("w", "dt_lam"))
    return {"K": vandermonde_ref(w, dt_lam, i["positions"].numel())}


# per kernel: inputs, the fast path (by backend name), the oracle, and which inputs have a batch dimension
KERNELS = {
    "scan": dict(inputs=scan_inputs, fast=lambda backend, tiny: _scan(backend), oracle=_scan_oracle,
                 batched={"u", "delta", "B", "C", "z", "seq_idx"}),
    "ssd": dict(inputs=ssd_inputs, fast=lambda backend, tiny: _ssd(backend, 16 if tiny else 256), oracle=_ssd_oracle,
                batched={"x", "dt", "B", "C", "initial_state", "seq_idx"}),
    "conv1d": dict(inputs=conv_inputs, fast=lambda backend, tiny: _conv(backend), oracle=_conv_oracle,
                   batched={"x", "seq_idx"}),
    "fftconv": dict(inputs=fft_inputs, fast=lambda backend, tiny: _fft(backend), oracle=_fft_oracle,
                    batched={"u", "seq_idx"}),
    # the diagonal SSMs' parameters stay float32 under bf16 training: one dtype
    "vandermonde": dict(inputs=vandermonde_inputs, fast=lambda backend, tiny: _vandermonde(backend),
                        oracle=_vandermonde_oracle, batched=set(), dtypes=(torch.float32,)),
    "cauchy": dict(inputs=cauchy_inputs, fast=lambda backend, tiny: _cauchy(backend), oracle=_cauchy_oracle,
                   batched=set(), dtypes=(torch.float64,)),
    "linear_scan": dict(inputs=linear_scan_inputs, fast=lambda backend, tiny: _linear_scan(backend),
                        oracle=_linear_scan_oracle, batched={"a", "b"}, dtypes=(torch.float32,)),
}


def kernel_cases(tiny: bool) -> list[dict]:
    """(kernel, label, shape, dtypes, big): `big` cases are past 2^31 elements (on a GPU) and compare the last
    batch row only."""
    both = (torch.float32, torch.bfloat16)
    if tiny:
        cases = [("scan", "edge", dict(batch=2, d=6, L=37, n=5)),
                 ("scan", "grouped", dict(batch=2, d=8, L=37, n=5, groups=2)),
                 ("ssd", "edge", dict(batch=1, L=37, heads=2, headdim=8, groups=1, n=5)),
                 ("conv1d", "edge", dict(batch=2, d=20, L=70, width=4)),
                 ("conv1d", "width 3", dict(batch=2, d=20, L=70, width=3)),
                 ("fftconv", "edge", dict(batch=2, d=3, L=33)),
                 # packed rows (data.document_boundaries=reset): a reset on the SSD's chunk edge at 16
                 ("scan", "documents", dict(batch=2, d=6, L=37, n=5, docs=4)),
                 ("ssd", "documents", dict(batch=2, L=37, heads=2, headdim=8, groups=1, n=5, docs=4, edges=(16,))),
                 ("conv1d", "documents", dict(batch=2, d=20, L=70, width=4, docs=5)),
                 ("fftconv", "documents", dict(batch=2, d=3, L=33, docs=3)),
                 # gates far below exp's float32 range (a CPU build once gave NaN there)
                 ("scan", "extreme", dict(batch=2, d=6, L=37, n=5, scale=100.0)),
                 ("conv1d", "extreme", dict(batch=2, d=20, L=70, width=4, scale=100.0)),
                 ("vandermonde", "edge", dict(H=3, N=37, L=200)),
                 ("cauchy", "edge", dict(H=3, N=37, K=70)),
                 ("linear_scan", "edge", dict(batch=2, L=70, N=37)),
                 ("linear_scan", "shared", dict(batch=2, L=70, N=37, shared=True)),
                 ("linear_scan", "documents", dict(batch=2, L=70, N=37, docs=4))]
        big = [("scan", dict(batch=3, d=6, L=37, n=5)), ("ssd", dict(batch=3, L=37, heads=2, headdim=8, groups=1, n=5)),
               ("conv1d", dict(batch=3, d=20, L=70, width=4))]
    else:
        cases = [("scan", "edge", dict(batch=2, d=72, L=1000, n=16)),
                 ("scan", "long", dict(batch=2, d=256, L=8192, n=16)),
                 ("scan", "wide", dict(batch=8, d=2048, L=2048, n=16)),
                 ("scan", "grouped", dict(batch=2, d=512, L=2048, n=16, groups=4)),
                 ("ssd", "edge", dict(batch=2, L=1000, heads=4, headdim=64, groups=1, n=64)),
                 ("ssd", "long", dict(batch=1, L=8192, heads=8, headdim=64, groups=1, n=128)),
                 ("ssd", "wide", dict(batch=8, L=2048, heads=32, headdim=64, groups=2, n=64)),
                 ("conv1d", "edge", dict(batch=2, d=72, L=1000, width=4)),
                 ("conv1d", "width 2", dict(batch=2, d=72, L=1000, width=2)),
                 ("conv1d", "width 3", dict(batch=2, d=72, L=1000, width=3)),
                 ("conv1d", "long", dict(batch=2, d=256, L=8192, width=4)),
                 ("conv1d", "wide", dict(batch=8, d=2048, L=2048, width=4)),
                 ("fftconv", "edge", dict(batch=2, d=64, L=1000)),
                 ("fftconv", "long", dict(batch=2, d=256, L=8192)),
                 # packed rows (data.document_boundaries=reset): resets inside tiles and on the SSD's chunk edge
                 ("scan", "documents", dict(batch=4, d=256, L=2048, n=16, docs=8)),
                 ("ssd", "documents", dict(batch=4, L=2048, heads=8, headdim=64, groups=1, n=64, docs=8, edges=(256,))),
                 ("conv1d", "documents", dict(batch=4, d=256, L=2048, width=4, docs=8)),
                 ("fftconv", "documents", dict(batch=2, d=64, L=2048, docs=8)),
                 # the z gate's sigmoid, delta's softplus and the conv's SiLU far below exp's float32 range
                 ("scan", "extreme", dict(batch=2, d=72, L=1000, n=16, scale=100.0)),
                 ("conv1d", "extreme", dict(batch=2, d=72, L=1000, width=4, scale=100.0)),
                 # S4D's, DSS's and H3's kernel (N/2 modes of d_state 64), and GSS's (d_state 512 at L 8192)
                 ("vandermonde", "edge", dict(H=72, N=37, L=1000)),
                 ("vandermonde", "wide", dict(H=2048, N=32, L=2048)),
                 ("vandermonde", "long", dict(H=32, N=512, L=8192)),
                 # S4's (N 64 at L 2048 and 8192)
                 ("cauchy", "edge", dict(H=72, N=37, K=70)),
                 ("cauchy", "wide", dict(H=2048, N=64, K=1025)),
                 ("cauchy", "long", dict(H=256, N=64, K=4097)),
                 # the LRU's (d_state 256; one lambda for the batch, or zeros at document starts)
                 ("linear_scan", "edge", dict(batch=2, L=1000, N=37)),
                 ("linear_scan", "shared", dict(batch=8, L=2048, N=256, shared=True)),
                 ("linear_scan", "long", dict(batch=2, L=8192, N=256, shared=True)),
                 ("linear_scan", "documents", dict(batch=4, L=2048, N=256, docs=8))]
        # 129 x 2048 x 8192 = 2.16e9 elements per (batch, d, L) tensor: past int32 offsets from batch 128 on
        big = [("scan", dict(batch=129, d=2048, L=8192, n=16)),
               ("ssd", dict(batch=129, L=8192, heads=32, headdim=64, groups=1, n=64)),
               ("conv1d", dict(batch=129, d=2048, L=8192, width=4))]
    out = [dict(kernel=k, label=label, shape=shape, dtype=dtype, big=False) for k, label, shape in cases
           for dtype in KERNELS[k].get("dtypes", both)]
    out += [dict(kernel=k, label="int32" if not tiny else "last row", shape=shape, dtype=torch.bfloat16, big=True)
            for k, shape in big]
    return out


def _weights(t: torch.Tensor, wave) -> torch.Tensor:
    """Output gradients that weigh every element differently, so a misplaced or swapped gradient cannot cancel."""
    return wave(torch.arange(t.numel(), device=t.device, dtype=torch.float32)).view(t.shape).to(t.dtype)


def values_and_grads(run, inputs: dict, weights=None) -> tuple[dict, dict]:
    """The outputs of run(inputs) and the gradients of every input for output gradients `weights`: a dict, a
    function of the outputs making one, or None for cos on the first output and sin on the others.
    Returns (outputs and `d<input>` gradients, the weights used)."""
    outputs = run(inputs)
    if weights is None:
        weights = {name: _weights(t, torch.cos if i == 0 else torch.sin) for i, (name, t) in enumerate(outputs.items())}
    elif callable(weights):
        weights = weights(outputs)
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(list(outputs.values()), [inputs[k] for k in names],
                                grad_outputs=[weights[k].to(t.dtype) for k, t in outputs.items()])
    results = {k: v.detach() for k, v in outputs.items()}
    del outputs
    results.update({f"d{k}": g for k, g in zip(names, grads)})
    return results, weights


def compare(got: dict, want: dict, tol: float) -> dict:
    """Per tensor: max |got - want| / max |want| (and whether it is within tol); a wrong shape or a non-finite
    value is an error."""
    errors, ok = {}, True
    for name in want:
        g, w = got.get(name), want[name]
        if g is None or g.shape != w.shape:
            errors[name] = f"shape {None if g is None else tuple(g.shape)} != {tuple(w.shape)}"
            ok = False
            continue
        precision = torch.float64 if torch.float64 in (g.dtype, w.dtype) else torch.float32  # S4's Cauchy sums
        g, w = g.to(precision), w.to(precision)
        if not bool(torch.isfinite(g).all()):
            errors[name], ok = "non-finite values", False
            continue
        rel = (g - w).abs().max().item() / (w.abs().max().item() + 1e-6)
        errors[name] = rel
        ok = ok and rel <= tol
    return dict(ok=ok, errors=errors)


def _requiring_grad(inputs: dict) -> dict:
    """The float inputs as leaves requiring gradients; seq_idx (integers) as it is."""
    return {k: (v.detach().requires_grad_() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}


def check_case(case: dict, device: torch.device, tiny: bool) -> dict:
    spec, dtype = KERNELS[case["kernel"]], case["dtype"]
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = _requiring_grad(spec["inputs"](case["shape"], dtype, device, generator))
    fast = spec["fast"](FAST[device.type][case["kernel"]], tiny)
    if not case["big"]:
        got, weights = values_and_grads(fast, inputs)
        want, _ = values_and_grads(spec["oracle"], inputs, weights)
        return compare(got, want, TOL[dtype])
    # the last batch row of a large batch: output gradients only there, the oracle on that row alone
    row = _requiring_grad({k: (v[-1:] if k in spec["batched"] else v) for k, v in inputs.items()})
    want, row_weights = values_and_grads(spec["oracle"], row)

    def last_row_only(outputs):
        weights = {}
        for name, t in outputs.items():  # every output has the batch first
            weights[name] = torch.zeros_like(t)
            weights[name][-1:] = row_weights[name].to(t.dtype)
        return weights

    got, _ = values_and_grads(fast, inputs, last_row_only)
    batched = set(row_weights) | {f"d{k}" for k in spec["batched"]}
    return compare({k: (v[-1:] if k in batched else v) for k, v in got.items()}, want, TOL[dtype])


def _big_case_bytes(case: dict) -> int:
    """A generous estimate of a big case's memory, in bytes per element of one (batch, d, L) tensor: the bf16
    inputs, outputs and output gradients, the backward kernels' fp32 gradients and their bf16 copies."""
    s = case["shape"]
    elements = s["batch"] * s["L"] * (s["d"] if "d" in s else s["heads"] * s["headdim"])
    return 40 * elements


def run_kernels(device: torch.device, tiny: bool, budget: Budget) -> dict:
    rows = []
    for case in kernel_cases(tiny):
        dtype_name = str(case["dtype"]).replace("torch.", "")
        row = dict(kernel=case["kernel"], backend=FAST[device.type][case["kernel"]], case=case["label"],
                   dtype=dtype_name, shape=case["shape"], tol=TOL[case["dtype"]])
        shape = case["shape"]
        if case["big"]:
            elements = shape["batch"] * shape["L"] * (shape.get("d") or shape["heads"] * shape["headdim"])
            row["elements_per_tensor"] = elements
            row["past_int32"] = elements > INT32_ELEMENTS
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if free < _big_case_bytes(case):
                    row.update(status="skipped", note=f"needs ~{_big_case_bytes(case) / 2**30:.0f} GiB, "
                                                      f"{free / 2**30:.0f} GiB free")
                    rows.append(row)
                    continue
        if budget.over():
            row.update(status="skipped", note="over the part's time budget")
            rows.append(row)
            continue
        start = time.perf_counter()
        try:
            result = check_case(case, device, tiny)
            row.update(status="ok" if result["ok"] else "FAILED", errors=result["errors"])
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="skipped", note=f"out of memory: {str(e).splitlines()[0][:200]}")
        except Exception as e:  # noqa: BLE001 - a kernel that raises is a failed check, reported with the others
            row.update(status="FAILED", errors={"exception": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                                if str(e) else type(e).__name__})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - start, 2)
        worst = max((v for v in row.get("errors", {}).values() if isinstance(v, float)), default=float("nan"))
        print(f"  {row['kernel']:8} {row['case']:9} {dtype_name:9} {row['status']:8} worst error {worst:.2e} "
              f"(tol {row['tol']:.0e})  {row['seconds']:.1f}s" + (f"  {row.get('note', '')}" if "note" in row else ""),
              flush=True)
        rows.append(row)
    failed = [r for r in rows if r["status"] == "FAILED"]
    timed_out = [r for r in rows if r.get("note") == "over the part's time budget"]
    return dict(cases=rows, passed=sum(r["status"] == "ok" for r in rows), failed=len(failed),
                skipped=sum(r["status"] == "skipped" for r in rows), all_match=not failed and not timed_out)


# -------------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth_GBps(device: torch.device, tiny: bool) -> float:
    """Achievable memory bandwidth: the best of large copies (read + write)."""
    from benchmarks.scan import timed

    x = torch.empty((2**20 if tiny else 2**28), device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 3 if tiny else 10, device.type, min_total_s=0.1 if tiny else 1.0)
    return 2 * x.numel() * 4 / seconds / 1e9


def _time_fwd_bwd(run, inputs: dict, device: torch.device, repeats: int, min_total_s: float) -> tuple[float, float]:
    """Best seconds of run(inputs) (one output tensor) forward, and forward + backward."""
    from benchmarks.scan import timed

    def fwd():
        with torch.no_grad():
            run(inputs)

    def fwd_bwd():
        out = run(inputs)
        out.backward(torch.ones_like(out))

    return (timed(fwd, repeats, device.type, min_total_s=min_total_s),
            timed(fwd_bwd, repeats, device.type, min_total_s=min_total_s))


def _only_output(run):
    """run(inputs) -> {name: tensor} as the one output tensor the timer wants."""
    return lambda i: next(iter(run(i).values()))


def _vandermonde_kernel(backend):
    """The kernel as models.diagonal builds it on `backend` ("ref": the powers in blocks of channels)."""
    from ssmforge.models.config import ModelConfig
    from ssmforge.models.diagonal import vandermonde_kernel
    from ssmforge.models.layers import kernel_block_bytes

    block_bytes = kernel_block_bytes(ModelConfig())  # the default block, as a model builds it
    return lambda i: vandermonde_kernel(torch.view_as_complex(i["w"]), torch.view_as_complex(i["dt_lam"]),
                                        i["positions"].numel(), backend, block_bytes=block_bytes)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_bandwidth(device: torch.device, tiny: bool, budget: Budget) -> dict:
    from benchmarks.scan import fused_bytes, measure
    from ssmforge import kernels

    peak = copy_bandwidth_GBps(device, tiny)
    repeats, min_s = (1, 0.0) if tiny else (5, 0.5)
    rows, backends = [], FAST[device.type]
    print(f"  copy bandwidth {peak:.0f} GB/s", flush=True)

    def record(row):
        row["fwd_frac_bw"], row["fwd_bwd_frac_bw"] = row["fwd_GBps"] / peak, row["fwd_bwd_GBps"] / peak
        print(f"  {row['kernel']:7} {str(row['shape']):60} fwd {row['fwd_ms']:8.3f} ms {100 * row['fwd_frac_bw']:5.1f}%"
              f"  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {100 * row['fwd_bwd_frac_bw']:5.1f}% of copy bandwidth", flush=True)
        rows.append(row)

    # the scan, as benchmarks/scan.py times it (fp32 inputs, Mamba's options)
    for L in ((64, 128) if tiny else (2048, 8192)):
        if budget.over():
            rows.append(dict(kernel="scan", L=L, status="skipped", note="over the part's time budget"))
            continue
        batch, d, n = (1, 16, 8) if tiny else (8, 2048, 16)
        r = measure(backends["scan"], batch, d, L, n, device.type, repeats, warmup=not tiny)
        record(dict(kernel="scan", backend=backends["scan"], dtype="float32", shape=dict(batch=batch, d=d, L=L, n=n),
                    L=L, fwd_ms=r["fwd_ms"], fwd_bwd_ms=r["fwd_bwd_ms"], fwd_GBps=r["fwd_GBps"],
                    fwd_bwd_GBps=r["fwd_bwd_GBps"], fwd_bytes=fused_bytes(batch, d, L, n),
                    fwd_bwd_bytes=fused_bytes(batch, d, L, n, backward=True)))

    # the SSD in bf16 at Mamba-2's shapes (headdim 64, d_state 128)
    generator = torch.Generator(device=device).manual_seed(0)
    for shape in ([dict(batch=1, L=64, heads=2, headdim=8, groups=1, n=8)] if tiny else
                  [dict(batch=8, L=2048, heads=32, headdim=64, groups=1, n=128)]):
        if budget.over():
            rows.append(dict(kernel="ssd", status="skipped", note="over the part's time budget"))
            continue
        inputs = _requiring_grad(ssd_inputs(shape, torch.bfloat16, device, generator))
        run = lambda i: kernels.ssd_scan(**i, chunk_size=16 if tiny else 256, dt_softplus=True,  # noqa: E731
                                         backend=backends["ssd"])
        t_f, t_fb = _time_fwd_bwd(run, inputs, device, repeats, min_s)
        streamed = _nbytes(inputs["x"], inputs["dt"], inputs["B"], inputs["C"])
        fwd_bytes = streamed + _nbytes(inputs["x"])  # inputs read once, y written once
        fwd_bwd_bytes = fwd_bytes + 2 * streamed + _nbytes(inputs["x"])  # backward: inputs and dy read, grads written
        record(dict(kernel="ssd", backend=backends["ssd"], dtype="bfloat16", shape=shape, fwd_ms=t_f * 1e3,
                    fwd_bwd_ms=t_fb * 1e3, fwd_GBps=fwd_bytes / t_f / 1e9, fwd_bwd_GBps=fwd_bwd_bytes / t_fb / 1e9,
                    fwd_bytes=fwd_bytes, fwd_bwd_bytes=fwd_bwd_bytes))

    # the causal conv1d in bf16, width 4
    for shape in ([dict(batch=1, d=16, L=256, width=4)] if tiny else [dict(batch=8, d=2048, L=8192, width=4)]):
        if budget.over():
            rows.append(dict(kernel="conv1d", status="skipped", note="over the part's time budget"))
            continue
        inputs = _requiring_grad(conv_inputs(shape, torch.bfloat16, device, generator))
        run = lambda i: kernels.causal_conv1d(i["x"], i["weight"], i["bias"], activation="silu",  # noqa: E731
                                              backend=backends["conv1d"])
        t_f, t_fb = _time_fwd_bwd(run, inputs, device, repeats, min_s)
        x = _nbytes(inputs["x"])
        record(dict(kernel="conv1d", backend=backends["conv1d"], dtype="bfloat16", shape=shape, fwd_ms=t_f * 1e3,
                    fwd_bwd_ms=t_fb * 1e3, fwd_GBps=2 * x / t_f / 1e9, fwd_bwd_GBps=5 * x / t_fb / 1e9,
                    fwd_bytes=2 * x, fwd_bwd_bytes=5 * x))  # fwd: x, out; bwd: x, dout read, dx written

    # the survey families' kernels (times, not GB/s), fused against PyTorch's path: the Vandermonde kernel as the
    # models build it (the powers in blocks of channels), S4D at d_model 2048 (N/2 = 32 modes), S4's Cauchy sums
    # at d_model 2048, N 64, L 2048 (a 2.1 GiB resolvent on PyTorch's path), and the LRU's scan at d_state 256
    ssm_kernel_rows = []
    timed_kernels = [("vandermonde", vandermonde_inputs, torch.float32, _vandermonde_kernel,
                      dict(H=16, N=8, L=128) if tiny else dict(H=2048, N=32, L=2048)),
                     ("cauchy", cauchy_inputs, torch.float64, lambda backend: _only_output(_cauchy(backend)),
                      dict(H=16, N=8, K=65) if tiny else dict(H=2048, N=64, K=1025)),
                     ("linear_scan", linear_scan_inputs, torch.float32,
                      lambda backend: _only_output(_linear_scan(backend)),
                      dict(batch=2, L=128, N=16, shared=True) if tiny else dict(batch=8, L=2048, N=256, shared=True))]
    for kernel, make_inputs, dtype, make_run, shape in timed_kernels:
        for backend in dict.fromkeys((backends[kernel], "ref")):
            if budget.over():
                ssm_kernel_rows.append(dict(kernel=kernel, backend=backend, status="skipped",
                                            note="over the part's time budget"))
                continue
            inputs = _requiring_grad(make_inputs(shape, dtype, device, generator))
            t_f, t_fb = _time_fwd_bwd(make_run(backend), inputs, device, repeats, min_s)
            ssm_kernel_rows.append(dict(kernel=kernel, backend=backend, dtype=str(dtype).replace("torch.", ""),
                                        shape=shape, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3))
            print(f"  {kernel:11} {backend:6} {str(shape):40} fwd {t_f * 1e3:8.3f} ms  fwd+bwd {t_fb * 1e3:8.3f} ms",
                  flush=True)

    target = next((r for r in rows if r["kernel"] == "scan" and r.get("L") == (64 if tiny else 2048)
                   and "fwd_frac_bw" in r), None)
    return dict(copy_GBps=peak, rows=rows, ssm_kernels=ssm_kernel_rows,
                scan_L2048_fwd_frac_bw=None if target is None else target["fwd_frac_bw"],
                scan_L2048_fwd_bwd_frac_bw=None if target is None else target["fwd_bwd_frac_bw"])


# ------------------------------------------------------------------------------------------- train step

RECIPES = {"130m": "configs/mamba-130m-pile.yaml", "370m": "configs/mamba-370m-pile.yaml"}
STEP_OVERRIDES = ["train.micro_batch_size=8", "train.global_batch_size=8", "train.precision=bf16"]
TINY_OVERRIDES = ["model.d_model=32", "model.n_layer=2", "model.vocab_size=260", "data.seq_len=64",
                  "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32"]


def train_step_worker(recipe: str, tiny: bool) -> dict:
    """One recipe's training step in this process, built as `ssmforge pretrain` builds it: the figures."""
    from benchmarks.memory import peak_memory
    from ssmforge.kernels.backends import describe_backends
    from ssmforge.models import LanguageModel
    from ssmforge.models.layers import kernel_backend
    from ssmforge.pretrain.config import load_config
    from ssmforge.pretrain.engine import build_engine, resolve_precision
    from ssmforge.pretrain.launch import init_distributed, shutdown
    from ssmforge.pretrain.metrics import peak_flops
    from ssmforge.pretrain.plan import Target, step_memory
    from ssmforge.pretrain.trainer import lm_loss

    import deepspeed  # noqa: F401  loaded before the memory count starts

    config = load_config(ROOT / RECIPES[recipe], (TINY_OVERRIDES if tiny else STEP_OVERRIDES) + ["run_dir=unused"])
    world, device = init_distributed(config.train.collective_timeout_s)
    dtype = resolve_precision(config.train.precision, device)
    peak, peak_source = peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    target = Target(1, device.type, name, None, peak, peak_source, dtype)
    planned, parameters = step_memory(config, target, config.train.micro_batch_size,
                                      config.train.activation_checkpointing)
    batch, seq_len = config.train.micro_batch_size, config.data.seq_len
    warmup, steps = (1, 2) if tiny else (2, 5)
    torch.manual_seed(config.seed)
    data = [torch.randint(0, config.model.vocab_size, (batch, seq_len + 1), device=device)
            for _ in range(warmup + steps)]
    seconds, losses = [], []
    with peak_memory(device) as measured:
        model = LanguageModel(config.model).to(device)
        engine, _, _ = build_engine(model, config, world.world_size)
        for i, tokens in enumerate(data):
            synchronize(device)
            start = time.perf_counter()
            loss = lm_loss(engine, tokens, device, dtype)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())  # waits for the step
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    flops_per_token = 3 * model.forward_flops_per_token(seq_len)
    tokens_per_s = batch * seq_len / step_s
    result = dict(recipe=recipe, config=RECIPES[recipe], device=name, dtype=str(dtype).replace("torch.", ""),
                  parameters=parameters, micro_batch=batch, seq_len=seq_len, zero_stage=config.deepspeed.zero_stage,
                  kernels=describe_backends(device, kernel_backend(config.model), config.model.mamba.d_conv),
                  step_seconds=seconds, seconds_per_step=step_s, tokens_per_s=tokens_per_s,
                  flops_per_token=flops_per_token, peak_flops=peak, peak_flops_source=peak_source,
                  mfu=tokens_per_s * flops_per_token / peak, losses=losses,
                  measured_peak_bytes=measured.bytes, planned_peak_bytes=planned.peak,
                  planned=dict(parameters=planned.parameters, gradients=planned.gradients, optimizer=planned.optimizer,
                               buffers=planned.buffers, activations=planned.activations,
                               optimizer_temporaries=planned.optimizer_temporaries))
    if device.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    result["plan_error"] = planned.peak / max(measured.bytes, 1) - 1
    shutdown()
    return result


def _clean_env(device: torch.device) -> dict:
    """This environment without a launcher's rank variables (each child is a single process of its own), and
    without GPUs for a check on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_train_step(device: torch.device, tiny: bool, budget: Budget) -> dict:
    """Each recipe's step in a process of its own (its own peak memory, nothing else on the GPU meanwhile);
    one after the other, except at tiny shapes, where only the code path counts: side by side."""
    from benchmarks.memory import MALLOC_ENV

    def start(recipe):
        command = [sys.executable, __file__, "--worker-train-step", recipe, "--device", device.type] + \
                  (["--tiny"] if tiny else [])
        return subprocess.Popen(command, cwd=ROOT, env={**_clean_env(device), **MALLOC_ENV}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(recipe, proc) -> dict:
        try:
            out, err = proc.communicate(timeout=max(budget.left(), 10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return dict(status="skipped", note="over the part's time budget (the step was stopped)")
        if proc.returncode != 0:
            r = dict(status="FAILED", error=(err or out).strip()[-2000:])
            print(f"  {recipe}: FAILED\n{r['error'][-800:]}", flush=True)
            return r
        r = dict(json.loads(out.strip().splitlines()[-1]), status="ok")
        print(f"  {recipe}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, peak "
              f"{r['measured_peak_bytes'] / 2**30:.2f} GiB measured, {r['planned_peak_bytes'] / 2**30:.2f} GiB "
              f"planned ({100 * r['plan_error']:+.1f}%); kernels: {r['kernels']}", flush=True)
        return r

    results = {}
    if tiny:
        procs = {recipe: start(recipe) for recipe in RECIPES}
        return {recipe: finish(recipe, proc) for recipe, proc in procs.items()}
    for recipe in RECIPES:
        if budget.left() < 10:
            results[recipe] = dict(status="skipped", note="over the part's time budget")
            continue
        results[recipe] = finish(recipe, start(recipe))
    return results


# ----------------------------------------------------------------------------------------------- resume

RESUME_DATA = "data.sources=[{kind: synthetic, max_documents: 300}]"


def _resume_failed(result: dict, run: str, log: str, budget: Budget) -> dict:
    """The report of a run that exited as it should not, with its last line printed."""
    cause = "killed at the end of the part's budget" if budget.over() else \
        (log.strip().splitlines() or ["no output"])[-1]
    print(f"  the {run} run failed: {cause}", flush=True)
    return dict(result, status="FAILED", error=log[-2000:], failed_run=run, cause=cause)


def run_resume(device: torch.device, tiny: bool, budget: Budget, workdir: Path) -> dict:
    """configs/tiny.yaml trained straight, and stopped then resumed; the losses of every step compared."""
    from ssmforge.pretrain.signals import REQUEUE_EXIT_CODE

    total, stop = (4, 2) if tiny else (8, 4)
    # fp32: the GPU's backward kernels accumulate with atomics, so two runs differ in the last bits; bf16
    # autocast would magnify that past any tight tolerance, while a resume bug (data order, RNG, optimizer
    # state) moves the losses by 1e-2 and more
    common = [RESUME_DATA, "data.num_workers=0", f"train.max_steps={total}", "train.log_every=1",
              "train.warmup_steps=2", "train.eval_every=100", "train.save_every=100", "wandb.mode=disabled",
              "train.precision=fp32"]

    def command(run_dir, *extra):
        return [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / "configs" / "tiny.yaml"),
                f"run_dir={run_dir}", *common, *extra]

    def wait(procs):
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(budget.left(), 1))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs.append((p.returncode, out + err))
        return outs

    env = _clean_env(device)
    (straight_rc, straight_log), = wait([subprocess.Popen(command(workdir / "straight"), cwd=ROOT, env=env,
                                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    (stopped_rc, stopped_log), = wait([subprocess.Popen(command(workdir / "resumed", f"train.stop_at_step={stop}"),
                                                        cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True)])
    tol = RESUME_TOL[device.type]
    result = dict(steps=total, stop_at_step=stop, tol=tol, straight_exit=straight_rc, stopped_exit=stopped_rc)
    if straight_rc != 0 or stopped_rc != REQUEUE_EXIT_CODE:
        return _resume_failed(result, "straight" if straight_rc != 0 else "stopped",
                              straight_log if straight_rc != 0 else stopped_log, budget)
    (resumed_rc, resumed_log), = wait([subprocess.Popen(command(workdir / "resumed"), cwd=ROOT, env=env,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    result["resumed_exit"] = resumed_rc
    if resumed_rc != 0:
        return _resume_failed(result, "resumed", resumed_log, budget)

    def losses(run_dir):
        rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    a, b = losses(workdir / "straight"), losses(workdir / "resumed")
    same_steps = sorted(a) == sorted(b) == list(range(1, total + 1))
    diff = max((abs(a[s] - b[s]) for s in a if s in b), default=math.inf)
    ok = same_steps and diff <= tol
    print(f"  {total} steps straight vs stopped at {stop} and resumed: max loss difference {diff:.2e} "
          f"(tol {tol:.0e}): {'ok' if ok else 'not ok'}", flush=True)
    return dict(result, status="ok" if ok else "FAILED", straight_losses=a, resumed_losses=b,
                max_abs_loss_difference=diff, losses_equal=ok)


# ---------------------------------------------------------------------------------------------- report


def targets(report: dict) -> dict:
    checks = {}
    k = report.get("kernels")
    if k and "cases" in k:
        checks["kernels_equal_oracle"] = dict(value=f"{k['passed']} passed, {k['failed']} failed, {k['skipped']} skipped",
                                              target="every kernel and gradient within tolerance",
                                              ok=k["all_match"])
    bw = report.get("bandwidth")
    if bw and "rows" in bw:
        frac = bw["scan_L2048_fwd_frac_bw"]
        checks["scan_bandwidth"] = dict(value=frac, target=f">= {TARGETS['scan_bandwidth_fraction']:.0%} of the copy "
                                        "bandwidth (scan forward, L 2048)",
                                        ok=frac is not None and frac >= TARGETS["scan_bandwidth_fraction"])
    ts = report.get("train_step")
    if ts:
        r = ts.get("370m", {})
        checks["mfu_370m"] = dict(value=r.get("mfu"), target=f">= {TARGETS['mfu_370m']:.0%} MFU (370M, bf16)",
                                  ok=r.get("mfu") is not None and r["mfu"] >= TARGETS["mfu_370m"])
    rs = report.get("resume")
    if rs:
        checks["resume_equal"] = dict(value=rs.get("max_abs_loss_difference"), target=f"losses within {rs.get('tol'):g}",
                                      ok=rs.get("status") == "ok")
    return checks


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def summary_markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "",
             f"torch {report['machine']['torch']}, {report['mode']} mode, {report['seconds']:.0f} s", "",
             "| target | value | wanted | |", "|---|---|---|---|"]
    for name, c in report["targets"].items():
        lines.append(f"| {name} | {_fmt(c['value'])} | {c['target']} | {'ok' if c['ok'] else 'not ok'} |")
    for part, note in report["skipped_parts"].items():
        lines.append(f"\n{part}: skipped ({note})")
    k = report.get("kernels")
    if k and "cases" in k:
        lines += ["", "## Kernels against their oracle", "", "| kernel | backend | case | dtype | shape | status | "
                  "worst error / tol |", "|---|---|---|---|---|---|---|"]
        for r in k["cases"]:
            worst = max((v for v in r.get("errors", {}).values() if isinstance(v, float)), default=None)
            shape = ", ".join(f"{a} {b}" for a, b in r["shape"].items())
            status = r["status"] + (f" ({r['note']})" if "note" in r else "")
            if r["status"] == "FAILED" and worst is None:
                status += f": {next(iter(r.get('errors', {}).values()), '')}"
            lines.append(f"| {r['kernel']} | {r['backend']} | {r['case']} | {r['dtype']} | {shape} | {status} | "
                         f"{_fmt(worst)} / {r['tol']:g} |")
    bw = report.get("bandwidth")
    if bw and "rows" in bw:
        lines += ["", f"## Bandwidth (copy: {bw['copy_GBps']:.0f} GB/s)", "",
                  "| kernel | dtype | shape | fwd ms | fwd GB/s | fwd % | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in bw["rows"]:
            if "fwd_ms" not in r:
                lines.append(f"| {r['kernel']} | | | skipped: {r.get('note', '')} | | | | | |")
                continue
            shape = ", ".join(f"{a} {b}" for a, b in r["shape"].items())
            lines.append(f"| {r['kernel']} | {r['dtype']} | {shape} | {r['fwd_ms']:.3f} | {r['fwd_GBps']:.0f} | "
                         f"{100 * r['fwd_frac_bw']:.0f}% | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_GBps']:.0f} | "
                         f"{100 * r['fwd_bwd_frac_bw']:.0f}% |")
        lines += ["", "The S4 family's kernels, fused against PyTorch's path:", "",
                  "| kernel | backend | dtype | shape | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|"]
        for r in bw.get("ssm_kernels", []):
            if "fwd_ms" not in r:
                lines.append(f"| {r['kernel']} | {r['backend']} | | skipped: {r.get('note', '')} | | |")
                continue
            shape = ", ".join(f"{a} {b}" for a, b in r["shape"].items())
            lines.append(f"| {r['kernel']} | {r['backend']} | {r['dtype']} | {shape} | {r['fwd_ms']:.3f} | "
                         f"{r['fwd_bwd_ms']:.3f} |")
    ts = report.get("train_step")
    if ts:
        lines += ["", "## One training step (DeepSpeed, micro-batch 8, no accumulation)", "",
                  "| recipe | tokens/s | MFU | peak measured | peak planned | plan error | kernels |",
                  "|---|---|---|---|---|---|---|"]
        for recipe, r in ts.items():
            if r.get("status") != "ok":
                lines.append(f"| {recipe} | {r.get('status')}: {r.get('note', r.get('error', ''))[-200:]} | | | | | |")
                continue
            lines.append(f"| {recipe} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                         f"{r['measured_peak_bytes'] / 2**30:.2f} GiB | {r['planned_peak_bytes'] / 2**30:.2f} GiB | "
                         f"{100 * r['plan_error']:+.1f}% | {r['kernels']} |")
    rs = report.get("resume")
    if rs:
        lines += ["", "## Stop and resume", ""]
        if rs.get("status") == "FAILED" and "error" in rs:
            lines.append(f"FAILED: exit codes {rs.get('straight_exit')}, {rs.get('stopped_exit')}, "
                         f"{rs.get('resumed_exit')}; the {rs.get('failed_run')} run: {rs.get('cause')}")
        else:
            lines.append(f"{rs['steps']} steps straight against stopped at step {rs['stop_at_step']} and resumed: "
                         f"max loss difference {_fmt(rs.get('max_abs_loss_difference'))} (tol {rs['tol']:g}): "
                         f"{rs['status']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: run every part on the CPU backends (with --tiny: how the tests run it)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and configs: seconds, not minutes")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="FACTOR",
                   help="multiply every part's time budget and the whole check's (a slow or shared machine)")
    p.add_argument("--worker-train-step", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is false): nothing to check on this machine")
        return 0
    if args.worker_train_step:
        print(json.dumps(train_step_worker(args.worker_train_step, args.tiny)))
        return 0

    from benchmarks.machine import describe

    device = torch.device(args.device)
    started = time.monotonic()
    if not args.budget_scale > 0:
        p.error(f"--budget-scale {args.budget_scale}: must be a positive factor")
    budgets = {part: seconds * args.budget_scale for part, seconds in BUDGET_S.items()}
    total_s = TOTAL_S * args.budget_scale
    overall = started + total_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = dict(machine=describe(), device=device.type, device_name=name, mode="tiny" if args.tiny else "full",
                  budget_s=budgets, skipped_parts={})
    print(f"gpu-check on {name} ({'tiny shapes' if args.tiny else 'full'}); parts: {', '.join(args.parts)}", flush=True)
    for part in PARTS:
        if part not in args.parts:
            continue
        if time.monotonic() >= overall:
            report["skipped_parts"][part] = f"the whole check passed its {total_s:g} s"
            print(f"{part}: skipped, the whole check passed its {total_s:g} s", flush=True)
            continue
        budget = Budget(budgets[part], overall)
        print(f"{part} (budget {budgets[part]:g} s):", flush=True)
        part_start = time.monotonic()
        if part == "kernels":
            report[part] = run_kernels(device, args.tiny, budget)
        elif part == "bandwidth":
            report[part] = run_bandwidth(device, args.tiny, budget)
        elif part == "train_step":
            report[part] = run_train_step(device, args.tiny, budget)
        else:
            with tempfile.TemporaryDirectory(prefix="gpu-check-resume-") as workdir:  # checkpoints: not results
                report[part] = run_resume(device, args.tiny, budget, Path(workdir))
        report.setdefault("part_seconds", {})[part] = round(time.monotonic() - part_start, 1)
    report["seconds"] = time.monotonic() - started
    report["targets"] = targets(report)
    print("targets:")
    for target_name, c in report["targets"].items():
        print(f"  {target_name:22} {_fmt(c['value']):>30}  (target {c['target']}): {'ok' if c['ok'] else 'not ok'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'summary.md'} ({report['seconds']:.0f} s)")
    correctness = [c["ok"] for n, c in report["targets"].items() if n in ("kernels_equal_oracle", "resume_equal")]
    return 0 if all(correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
