"""The fused C causal conv1d (the default on CPU) against torch's conv (the oracle), forward and every
gradient, on the layouts the mixers hand it."""
import pytest
import torch

from ssmforge.kernels import causal_conv1d, causal_conv1d_ref
from ssmforge.kernels.cpu.build import load_library

from .oracle import assert_matches, conv_grads

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C compiler: the fused CPU kernels are not built")


def inputs(width, with_bias, dtype, channels_last, batch=3, d=19, L=41, seed=0):
    g = torch.Generator().manual_seed(seed + width)
    if channels_last:  # as Mamba's x: a (batch, d, L) view of a (batch, L, 2d) projection
        x = torch.randn(batch, L, 2 * d, generator=g).to(dtype)[..., :d].transpose(1, 2)
    else:
        x = torch.randn(batch, d, L, generator=g).to(dtype)
    weight = torch.randn(d, width, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype) if with_bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, bias)]


@pytest.mark.parametrize("width", [2, 3, 4, 6])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_cpu_conv_matches_torch_fp32(width, activation, with_bias, channels_last):
    x, weight, bias = inputs(width, with_bias, torch.float32, channels_last)
    want = conv_grads(causal_conv1d_ref, x, weight, bias, activation)
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="cpu", **k), x, weight, bias, activation)
    assert_matches(got, want, 1e-5, same_dtype=True)


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16():
    x, weight, bias = inputs(4, True, torch.bfloat16, channels_last=True)
    want = conv_grads(causal_conv1d_ref, *(t.detach().float().requires_grad_() for t in (x, weight, bias)),
                             activation="silu")
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="cpu", **k), x, weight, bias, "silu")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert_matches(got, want, 2e-2)


def test_a_sequence_shorter_than_the_kernel_and_a_single_step():
    for L in (1, 2):
        x, weight, bias = inputs(4, True, torch.float32, channels_last=False, L=L)
        want = conv_grads(causal_conv1d_ref, x, weight, bias, "silu")
        got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="cpu", **k), x, weight, bias, "silu")
        assert_matches(got, want, 1e-5, same_dtype=True)


def test_bad_activation_is_refused():
    x, weight, _ = inputs(4, False, torch.float32, channels_last=False)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, backend="cpu", activation="relu")
