"""torch.compile traces the kernels' public entry points whole (fullgraph: no graph break on a custom op or
on the dispatch around it) and the compiled function matches eager, values and gradients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels.selective_scan import triton_available


def _mixer(x, z, conv_w, conv_b, dt, A, B, C, D, xs, dts, Bs, backend):
    """Conv and selective scan as in Mamba; with backend="triton", also Mamba-2's SSD."""
    x = kernels.causal_conv1d(x, conv_w, conv_b, activation="silu", backend=backend)
    y = kernels.selective_scan(x, dt, A, B, C, D=D, z=z, delta_bias=conv_b, delta_softplus=True, backend=backend)
    loss = (y * torch.cos(torch.arange(y.numel()).view_as(y))).sum()
    if backend == "triton":  # the CPU default for the SSD is plain PyTorch, no custom op
        loss = loss + kernels.ssd_scan(xs, dts, -torch.exp(A[:4, 0]), Bs, Bs, chunk_size=16, dt_softplus=True,
                                       backend=backend).square().sum()
    return loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    batch, d, L, n = 2, 16, 40, 8
    shapes = dict(x=(batch, d, L), z=(batch, d, L), conv_w=(d, 4), conv_b=(d,), dt=(batch, d, L), A=(d, n),
                  B=(batch, n, L), C=(batch, n, L), D=(d,), xs=(batch, L, 4, 8), dts=(batch, L, 4),
                  Bs=(batch, L, 2, 8))
    inputs = {k: torch.randn(*s, generator=g) * 0.5 for k, s in shapes.items()}
    inputs["A"] = -inputs["A"].abs()
    return {k: v.requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("backend,compiler", [
    pytest.param(None, "aot_eager", id="cpu"),  # the default backends for CPU tensors
    pytest.param(None, "inductor", id="cpu-inductor", marks=pytest.mark.slow),  # ~20 s of C++ builds
    pytest.param("triton", "aot_eager", id="triton",
                 marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed")),
])
def test_compiled_matches_eager(backend, compiler):
    compiled = torch.compile(_mixer, fullgraph=True, backend=compiler)
    inputs = _inputs()
    got = compiled(**inputs, backend=backend)
    got_grads = torch.autograd.grad(got, list(inputs.values()), allow_unused=True)
    want = _mixer(**inputs, backend=backend)
    want_grads = torch.autograd.grad(want, list(inputs.values()), allow_unused=True)
    torch.testing.assert_close(got, want)
    for name, g, w in zip(inputs, got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)
