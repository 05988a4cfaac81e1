"""The fused C kernels on the layouts Mamba hands them: the scan and the conv read channels-last views of
the projections in place and write channels-last results, with values and every gradient of the oracle,
at shapes that fill the kernels' 16-channel blocks, leave a partial block, split B/C groups inside a
block's reach, and cross the conv's 64-step tiles and the scan's checkpoint chunks."""
import pytest
import torch

from ssmforge.kernels import causal_conv1d, causal_conv1d_ref, selective_scan_ref
from ssmforge.kernels.cpu import selective_scan_cpu
from ssmforge.kernels.cpu.build import load_library

from .oracle import assert_matches, conv_grads, values_and_grads

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C compiler: the fused CPU kernels are not built")


def mamba_scan_inputs(batch, d, L, n, groups, seed=0, z_scale=1.0, dt_scale=0.5):
    """u and z: (batch, d, L) views of the halves of a (batch, L, 2d) projection; delta: a view of a
    (batch, L, d) one; B and C grouped (batch, groups, n, L), or (batch, n, L) when groups is None. z and delta
    are standard normal times z_scale and dt_scale."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, L, 2 * d, generator=g)
    xz[..., d:] *= z_scale
    xz.requires_grad_()
    dt = (torch.randn(batch, L, d, generator=g) * dt_scale).requires_grad_()
    bc_shape = (batch, n, L) if groups is None else (batch, groups, n, L)
    return dict(
        u=xz[..., :d].transpose(1, 2), delta=dt.transpose(1, 2),
        A=(-torch.rand(d, n, generator=g) * 2 - 0.1).requires_grad_(),
        B=torch.randn(*bc_shape, generator=g).requires_grad_(), C=torch.randn(*bc_shape, generator=g).requires_grad_(),
        D=torch.randn(d, generator=g).requires_grad_(), z=xz[..., d:].transpose(1, 2),
        delta_bias=(torch.randn(d, generator=g) * 0.3).requires_grad_(),
    )


def scan_results(fn, inputs, **kwargs):
    out, last = fn(**inputs, delta_softplus=True, return_last_state=True, **kwargs)
    return out, values_and_grads({"out": out, "last_state": last}, inputs)


@pytest.mark.parametrize("d, n, groups", [
    (40, 16, None),  # two full 16-channel blocks and a partial one of 8; n = 16, the unrolled path
    (48, 5, None),   # full blocks only, an odd state size
    (40, 16, 2),     # 20 channels per group: a full block and a partial one of 4 in each
    (36, 3, 3),      # 12 channels per group: one partial block per group
])
@pytest.mark.parametrize("chunk", [8, 64])  # the tests' chunk and the default (L 150: 3 chunks, the last partial)
def test_scan_on_channels_last_views_matches_the_oracle(d, n, groups, chunk):
    inputs = mamba_scan_inputs(batch=2, d=d, L=150, n=n, groups=groups)
    _, want = scan_results(selective_scan_ref, inputs)
    out, got = scan_results(selective_scan_cpu, inputs, chunk=chunk)
    assert_matches(got, want, 1e-4)
    assert out.stride(1) == 1  # channels-last, as out_proj reads it


def test_scan_gradients_come_back_channels_last():
    """du, ddelta and dz reach the projections' gradients without a transposed copy: the kernel writes them
    (batch, L, d), the layout of the projections' outputs."""
    inputs = mamba_scan_inputs(batch=2, d=32, L=20, n=16, groups=None)
    out = selective_scan_cpu(**inputs, delta_softplus=True)
    grads = torch.autograd.grad(out.square().sum(), [inputs["u"], inputs["delta"], inputs["z"]])
    assert [g.stride(1) for g in grads] == [1, 1, 1]
    want = torch.autograd.grad(selective_scan_ref(**inputs, delta_softplus=True).square().sum(),
                               [inputs["u"], inputs["delta"], inputs["z"]])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("L", [64, 150])  # exactly one tile; three tiles, the last partial
def test_conv_backward_across_tiles_matches_torch(channels_last, L):
    g = torch.Generator().manual_seed(L)
    d = 24
    if channels_last:
        x = torch.randn(2, L, 2 * d, generator=g)[..., :d].transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(2, d, L, generator=g).requires_grad_()
    weight = torch.randn(d, 4, generator=g).requires_grad_()
    bias = torch.randn(d, generator=g).requires_grad_()
    want = conv_grads(causal_conv1d_ref, x, weight, bias, "silu")
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="cpu", **k), x, weight, bias, "silu")
    assert_matches(got, want, 1e-5, same_dtype=True)


def test_gates_far_below_the_range_of_exp_stay_finite():
    """exp(-x) overflows float32 for x below -88.72. Built with -ffast-math, 1 / (1 + expf(-x)) came out NaN there,
    not 0: a 2-layer Mamba training on CPU went NaN at step 5,037 when one pre-activation of its conv reached
    -88.74. The conv's SiLU, the scan's z gate and delta's softplus, on inputs reaching +-300, against the
    oracle, values and every gradient."""
    inputs = mamba_scan_inputs(batch=2, d=40, L=70, n=16, groups=None, z_scale=100.0, dt_scale=100.0)
    assert inputs["z"].min() < -89 and inputs["delta"].min() < -89
    _, want = scan_results(selective_scan_ref, inputs)
    _, got = scan_results(selective_scan_cpu, inputs)
    assert_matches(got, want, 1e-4)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 70, 80, generator=g) * 100)[..., :40].transpose(1, 2).requires_grad_()
    weight, bias = torch.randn(40, 4, generator=g).requires_grad_(), torch.randn(40, generator=g).requires_grad_()
    assert causal_conv1d_ref(x, weight, bias).min() < -89  # the pre-activation
    want = conv_grads(causal_conv1d_ref, x, weight, bias, "silu")
    got = conv_grads(lambda *a, **k: causal_conv1d(*a, backend="cpu", **k), x, weight, bias, "silu")
    assert_matches(got, want, 1e-4, same_dtype=True)  # SiLU's derivative x s (1 - s) at |x| ~ 100: fp32 rounding
