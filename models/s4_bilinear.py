"""S4's bilinear system through its truncated generating function at the roots of unity (models.s4): the
convolution kernel, the state a chunk leaves and what an entering state adds, each by Cauchy sums over the N
states (kernels.cauchy: fused on CUDA, so no (H, N, L) tensor is built) rather than by Krylov powers.

The system, per channel: A = diag(Lambda) - p p*, Abar = (I - dt/2 A)^-1 (I + dt/2 A), Bbar = (I - dt/2 A)^-1 dt B,
over all N states (each kept mode, then its conjugate). At z on the unit circle,

    (I - Abar z)^-1 Bbar = dt R(z) B,   (I - Abar z)^-1 Abar h = R(z) (I + dt/2 A) h,
    R(z) = [(1 - z) I - (1 + z) dt/2 A]^-1 = D^-1 - s D^-1 p p* D^-1 / (1 + s p* D^-1 p)    (Woodbury),

with s = (1 + z) dt / 2 and D = diag(d_n), d_n(z) = (1 - z) - s Lambda_n = (1 - mu_n)(1 - abar_n z), where
mu = dt Lambda / 2 and abar = (1 + mu) / (1 - mu) (the diagonal part's own bilinear eigenvalues, |abar| < 1). A
sequence x_0 .. x_(L-1) and its sums at the L-th roots of unity z_k = exp(-2 pi i k / L) are a DFT pair; the sums
of the truncated powers carry the factor (I - Abar^L) (z_k^L = 1), a function of A that commutes with R. So:
  kernel   K_l = C Abar^l Bbar:        G(z) = C~ dt R(z) B,   C~ = C (I - Abar^L); K = irfft(G)
  response y_t = C Abar^(t+1) h0:      G(z) = C~ R(z) (I + dt/2 A) h0; y = irfft(G)
  summary  S = sum_l v_l Abar^l Bbar  = (1/L) sum_k conj(V_k) dt R(z_k) B~,   B~ = (I - Abar^L) B,   V = fft(v),
the last a Cauchy sum over the nodes for each state n: sum_k a_k / (1 - abar_n z_k). C~ and B~ are the only
O(N^3 log L) work (a geometric sum of Abar's powers), independent of the batch: computed once a forward, the rest
is O(batch L N) per channel.
In float64 (cast back at the end): near z = 1 the Woodbury term cancels the diagonal sum by a factor up to ~N^2
for LegS, which float32 would leave at gradient errors of 1e-5..1e-4.
"""
from __future__ import annotations

import math

import torch

from ssmforge.kernels import cauchy

from .diagonal import complex_of


def matrix_power(M: torch.Tensor, n: int) -> torch.Tensor:
    """M^n (..., N, N) by repeated squaring (n >= 0)."""
    result = None
    square = M
    while n:
        if n & 1:
            result = square if result is None else square @ result
        n >>= 1
        if n:
            square = square @ square
    if result is None:
        return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
    return result


def geometric_sum(M: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """r (I + M + ... + M^(n-1)) for row vectors r (..., N) and M (..., N, N), by doubling over the bits of n
    (most significant first): s_2k = s_k + s_k M^k, s_(2k+1) = r + s_2k M; about 2 log2(n) matmuls."""
    s = torch.zeros_like(r)
    power = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)  # M^k
    for bit in bin(n)[2:]:
        s = s + (s[..., None, :] @ power)[..., 0, :]
        power = power @ power
        if bit == "1":
            s = r + (s[..., None, :] @ M)[..., 0, :]
            power = power @ M
    return s


