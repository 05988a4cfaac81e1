"""FFT causal convolution against the direct O(L^2) sum, forward and backward."""
import pytest
import torch

from ssmforge.kernels.fftconv import fft_causal_conv, fft_size


def direct_causal_conv(u, k):
    """The definition, term by term: y[b, c, t] = sum_{s <= t} k[c, t - s] u[b, c, s] (float64)."""
    batch, channels, L = u.shape
    y = torch.zeros(batch, channels, L, dtype=torch.float64)
    for t in range(L):
        for s in range(max(0, t - k.shape[1] + 1), t + 1):
            y[:, :, t] += k[:, t - s].double() * u[:, :, s].double()
    return y


def smooth(n: int) -> bool:
    for q in (2, 3, 5):
        while n % q == 0:
            n //= q
    return n == 1


def test_fft_size_is_the_least_2_3_5_smooth_size_free_of_wrap_around():
    for P in range(1, 3000):
        assert fft_size(P) == next(n for n in range(2 * P - 1, 4 * P) if smooth(n)), P
    assert fft_size(4112) == 8640  # not 2 x 4,112 = 2^5 x 257


# (8, 8), (13, 13), (41, 41): FFT sizes 15, 25, 81 = 2L - 1, the least without wrap-around
@pytest.mark.parametrize("L,Lk", [(1, 1), (7, 7), (8, 8), (13, 13), (16, 16), (33, 5), (41, 41)])
def test_forward_equals_the_direct_sum(L, Lk):
    g = torch.Generator().manual_seed(L)
    u, k = torch.randn(2, 3, L, generator=g), torch.randn(3, Lk, generator=g)
    y = fft_causal_conv(u, k)
    assert y.shape == (2, 3, L) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), direct_causal_conv(u, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L", [12, 13])  # FFT sizes 24 and 25 (= 2L - 1)
def test_backward_equals_the_direct_sum(L):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, L, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(3, L, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(2, 3, L, generator=g, dtype=torch.float64)
    du, dk = torch.autograd.grad((fft_causal_conv(u, k) * w).sum(), (u, k))
    ru, rk = u.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    eu, ek = torch.autograd.grad((direct_causal_conv(ru, rk) * w).sum(), (ru, rk))
    torch.testing.assert_close(du.double(), eu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dk.double(), ek, rtol=1e-4, atol=1e-4)


def test_causal_and_half_inputs_computed_in_fp32():
    u = torch.randn(1, 2, 20).bfloat16()
    k = torch.randn(2, 20)
    y = fft_causal_conv(u, k)
    changed = u.clone()
    changed[..., 9] += 1
    assert y.dtype == torch.float32
    torch.testing.assert_close(fft_causal_conv(changed, k)[..., :9], y[..., :9], rtol=0, atol=1e-5)
    assert not torch.allclose(fft_causal_conv(changed, k)[..., 9:], y[..., 9:])


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        fft_causal_conv(torch.randn(1, 3, 4), torch.randn(2, 5))
