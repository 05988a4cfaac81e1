"""Every fast selective-scan path against the sequential oracle, forward and every gradient."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge.kernels import selective_scan_ref
from ssmforge.kernels.cpu import selective_scan_chunked, selective_scan_cpu
from ssmforge.kernels.selective_scan import triton_available

from .oracle import assert_matches, values_and_grads


def make_inputs(batch=2, d=8, L=37, n=5, bc="var", groups=2, dtype=torch.float32, with_z=True, with_D=True,
                with_bias=True, seed=0):
    """Random scan inputs, all requiring grad. bc: "fixed" (d, n), "var" (batch, n, L) or "grouped"
    (batch, groups, n, L). A is negative as in Mamba; D, delta_bias and A stay fp32 as in the model."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    bc_shape = {"fixed": (d, n), "var": (batch, n, L), "grouped": (batch, groups, n, L)}[bc]
    bc_dtype = torch.float32 if bc == "fixed" else dtype
    inputs = dict(
        u=rand(batch, d, L), delta=rand(batch, d, L, scale=0.5), A=-torch.rand(d, n, generator=g) * 2 - 0.1,
        B=rand(*bc_shape, dt=bc_dtype), C=rand(*bc_shape, dt=bc_dtype),
        D=rand(d, dt=torch.float32) if with_D else None, z=rand(batch, d, L) if with_z else None,
        delta_bias=rand(d, scale=0.3, dt=torch.float32) if with_bias else None,
    )
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_with_grads(fn, inputs, delta_softplus, return_last_state, **kwargs):
    result = fn(**inputs, delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
    out, last = result if return_last_state else (result, None)
    return values_and_grads({"out": out, "last_state": last}, inputs)


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _triton(**kwargs):
    from ssmforge.kernels.triton import selective_scan_triton

    return selective_scan_triton(chunk=8, **kwargs)


# small chunks so that every path carries its state across several chunks at these lengths
PATHS = {
    "cpu": lambda **kw: selective_scan_cpu(chunk=8, **kw),
    "chunked": lambda **kw: selective_scan_chunked(chunk=8, **kw),
    "triton": pytest.param(_triton, marks=needs_triton),
}
PATH_PARAMS = [pytest.param(v, id=k) if callable(v) else pytest.param(*v.values, id=k, marks=v.marks)
               for k, v in PATHS.items()]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check(path, delta_softplus=True, return_last_state=True, dtype=torch.float32, **shape):
    inputs = make_inputs(dtype=dtype, **shape)
    want = run_with_grads(selective_scan_ref, inputs, delta_softplus, return_last_state)
    got = run_with_grads(path, inputs, delta_softplus, return_last_state)
    assert got["out"].dtype == want["out"].dtype
    assert_matches(got, want, TOL[dtype])


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("bc", ["fixed", "var", "grouped"])
@pytest.mark.parametrize("L", [37, 16, 1])  # not a multiple of the chunk, a multiple, a single step
def test_all_options_fp32(path, bc, L):
    check(path, bc=bc, L=L)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("bc", ["fixed", "var", "grouped"])
def test_no_options(path, bc):
    """No z, D, delta_bias, softplus or last state: the bare recurrence."""
    check(path, bc=bc, with_z=False, with_D=False, with_bias=False, delta_softplus=False, return_last_state=False)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("option", ["z", "D", "bias", "softplus", "last_state"])
def test_one_option_each(path, option):
    check(path, bc="var", with_z=option == "z", with_D=option == "D", with_bias=option == "bias",
          delta_softplus=option == "softplus", return_last_state=option == "last_state")


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("bc", ["fixed", "var", "grouped"])
def test_bf16(path, bc):
    check(path, bc=bc, dtype=torch.bfloat16)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_batch_one_and_odd_shapes(path):
    check(path, batch=1, d=6, L=23, n=16, bc="grouped", groups=3)  # 2 channels per group, n a power of two
    check(path, batch=1, d=3, L=9, n=3, bc="var")


@pytest.mark.slow
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_longer_sequence(path):
    check(path, batch=2, d=4, L=100, n=8, bc="grouped", groups=2)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_strong_decay_is_stable(path):
    """delta * A far below the exp range (-1e3 per step): no overflow or NaN, states reset each step."""
    inputs = make_inputs(bc="var", with_bias=False, L=20)
    with torch.no_grad():
        inputs["delta"].mul_(0).add_(50.0)
        inputs["A"].mul_(10)
    want = run_with_grads(selective_scan_ref, inputs, False, True)
    got = run_with_grads(path, inputs, False, True)
    assert_matches(got, want, 1e-4)


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_gates_far_below_the_range_of_exp_stay_finite(path):
    """z and delta reaching +-300: the z gate's sigmoid and delta's softplus (and their derivatives) where
    exp(-x) overflows float32 (below -88.7). A build with -ffast-math once gave NaN there."""
    inputs = make_inputs(bc="var", L=37)
    with torch.no_grad():
        inputs["z"].mul_(100)
        inputs["delta"].mul_(200)
    assert inputs["z"].min() < -89 and inputs["delta"].min() < -89
    want = run_with_grads(selective_scan_ref, inputs, True, True)
    assert_matches(run_with_grads(path, inputs, True, True), want, 1e-4)


@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("B_kind", ["fixed", "var"])
def test_mixed_B_with_grouped_C(path, B_kind):
    """B fixed (d, n) or shared (batch, n, L) while C is grouped (batch, groups, n, L)."""
    inputs = make_inputs(bc="grouped", groups=2)
    B_shape = (8, 5) if B_kind == "fixed" else (2, 5, 37)
    inputs["B"] = torch.randn(*B_shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    want = run_with_grads(selective_scan_ref, inputs, True, True)
    assert_matches(run_with_grads(path, inputs, True, True), want, 1e-4)


def test_cpu_saves_no_full_states():
    """Autograd keeps the inputs, B/C transposed and one state per chunk: nothing of size (batch, d, L, n)."""
    batch, d, L, n = 2, 64, 256, 16
    inputs = make_inputs(batch=batch, d=d, L=L, n=n, bc="var")
    input_ptrs = {t.data_ptr() for t in inputs.values() if t is not None}
    extra = []

    def pack(t):
        if t.data_ptr() not in input_ptrs:
            extra.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan_cpu(**inputs, delta_softplus=True)
    chunk_states = batch * d * n * -(-L // 64)
    assert sum(extra) <= 2 * batch * L * n + chunk_states < batch * d * L * n / 16
    out.sum().backward()


def test_cpu_falls_back_to_chunked_without_compiler(monkeypatch):
    """Where no C compiler can build the kernel, the "cpu" backend still answers (chunked PyTorch)."""
    import ssmforge.kernels.cpu.selective_scan as fused

    monkeypatch.setattr(fused, "cpu_kernels_available", lambda: False)
    inputs = make_inputs(bc="var")
    want = run_with_grads(selective_scan_ref, inputs, True, True)
    assert_matches(run_with_grads(fused.selective_scan_cpu, inputs, True, True), want, 1e-4)


def test_build_failure_warns_and_returns_none(monkeypatch, tmp_path, caplog):
    from ssmforge.kernels.cpu import build

    build.load_library.cache_clear()
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    try:
        assert build.load_library() is None
        assert "unavailable" in caplog.text
    finally:
        build.load_library.cache_clear()