def roots_of_unity(length: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """z_k = exp(-2 pi i k / length), k < count (count,), complex of the real `dtype`: a DFT's nodes."""
    k = torch.arange(count, device=device, dtype=dtype)
    return torch.exp(torch.complex(torch.zeros_like(k), -2 * math.pi * k / length))


def bilinear_nodes(dt: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cauchy sums' nodes 1 - z (K,) and scales s = (1 + z) dt / 2 (H, K) at the length-th roots of unity
    z_k, k < K = length // 2 + 1 (the nodes an irfft reads), from dt (H,) real."""
    z = roots_of_unity(length, length // 2 + 1, dt.dtype, dt.device)
    return 1 - z, (1 + z) * (dt / 2)[:, None]


def _wide(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Real tensors in float64, complex ones in complex128."""
    return [x.to(torch.complex128 if x.is_complex() else torch.float64) for x in tensors]


def half_step_inverse(dt: torch.Tensor, lam: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(I - dt/2 A)^-1 (H, N, N) for A = diag(lam) - p p*, by Sherman-Morrison: diag(d) - dt/2 (d p)(p* d) /
    (1 + dt/2 p* d p), d = 1 / (1 - dt/2 lam); O(N^2) a channel. Abar = 2 (I - dt/2 A)^-1 - I, since
    I + dt/2 A = 2 I - (I - dt/2 A)."""
    half_dt = (dt / 2)[:, None]
    d = 1 / (1 - half_dt * lam)
    dp, pd = d * p, p.conj() * d
    scale = half_dt / (1 + half_dt * (pd * p).sum(-1, keepdim=True))  # (H, 1)
    return torch.diag_embed(d) - scale[..., None] * dp[..., :, None] * pd[..., None, :]


def _truncated(dt: torch.Tensor, lam: torch.Tensor, p: torch.Tensor, x: torch.Tensor, length: int,
               transposed: bool) -> torch.Tensor:
    """(I - Abar^L) x for columns x (H, N), or x (I - Abar^L) for rows (transposed), in float64 from the
    continuous system: -(I + Abar + ... + Abar^(L-1)) (Abar - I) x with (Abar - I) x = dt (I - dt/2 A)^-1 A x,
    so nothing cancels where Abar^L is close to I; Abar is rebuilt in float64 (its rounding to the parameters'
    precision, amplified over L powers, cost float32 summaries a few 1e-6 relative error). A row's products are its
    column's under the transposes: A^T = diag(lam) - conj(p) p^T."""
    dt, lam, p, x = _wide(dt, lam, p, x)
    inverse = half_step_inverse(dt, lam, p)
    Abar = 2 * inverse - torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    if transposed:
        inverse, p, Abar = inverse.mT, p.conj(), Abar.mT
    ax = lam * x - (p.conj() * x).sum(-1, keepdim=True) * p
    delta = (inverse @ ax[..., None])[..., 0] * dt[:, None]
    # geometric_sum runs over row vectors: a column's sum is the row sum of the transpose
    return -geometric_sum(Abar.mT, delta, length)


def truncated_output(dt: torch.Tensor, lam: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                     length: int) -> torch.Tensor:
    """C~ = C (I - Abar^L) (H, N), complex128: O(H N^3 log L) work, independent of the batch."""
    return _truncated(dt, lam, p, c, length, transposed=True)


def truncated_input(dt: torch.Tensor, lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor,
                    length: int) -> torch.Tensor:
    """B~ = (I - Abar^L) B (H, N), complex128, as truncated_output."""
    return _truncated(dt, lam, p, b, length, transposed=False)


def _woodbury(k_ab: torch.Tensor, k_ap: torch.Tensor, k_pb: torch.Tensor, k_pp: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """a R(z) b from the Cauchy sums k_xy = sum_n x_n y_n / d_n(z) (x in {a, p*}, y in {b, p})."""
    return k_ab - s * k_ap * k_pb / (1 + s * k_pp)


def conjugate_swapped(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) with its halves (the modes, their conjugates) exchanged and conjugated: a state of the real
    system (A, B, C conjugate-paired) equals its own conjugate-swapped."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], -1).conj()


def bilinear_kernel(dt: torch.Tensor, c_tilde: torch.Tensor, lam: torch.Tensor, p: torch.Tensor, b: torch.Tensor,
                    length: int, backend: str | None = None) -> torch.Tensor:
    """K (H, length) = Re(C Abar^l Bbar) of the system A = diag(lam) - p p*, B = b (each (H, N); dt (H,)), from
    c_tilde = truncated_output(...) (H, N), in float64 (module docstring); its work is O(H L N), cast back to
    dt's dtype. backend: the Cauchy sums' (kernels.cauchy; None: the device's default, the fused Triton kernel on
    CUDA)."""
    working = dt.dtype
    dt, c_tilde, lam, p, b = _wide(dt, c_tilde, lam, p, b)
    nodes, s = bilinear_nodes(dt, length)
    pc = p.conj()
    numerators = torch.stack([c_tilde * b, c_tilde * p, pc * b, pc * p], dim=1)  # (H, 4, N)
    k_cb, k_cp, k_pb, k_pp = cauchy(numerators, lam, nodes, s, backend).unbind(1)  # (H, K) each
    G = dt[:, None] * _woodbury(k_cb, k_cp, k_pb, k_pp, s)
    return torch.fft.irfft(G, n=length).to(working)


def bilinear_entering_response(h0: torch.Tensor, reach: torch.Tensor, dt: torch.Tensor, c_tilde: torch.Tensor,
                               lam: torch.Tensor, p: torch.Tensor, length: int,
                               backend: str | None = None) -> torch.Tensor:
    """Re(C Abar^(t+1) h0) for t < length where reach is 1: h0 (H, batch, N) complex, reach (H, batch, L) real,
    the system as bilinear_kernel's -> (H, batch, L) in reach's dtype. Re(C Abar^t h0) is the response of h0's
    conjugate-symmetric part (the system maps a state and its conjugate-swapped conjugate alike), whose
    response is real: its sums at the nodes z_k, k <= L/2, give it by an irfft."""
    working, batch = reach.dtype, h0.shape[1]
    h0, dt, c_tilde, lam, p = _wide(h0, dt, c_tilde, lam, p)
    h0 = (h0 + conjugate_swapped(h0)) / 2
    pc = p.conj()
    # (I + dt/2 A) h0 with A = diag(lam) - p p*
    x = h0 + (dt / 2)[:, None, None] * (lam[:, None] * h0 - (h0 * pc[:, None]).sum(-1, keepdim=True) * p[:, None])
    nodes, s = bilinear_nodes(dt, length)
    numerators = torch.cat([c_tilde[:, None] * x, pc[:, None] * x, (c_tilde * p)[:, None], (pc * p)[:, None]], 1)
    sums = cauchy(numerators, lam, nodes, s, backend)  # (H, 2 batch + 2, K)
    k_cx, k_px, k_cp, k_pp = sums[:, :batch], sums[:, batch:2 * batch], sums[:, -2:-1], sums[:, -1:]
    G = _woodbury(k_cx, k_cp, k_px, k_pp, s[:, None])
    return torch.fft.irfft(G, n=length).to(working) * reach


def bilinear_final_state(w: torch.Tensor, last_doc: torch.Tensor, dt: torch.Tensor, b_tilde: torch.Tensor,
                         lam: torch.Tensor, p: torch.Tensor, length: int, backend: str | None = None) -> torch.Tensor:
    """The state after the last of `length` positions from a zero start, sum_s Abar^(L-1-s) Bbar w_s over the
    positions where last_doc is 1: w and last_doc (H, batch, L) real, the system as bilinear_kernel's with
    b_tilde = truncated_input(...) (H, N) -> (H, batch, N), complex of w's dtype. With v_l = w_(L-1-l),
    S = sum_l v_l Abar^l Bbar by the module docstring's DFT pair: two Cauchy sums at the nodes for the Woodbury
    factor, then a sum over the nodes for each state. v is real, so the terms at z_k and z_(L-k) = conj(z_k)
    are each other's conjugate-swapped conjugates: the sum over the nodes k <= L/2 (the ends halved) and its
    conjugate-swapped conjugate make S, from half the nodes."""
    working, batch, count = complex_of(w.dtype), w.shape[1], length // 2 + 1
    v = (w * last_doc).flip(-1).double()
    ends = torch.ones(count, dtype=torch.float64, device=w.device)
    ends[0] = 0.5  # z = 1, and z = -1 for an even length: their own conjugates
    if length % 2 == 0:
        ends[-1] = 0.5
    a = torch.fft.rfft(v).conj() * (ends / length)  # (H, batch, count): conj(V_k) / L, the ends halved
    dt, b_tilde, lam, p = _wide(dt, b_tilde, lam, p)
    nodes, s = bilinear_nodes(dt, length)
    pc = p.conj()
    k_pb, k_pp = cauchy(torch.stack([pc * b_tilde, pc * p], dim=1), lam, nodes, s, backend).unbind(1)  # (H, K)
    woodbury = s * k_pb / (1 + s * k_pp)  # R(z) B~ = D^-1 (B~ - p woodbury)
    mu = (dt / 2)[:, None] * lam
    z = roots_of_unity(length, count, dt.dtype, dt.device).expand(dt.shape[0], count)
    # sum_k a_k / d_n(z_k) = sum_k a_k / (1 - abar_n z_k) / (1 - mu_n): the nodes z_k as the Cauchy sums' poles
    ones = torch.ones(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    sums = cauchy(torch.cat([a, a * woodbury[:, None]], 1), z, ones, (1 + mu) / (1 - mu), backend)  # (H, 2 batch, N)
    y = (dt[:, None] / (1 - mu))[:, None] * (b_tilde[:, None] * sums[:, :batch] - p[:, None] * sums[:, batch:])
    return (y + conjugate_swapped(y)).to(working)
