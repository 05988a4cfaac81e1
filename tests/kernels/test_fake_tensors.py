"""A training step through every public kernel runs on fake tensors (FakeTensorMode), as a memory planner
traces it, and saves for backward exactly the tensors a real step saves: the fast kernels' residuals
(the scans' checkpointed states) included, at the sizes of the backend a real run would pick."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ssmforge import kernels
from ssmforge.kernels.fftconv import fft_causal_conv
from ssmforge.kernels.selective_scan import triton_available

BATCH, L, D, N, HEADDIM, NGROUPS = 2, 40, 16, 8, 8, 2  # L: 1 chunk of the C scan's 64 steps, 3 of Triton's 16


def _params(device):
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    return dict(hidden=leaf(BATCH, L, 8), in_proj=leaf(2 * D, 8), conv_w=leaf(D, 4), conv_b=leaf(D),
                x_proj=leaf(D + 2 * N, D), A_log=leaf(D, N), D=leaf(D), dt_bias=leaf(D),
                bc_proj=leaf(2 * NGROUPS * N, 8), dt2=leaf(BATCH, L, D // HEADDIM), A2_log=leaf(D // HEADDIM),
                k=leaf(D, L))


def _step(params, backend):
    """A small stack shaped like the models' mixers: Mamba (conv, selective scan on views of one projection),
    Mamba-2 (SSD) and GSS (FFT long conv). Returns the loss."""
    p = params
    x, z = F.linear(p["hidden"], p["in_proj"]).transpose(1, 2).chunk(2, dim=1)  # (batch, D, L) views
    x = kernels.causal_conv1d(x, p["conv_w"], p["conv_b"], activation="silu", backend=backend)
    dt, B, C = F.linear(x.transpose(1, 2), p["x_proj"]).split([D, N, N], dim=-1)
    y = kernels.selective_scan(x, dt.transpose(1, 2), -torch.exp(p["A_log"]), B.transpose(1, 2).contiguous(),
                               C.transpose(1, 2).contiguous(), D=p["D"], z=z, delta_bias=p["dt_bias"],
                               delta_softplus=True, backend=backend)
    B2, C2 = F.linear(p["hidden"], p["bc_proj"]).view(BATCH, L, 2 * NGROUPS, N).chunk(2, dim=2)
    y2 = kernels.ssd_scan(y.transpose(1, 2).reshape(BATCH, L, D // HEADDIM, HEADDIM), p["dt2"],
                          -torch.exp(p["A2_log"]), B2, C2, chunk_size=16, dt_softplus=True, backend=backend)
    y3 = fft_causal_conv(y2.reshape(BATCH, L, D).transpose(1, 2), p["k"])
    return (y3 * torch.cos(torch.arange(L, device=y3.device))).sum()


def _saved_in_step(params, backend) -> tuple[list, list]:
    """(shape, dtype, device) of every tensor saved for backward, and the gradients of the parameters."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.device.type))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _step(params, backend)
    return saved, torch.autograd.grad(loss, list(params.values()))


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
BACKENDS = [pytest.param(None, id="default"), pytest.param("triton", id="triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_step_saves_what_a_real_step_saves(backend):
    real_saved, real_grads = _saved_in_step(_params("cpu"), backend)
    with FakeTensorMode() as mode:
        params = {k: mode.from_tensor(v).requires_grad_() for k, v in _params("cpu").items()}
        fake_saved, fake_grads = _saved_in_step(params, backend)
    assert fake_saved == real_saved
    assert [(g.shape, g.dtype) for g in fake_grads] == [(g.shape, g.dtype) for g in real_grads]
    chunk = 16 if backend == "triton" else 64
    assert ((BATCH, D, -(-L // chunk), N), torch.float32, "cpu") in fake_saved  # the scan's checkpoints


@needs_triton
def test_fake_cuda_tensors_take_the_triton_kernels():
    """On fake CUDA tensors (no GPU needed) the default backends are the Triton operators, so a planner
    counts what a GPU keeps: the tensors Triton saves on CPU, on the GPU."""
    with FakeTensorMode() as mode:
        on_cpu = {k: mode.from_tensor(v).requires_grad_() for k, v in _params("cpu").items()}
        want, _ = _saved_in_step(on_cpu, "triton")
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _step(_params("cuda"), None)
    assert [(tuple(t.shape), t.dtype, t.device.type) for t in saved] == [(*s[:2], "cuda") for s in want]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "backward on fake CUDA tensors needs a CUDA device: the autograd engine asks the driver for the "
    "devices' streams (pytorch/pytorch#92627); without one, trace on fake CPU tensors with backend='triton'"))
def test_fake_cuda_step_backward():
    with FakeTensorMode():
        params = _params("cuda")
        grads = torch.autograd.grad(_step(params, None), list(params.values()))
    assert [g.shape for g in grads] == [p.shape for p in params.values()]
