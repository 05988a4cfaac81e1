"""Long causal convolution by FFT: O(L log L) for a kernel as long as the sequence (S4, DSS, GSS).

A direct depthwise convolution with a length-L kernel costs O(L^2); multiplying spectra costs
O(L log L). Zero padding to 2L turns the FFT's circular convolution into a linear one, so no output
position sees inputs from its future. Computed in float32 whatever the input dtype: half-precision FFTs
lose the small tail of long kernels, and cuFFT takes half precision only at power-of-2 sizes.
"""
from __future__ import annotations

import torch


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution y[b, c, t] = sum_{s <= t} k[c, t - s] * u[b, c, s].

    u (batch, channels, L), k (channels, Lk) with Lk <= L (taps beyond Lk are zero) ->
    y (batch, channels, L) float32. Differentiable in both arguments.
    """
    if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1] or k.shape[1] > u.shape[2]:
        raise ValueError(f"fft_causal_conv: u must be (batch, channels, L) and k (channels, <= L); got "
                         f"{tuple(u.shape)} and {tuple(k.shape)}")
    L = u.shape[-1]
    n = 2 * L
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_f = torch.fft.rfft(u.float(), n=n)  # (batch, channels, L + 1) complex
        k_f = torch.fft.rfft(k.float(), n=n)  # (channels, L + 1)
        return torch.fft.irfft(u_f * k_f, n=n)[..., :L]
