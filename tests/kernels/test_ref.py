"""The oracles checked against independent scalar loops written from the paper's equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssmforge.kernels import causal_conv1d_ref, causal_conv1d_step, selective_scan_ref, selective_state_step


def scalar_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """h[n] <- exp(dt*A[d,n]) h[n] + dt*B[n]*u ; y = sum_n C[n] h[n] + D u ; y *= silu(z): pure Python."""
    batch, d, L = u.shape
    n = A.shape[1]
    out = torch.zeros(batch, d, L, dtype=torch.float64)
    last = torch.zeros(batch, d, n, dtype=torch.float64)

    def coeff(M, b, c, i, t):
        if M.dim() == 2:
            return float(M[c, i])
        if M.dim() == 3:
            return float(M[b, i, t])
        return float(M[b, c // (d // M.shape[1]), i, t])

    for b in range(batch):
        for c in range(d):
            h = [0.0] * n
            for t in range(L):
                dt = float(delta[b, c, t]) + (float(delta_bias[c]) if delta_bias is not None else 0.0)
                if softplus:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for i in range(n):
                    h[i] = math.exp(dt * float(A[c, i])) * h[i] + dt * coeff(B, b, c, i, t) * float(u[b, c, t])
                    y += coeff(C, b, c, i, t) * h[i]
                if D is not None:
                    y += float(D[c]) * float(u[b, c, t])
                if z is not None:
                    zz = float(z[b, c, t])
                    y *= zz / (1 + math.exp(-zz))
                out[b, c, t] = y
            last[b, c] = torch.tensor(h, dtype=torch.float64)
    return out, last


@pytest.mark.parametrize("bc_kind", ["fixed", "variable", "grouped"])
@pytest.mark.parametrize("options", [(False, False, False, False), (True, True, True, True)])
def test_selective_scan_ref_matches_scalar_loop(bc_kind, options):
    use_D, use_z, use_bias, softplus = options
    g = torch.Generator().manual_seed(0)
    batch, d, L, n = 2, 4, 7, 3
    u = torch.randn(batch, d, L, generator=g)
    delta = torch.rand(batch, d, L, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) - 0.1
    shape = {"fixed": (d, n), "variable": (batch, n, L), "grouped": (batch, 2, n, L)}[bc_kind]
    B = torch.randn(*shape, generator=g)
    C = torch.randn(*shape, generator=g)
    D = torch.randn(d, generator=g) if use_D else None
    z = torch.randn(batch, d, L, generator=g) if use_z else None
    delta_bias = torch.randn(d, generator=g) * 0.1 if use_bias else None
    out, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=softplus,
                                   return_last_state=True)
    want, want_last = scalar_scan(u, delta, A, B, C, D, z, delta_bias, softplus)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)


def test_selective_scan_ref_keeps_input_dtype_and_accumulates_in_fp32():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 4, 9, generator=g)
    delta, A = torch.rand(1, 4, 9, generator=g), -torch.rand(4, 5, generator=g)
    B, C = torch.randn(1, 5, 9, generator=g), torch.randn(1, 5, 9, generator=g)
    out16 = selective_scan_ref(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16())
    out32 = selective_scan_ref(u.bfloat16().float(), delta.bfloat16().float(), A, B.bfloat16().float(),
                               C.bfloat16().float())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=1e-2, atol=1e-2)


def test_state_update_continues_the_scan():
    g = torch.Generator().manual_seed(2)
    batch, d, L, n = 2, 6, 5, 4
    u, delta = torch.randn(batch, d, L, generator=g), torch.randn(batch, d, L, generator=g)
    z = torch.randn(batch, d, L, generator=g)
    A, D, bias = -torch.rand(d, n, generator=g), torch.randn(d, generator=g), torch.randn(d, generator=g)
    B, C = torch.randn(batch, n, L, generator=g), torch.randn(batch, n, L, generator=g)
    full = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    state, steps = torch.zeros(batch, d, n), []
    for t in range(L):
        y, state = selective_state_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                        bias, True)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, -1), full, rtol=1e-5, atol=1e-6)
    # a new state each step: the one passed in is left as it was
    before = state.clone()
    selective_state_step(state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias, True)
    assert torch.equal(state, before)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_ref_matches_loop_and_update(width, activation):
    g = torch.Generator().manual_seed(width)
    batch, d, L = 2, 3, 6
    x, w, bias = torch.randn(batch, d, L, generator=g), torch.randn(d, width, generator=g), torch.randn(d, generator=g)
    want = torch.zeros(batch, d, L)
    for t in range(L):
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                want[..., t] += w[:, k] * x[..., src]
    want = want + bias[:, None]
    if activation:
        want = F.silu(want)
    out = causal_conv1d_ref(x, w, bias, activation)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    state, steps = torch.zeros(batch, d, width), []
    for t in range(L):
        y, next_state = causal_conv1d_step(state, x[..., t], w, bias, activation)
        torch.testing.assert_close(next_state[..., :-1], state[..., 1:])  # shifted, the given one untouched
        state = next_state
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, -1), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[..., -width:])
