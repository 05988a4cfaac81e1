"""The Triton causal conv1d and the `causal_conv1d` dispatcher against torch's conv (the oracle)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels import causal_conv1d, causal_conv1d_ref
from ssmforge.kernels.selective_scan import triton_available

from .oracle import assert_matches, conv_grads

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_conv1d_matches_torch(width, activation, with_bias, dtype, tol):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 20, 70, generator=g).to(dtype).requires_grad_()  # d and L not multiples of the blocks
    weight = torch.randn(20, width, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(20, generator=g).to(dtype).requires_grad_() if with_bias else None
    want = conv_grads(causal_conv1d_ref, x, weight, bias, activation)
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="triton", **k), x, weight, bias, activation)
    assert_matches(got, want, tol, same_dtype=True)


def test_silu_far_below_the_range_of_exp_stays_finite():
    """Pre-activations below -88.7, where sigmoid's exp(-x) overflows float32: output and gradients finite and
    equal to the oracle's."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 20, 70, generator=g) * 100).requires_grad_()
    weight, bias = torch.randn(20, 4, generator=g).requires_grad_(), torch.randn(20, generator=g).requires_grad_()
    assert causal_conv1d_ref(x, weight, bias).min() < -89
    want = conv_grads(causal_conv1d_ref, x, weight, bias, "silu")
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="triton", **k), x, weight, bias, "silu")
    assert_matches(got, want, 1e-4, same_dtype=True)


def test_dispatch_defaults_to_the_fused_kernel_on_cpu(monkeypatch):
    calls = []
    fused = kernels.CONV1D_BACKENDS["cpu"]
    monkeypatch.setitem(kernels.CONV1D_BACKENDS, "cpu", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x, weight = torch.randn(1, 4, 9), torch.randn(4, 3)
    torch.testing.assert_close(causal_conv1d(x, weight, activation="silu"), causal_conv1d_ref(x, weight, activation="silu"))
    assert calls == [1]
    assert kernels.conv1d_default_backend(torch.device("cpu")) == "cpu"
    on_gpu = "triton" if "triton" in kernels.CONV1D_BACKENDS else "ref"
    assert kernels.conv1d_default_backend(torch.device("cuda"), 4) == on_gpu
    assert kernels.conv1d_default_backend(torch.device("cuda"), 5) == "ref"  # the Triton kernel's widths: 2..4
    with pytest.raises(ValueError):
        causal_conv1d(x, weight, backend="nope")
