"""The SSD (Mamba-2) paths against the sequential oracle, forward, final state and every gradient; the
oracle itself against a scalar loop written from the recurrence."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels import ssd_scan, ssd_scan_ref, ssd_state_step
from ssmforge.kernels.selective_scan import triton_available
from ssmforge.kernels.ssd import ssd_chunked

from .oracle import assert_matches, values_and_grads


def make_inputs(batch=2, L=37, nheads=4, headdim=8, ngroups=2, dstate=5, dtype=torch.float32, with_D=True,
                with_bias=True, with_initial=True, seed=0):
    """Random SSD inputs, all requiring grad. A, D, dt_bias and the initial state stay fp32 as in the model."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    inputs = dict(
        x=rand(batch, L, nheads, headdim), dt=rand(batch, L, nheads, scale=0.5),
        A=-torch.rand(nheads, generator=g) * 2 - 0.1,
        B=rand(batch, L, ngroups, dstate), C=rand(batch, L, ngroups, dstate),
        D=rand(nheads, dt=torch.float32) if with_D else None,
        dt_bias=rand(nheads, scale=0.3, dt=torch.float32) if with_bias else None,
        initial_state=rand(batch, nheads, headdim, dstate, dt=torch.float32) if with_initial else None,
    )
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_with_grads(fn, inputs, dt_softplus, return_final_state, **kwargs):
    result = fn(**inputs, dt_softplus=dt_softplus, return_final_state=return_final_state, **kwargs)
    y, last = result if return_final_state else (result, None)
    return values_and_grads({"y": y, "final_state": last}, inputs)


def _triton(**kwargs):
    from ssmforge.kernels.triton.ssd import ssd_triton

    return ssd_triton(**kwargs)


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# chunks of 16 steps, so that these lengths cross several chunks and end inside one
PATHS = [pytest.param(lambda **kw: ssd_chunked(chunk_size=16, **kw), id="torch"),
         pytest.param(lambda **kw: _triton(chunk_size=16, **kw), id="triton", marks=needs_triton)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SMALL = dict(batch=1, nheads=2, headdim=8, dstate=5)  # the interpreter runs Triton programs one by one


def check(path, dt_softplus=True, return_final_state=True, dtype=torch.float32, **shape):
    inputs = make_inputs(dtype=dtype, **shape)
    want = run_with_grads(ssd_scan_ref, inputs, dt_softplus, return_final_state)
    got = run_with_grads(path, inputs, dt_softplus, return_final_state)
    assert got["y"].dtype == want["y"].dtype == dtype
    assert_matches(got, want, TOL[dtype])


@pytest.mark.parametrize("path", PATHS)
# ends inside a chunk, a multiple of the chunk, a single step; heads with their own B/C or sharing them
@pytest.mark.parametrize("L, ngroups", [(37, 2), (32, 1), (1, 2)])
def test_all_options_fp32(path, L, ngroups):
    check(path, L=L, ngroups=ngroups, **SMALL)


@pytest.mark.parametrize("path", PATHS)
def test_no_options(path):
    """No D, dt_bias, softplus, initial or final state: the bare recurrence."""
    check(path, with_D=False, with_bias=False, with_initial=False, dt_softplus=False, return_final_state=False,
          **SMALL)


@pytest.mark.parametrize("path", PATHS)
def test_bf16(path):
    check(path, dtype=torch.bfloat16, L=23, **SMALL)


def test_torch_path_batch_heads_and_chunk_sizes():
    """Several heads per group, a batch, and chunk sizes that are not powers of two or exceed L."""
    for chunk in (5, 37, 64):
        check(lambda **kw: ssd_chunked(chunk_size=chunk, **kw), batch=2, nheads=6, ngroups=3)


@needs_triton
def test_triton_several_heads_per_group_and_padded_dims():
    """Three heads per group atomically sharing dB/dC; headdim and dstate that are not powers of two."""
    check(lambda **kw: _triton(chunk_size=16, **kw), batch=1, L=20, nheads=3, ngroups=1, headdim=6, dstate=17)


@needs_triton
@pytest.mark.parametrize("dtype, deterministic", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_triton_backward_over_several_slices_of_the_state(monkeypatch, dtype, deterministic):
    """The backward kernels split d_state into slices of BWD_SLICE (64 at real shapes, to fit the registers):
    with slices of 16, d_state 40 is 3 slices, the last partly masked, and 33 is 3 with one column in the last."""
    from ssmforge import kernels
    from ssmforge.kernels.triton import ssd as triton_ssd

    monkeypatch.setattr(triton_ssd, "BWD_SLICE", 16)
    monkeypatch.setattr(kernels, "_deterministic", deterministic)  # set_deterministic, undone after the test
    check(lambda **kw: _triton(chunk_size=16, **kw), dtype=dtype, batch=2, L=37, nheads=3, ngroups=1, headdim=6,
          dstate=40)
    check(lambda **kw: _triton(chunk_size=32, **kw), dtype=dtype, batch=1, L=40, nheads=2, ngroups=2, headdim=8,
          dstate=33)


@needs_triton
def test_triton_rejects_chunks_it_cannot_tile():
    with pytest.raises(ValueError, match="power of two >= 16"):
        _triton(**{k: v.detach() if v is not None else None for k, v in make_inputs(**SMALL).items()}, chunk_size=24)


def test_autocast_does_not_lower_the_torch_path():
    inputs = {k: v.detach() if v is not None else None for k, v in make_inputs(**SMALL).items()}
    want = ssd_scan_ref(**inputs, dt_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssd_chunked(**inputs, chunk_size=16, dt_softplus=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dispatch():
    assert kernels.ssd_default_backend(torch.device("cpu")) == "torch"
    assert kernels.ssd_default_backend(torch.device("cuda")) == ("triton" if triton_available() else "torch")
    inputs = {k: v.detach() if v is not None else None for k, v in make_inputs(**SMALL).items()}
    want, want_last = ssd_scan_ref(**inputs, return_final_state=True)
    for backend in (None, "ref", "torch"):
        y, last = ssd_scan(**inputs, chunk_size=16, return_final_state=True, backend=backend)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(last, want_last, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ssd_scan(**inputs, backend="magic")


def scalar_ssd(x, dt, A, B, C, D, dt_bias, h0):
    """h <- exp(dt A) h + dt x B^T ; y = h C + D x, per batch, head, headdim and state index: pure Python."""
    batch, L, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    y = torch.zeros(x.shape, dtype=torch.float64)
    last = torch.zeros(batch, nheads, headdim, dstate, dtype=torch.float64)
    for b in range(batch):
        for hd in range(nheads):
            grp = hd // (nheads // ngroups)
            for p in range(headdim):
                h = [float(h0[b, hd, p, i]) for i in range(dstate)]
                for t in range(L):
                    step = math.log1p(math.exp(float(dt[b, t, hd]) + float(dt_bias[hd])))
                    out = float(D[hd]) * float(x[b, t, hd, p])
                    decay, u = math.exp(step * float(A[hd])), step * float(x[b, t, hd, p])
                    for i in range(dstate):
                        h[i] = decay * h[i] + u * float(B[b, t, grp, i])
                        out += h[i] * float(C[b, t, grp, i])
                    y[b, t, hd, p] = out
                last[b, hd, p] = torch.tensor(h)
    return y, last


def test_oracle_equals_the_scalar_recurrence():
    inputs = {k: v.detach() for k, v in make_inputs(batch=2, L=6, nheads=4, headdim=3, ngroups=2, dstate=3).items()}
    y, last = ssd_scan_ref(**inputs, dt_softplus=True, return_final_state=True)
    want_y, want_last = scalar_ssd(**{k: inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")},
                                   h0=inputs["initial_state"])
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)


def test_state_update_steps_equal_the_scan():
    inputs = {k: v.detach() for k, v in make_inputs(L=9, nheads=4, ngroups=2).items()}
    want, want_last = ssd_scan_ref(**inputs, dt_softplus=True, return_final_state=True)
    state, steps = inputs["initial_state"], []
    for t in range(9):
        y, state = ssd_state_step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                                  inputs["C"][:, t], D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_last, rtol=1e-5, atol=1e-5)
