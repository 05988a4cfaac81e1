"""The survey families' kernels (kernels.ssm_kernels). The diagonal SSMs' Vandermonde kernel: its definition
(kernels.ref.vandermonde_ref) is the impulse response of the recurrence it stands for, and its transpose's
(vandermonde_summary_ref) the state that the inputs in reverse order leave. The fused Triton kernels,
Vandermonde and S4's Cauchy sums (run in the interpreter here), equal their definitions in values and every
gradient at ragged shapes; the dispatch picks Triton for CUDA tensors only. The LRU's linear scan, PyTorch's
doubling, the C kernel (the CPU default) and the Triton kernel, equals a step-by-step loop in values and
gradients. (S4's whole kernel, Cauchy sums
included, is checked against its recurrence in tests/models/test_s4.py.)"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ssmforge import kernels
from ssmforge.kernels import cauchy, cauchy_ref, vandermonde, vandermonde_ref
from ssmforge.kernels.backends import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def parameters(H, N, dtype=torch.complex128, seed=0):
    """w and dt_lam (H, N) as the diagonal families make them: decaying modes (Re dt_lam < 0) of any frequency."""
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32

    def normal():
        return torch.randn(H, N, generator=g, dtype=real)

    w = torch.complex(normal(), normal())
    dt_lam = torch.complex(-torch.rand(H, N, generator=g, dtype=real) * 0.2, normal() * 3)
    return w.requires_grad_(), dt_lam.requires_grad_()


def impulse_response(w, dt_lam, length):
    """K_l from the recurrence x_l = z x_{l-1} + u_l, y_l = Re(sum_n w_n x_l,n), z = exp(dt_lam), fed a unit
    impulse at l = 0: one step at a time."""
    z, x, taps = torch.exp(dt_lam), torch.zeros_like(w), []
    for step in range(length):
        x = z * x + (1.0 if step == 0 else 0.0)
        taps.append((w * x).sum(-1).real)
    return torch.stack(taps, -1)


def test_the_definition_is_the_recurrences_impulse_response():
    w, dt_lam = parameters(3, 5)
    torch.testing.assert_close(vandermonde_ref(w, dt_lam, 50), impulse_response(w, dt_lam, 50), rtol=1e-12,
                               atol=1e-12)


def values_and_gradients(function, w, dt_lam, length):
    K = function(w, dt_lam, length)
    weights = torch.randn(K.shape, generator=torch.Generator().manual_seed(1), dtype=K.dtype)
    return (K, *torch.autograd.grad((K * weights).sum(), [w, dt_lam]))


@needs_triton
@pytest.mark.parametrize("H,N,length", [
    (3, 37, 200),  # modes and positions past the tiles' edges (16 or 32 modes, 64 positions)
    (2, 64, 128),  # whole tiles
    (1, 1, 1),
    (4, 5, 300),
])
@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 2e-5)])
def test_triton_equals_the_definition_values_and_gradients(H, N, length, dtype, tol):
    w, dt_lam = parameters(H, N, dtype)
    got = values_and_gradients(lambda *a: vandermonde(*a, backend="triton"), w, dt_lam, length)
    want = values_and_gradients(vandermonde_ref, w, dt_lam, length)
    for name, a, b in zip(("K", "dw", "ddt_lam"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=name)


@needs_triton
def test_a_conjugated_view_is_read_as_its_values():
    """A parameter handed over as a lazily conjugated view (what w.conj() gives) is resolved, not read raw."""
    w, dt_lam = parameters(2, 7)
    w = w.detach().conj()
    torch.testing.assert_close(vandermonde(w, dt_lam.detach(), 30, backend="triton"),
                               vandermonde_ref(w.resolve_conj(), dt_lam.detach(), 30), rtol=1e-12, atol=1e-12)


@needs_triton
def test_the_custom_op_passes_opcheck_and_traces_on_fake_tensors():
    from ssmforge.kernels.triton.vandermonde import vandermonde_triton_op

    w, dt_lam = (torch.view_as_real(t.detach()).contiguous().requires_grad_() for t in parameters(3, 37))
    torch.library.opcheck(vandermonde_triton_op, (w, dt_lam, 70))
    with FakeTensorMode() as mode:
        fake = vandermonde_triton_op(mode.from_tensor(w), mode.from_tensor(dt_lam), 70)
    assert fake.shape == (3, 70) and fake.dtype == torch.float64


def final_state(u, dt_lam):
    """The state x_L-1 of x_l = z x_{l-1} + u_l from zeros, z = exp(dt_lam) (H, N), inputs u (H, M, L) real:
    one step at a time -> (H, M, N)."""
    z = torch.exp(dt_lam)[:, None, :]
    x = torch.zeros(*u.shape[:-1], dt_lam.shape[-1], dtype=dt_lam.dtype)
    for step in range(u.shape[-1]):
        x = z * x + u[..., step, None]
    return x


def test_the_summary_definition_is_the_state_the_reversed_inputs_leave():
    _, dt_lam = parameters(3, 5)
    u = torch.randn(3, 2, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(kernels.vandermonde_summary_ref(u.flip(-1), dt_lam), final_state(u, dt_lam),
                               rtol=1e-12, atol=1e-12)


def test_rows_per_channel_are_each_their_own_kernel():
    """w (H, M, N): row m of channel h is the kernel of weights w[h, m] with the channel's dt_lam."""
    w, dt_lam = parameters(3, 5)
    rows = torch.stack([w, 2 * w.flip(-1)], 1)
    per_row = torch.stack([vandermonde_ref(rows[:, m], dt_lam, 20) for m in range(2)], 1)
    torch.testing.assert_close(vandermonde_ref(rows, dt_lam, 20), per_row, rtol=1e-12, atol=1e-12)


def summary_values_and_gradients(function, v, dt_lam):
    S = function(v, dt_lam)
    weights = torch.randn(S.shape, generator=torch.Generator().manual_seed(1), dtype=S.dtype)
    return (S, *torch.autograd.grad((S * weights).real.sum(), [v, dt_lam]))


@needs_triton
@pytest.mark.parametrize("H,M,N,length", [
    (3, 2, 37, 200),  # modes and positions past the tiles' edges, two rows per channel
    (2, 1, 64, 128),  # whole tiles
    (1, 1, 1, 1),
    (4, 3, 5, 300),
])
@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 2e-5)])
def test_the_triton_summary_and_per_row_kernel_equal_the_definitions_values_and_gradients(H, M, N, length, dtype,
                                                                                          tol):
    w, dt_lam = parameters(H, N, dtype)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(H, M, length, generator=g, dtype=dt_lam.real.dtype, requires_grad=True)
    rows = (w.detach()[:, None] * torch.randn(H, M, N, generator=g, dtype=dtype)).requires_grad_()
    cases = {
        "summary": (summary_values_and_gradients(lambda *a: kernels.vandermonde_summary(*a, backend="triton"), v,
                                                 dt_lam),
                    summary_values_and_gradients(kernels.vandermonde_summary_ref, v, dt_lam)),
        "rows": (values_and_gradients(lambda *a: vandermonde(*a, backend="triton"), rows, dt_lam, length),
                 values_and_gradients(vandermonde_ref, rows, dt_lam, length)),
    }
    for case, (got, want) in cases.items():
        for name, a, b in zip(("values", "d(first)", "ddt_lam"), got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, (case, name)
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=f"{case} {name}")


@needs_triton
def test_the_summary_op_passes_opcheck_and_traces_on_fake_tensors():
    from ssmforge.kernels.triton.vandermonde import vandermonde_summary_triton_op

    _, dt_lam = parameters(6, 37)
    lam = torch.view_as_real(dt_lam.detach()).contiguous().requires_grad_()
    v = torch.randn(6, 70, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(vandermonde_summary_triton_op, (v, lam))
    with FakeTensorMode() as mode:
        fake = vandermonde_summary_triton_op(mode.from_tensor(v), mode.from_tensor(lam))
    assert fake.shape == (6, 37, 2) and fake.dtype == torch.float64


@pytest.mark.parametrize("kernel,on_cpu", [("vandermonde", "ref"), ("cauchy", "ref"), ("linear_scan", "cpu")])
def test_the_default_backend_is_triton_for_cuda_tensors_only(kernel, on_cpu, monkeypatch):
    """Triton on CUDA where it is installed, else PyTorch's; on CPU the C kernel where the kernel has one."""
    registry, default = getattr(kernels, f"{kernel.upper()}_BACKENDS"), getattr(kernels, f"{kernel}_default_backend")
    assert default(torch.device("cpu")) == on_cpu
    monkeypatch.setitem(registry, "triton", registry["ref"])  # as if triton were installed
    assert default(torch.device("cuda")) == "triton"
    monkeypatch.delitem(registry, "triton")  # without triton: PyTorch's path, usable on a GPU
    assert default(torch.device("cuda")) == "ref"


def test_an_unknown_backend_is_refused():
    w, dt_lam = parameters(1, 2)
    with pytest.raises(ValueError, match="unknown vandermonde backend 'cpu'"):
        vandermonde(w, dt_lam, 4, backend="cpu")


@needs_triton
def test_torch_compile_traces_it_whole():
    """fullgraph: no graph break at the complex-to-pairs views or the custom op; values and gradients as eager."""
    def loss(w, dt_lam):
        return vandermonde(w, dt_lam, 50, backend="triton").square().sum()

    w, dt_lam = parameters(3, 7, torch.complex64)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(w, dt_lam)
    want = loss(w, dt_lam)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [w, dt_lam]), torch.autograd.grad(want, [w, dt_lam])):
        torch.testing.assert_close(a, b)


def complex_normal(*shape, dtype=torch.complex128, generator):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.complex(torch.randn(*shape, generator=generator, dtype=real),
                         torch.randn(*shape, generator=generator, dtype=real))


def cauchy_inputs(H, J, N, K, dtype=torch.complex128):
    """S4's shapes: nodes 1 - z at the roots of unity z_k, scales (1 + z) dt / 2, HiPPO-like poles (Re < 0)."""
    g = torch.Generator().manual_seed(0)
    z = torch.exp(-2j * torch.pi * torch.arange(K, dtype=torch.float64) / (2 * max(K - 1, 1))).to(dtype)
    dt = torch.rand(H, 1, generator=g, dtype=torch.float64) * 0.1 + 0.001
    poles = torch.complex(-0.5 - torch.rand(H, N, generator=g, dtype=torch.float64),
                          torch.randn(H, N, generator=g, dtype=torch.float64) * 10).to(dtype)
    scales = ((1 + z) * dt / 2).to(dtype)
    numerators = complex_normal(H, J, N, dtype=dtype, generator=g)
    return numerators.requires_grad_(), poles.requires_grad_(), 1 - z, scales.requires_grad_()


@needs_triton
@pytest.mark.parametrize("H,J,N,K", [
    (3, 4, 37, 70),  # poles and nodes past the tiles' edges (16 poles, 32 nodes)
    (2, 4, 64, 129),  # S4's N 64 (whole tiles of poles) at L 256: L/2 + 1 nodes
    (1, 1, 1, 1),
])
@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 2e-5)])
def test_fused_cauchy_sums_equal_the_definition_values_and_gradients(H, J, N, K, dtype, tol):
    numerators, poles, nodes, scales = cauchy_inputs(H, J, N, K, dtype)
    weights = complex_normal(H, J, K, dtype=dtype, generator=torch.Generator().manual_seed(1))
    results = []
    for function in (lambda *a: cauchy(*a, backend="triton"), cauchy_ref):
        out = function(numerators, poles, nodes, scales)
        loss = (out * weights).real.sum()
        results.append((out, *torch.autograd.grad(loss, [numerators, poles, scales])))
    for name, a, b in zip(("sums", "dnumerators", "dpoles", "dscales"), *results):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


@needs_triton
def test_the_cauchy_op_passes_opcheck():
    from ssmforge.kernels.triton.cauchy import cauchy_triton_op

    numerators, poles, nodes, scales = cauchy_inputs(2, 4, 19, 40)
    pairs = [torch.view_as_real(t.detach()).contiguous() for t in (numerators, poles, scales, nodes)]
    torch.library.opcheck(cauchy_triton_op, (*(t.requires_grad_() for t in pairs[:3]), pairs[3]))


def loop_scan(a, b):
    """x_t = a_t x_{t-1} + b_t over dim 1 from zero, one step at a time."""
    x, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        x = a[:, t] * x + b[:, t]
        out.append(x)
    return torch.stack(out, 1)


SCAN_TEST_BACKENDS = ["ref", "cpu", pytest.param("triton", marks=needs_triton)]
FUSED_SCANS = ["cpu", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", SCAN_TEST_BACKENDS)
@pytest.mark.parametrize("length,states", [(1, 3), (2, 3), (5, 3), (16, 3), (37, 5), (64, 32), (70, 40)])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.float64])
def test_scan_equals_the_sequential_loop_forward_and_backward(backend, length, states, dtype):
    """Lengths and state counts past the Triton kernel's (32, 32) tiles, resets (a_t = 0, at t = 0 too), zero
    inputs, and one `a` broadcast over the batch (its gradient summed over the rows)."""
    g = torch.Generator().manual_seed(length)
    a = torch.randn(2, length, states, generator=g, dtype=dtype)
    b = torch.randn(2, length, states, generator=g, dtype=dtype)
    a[:, ::5] = 0
    a[1, 3:7] = 0
    b[0, 2:6] = 0
    shared = torch.randn(1, length, states, generator=g, dtype=dtype) * 0.9
    weight = torch.randn(2, length, states, generator=g, dtype=dtype)

    def loss(x):  # a real loss of complex outputs: its gradients follow PyTorch's conjugate convention in both
        return (torch.view_as_real(x) * torch.view_as_real(weight)).sum() if x.is_complex() else (x * weight).sum()

    for a_ in (a, shared):
        a_, b_ = a_.clone().requires_grad_(), b.clone().requires_grad_()
        fast, slow = kernels.linear_scan(a_, b_, backend), loop_scan(a_, b_)
        scale = slow.abs().max().item()
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12 * scale)
        for got, want in zip(torch.autograd.grad(loss(fast), [a_, b_]), torch.autograd.grad(loss(slow), [a_, b_])):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("backend", SCAN_TEST_BACKENDS)
def test_scan_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    a = (complex_normal(2, 9, 3, generator=g) * 0.5).requires_grad_()
    b = complex_normal(2, 9, 3, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.linear_scan(a, b, backend), (a, b), fast_mode=True)


@pytest.mark.parametrize("backend", SCAN_TEST_BACKENDS)
def test_lambda_expanded_over_time_is_read_in_place_with_its_gradient(backend):
    """The LRU's `a` without document resets: one (N,) lambda expanded to (1, L, N) (strides 0, 0, 1), its
    gradient the sum over every row and position; past one block of the C kernel's states (64)."""
    g = torch.Generator().manual_seed(1)
    lam = (torch.polar(torch.rand(70, generator=g, dtype=torch.float64),
                       torch.rand(70, generator=g, dtype=torch.float64) * 6)).requires_grad_()
    b = complex_normal(3, 45, 70, generator=g).requires_grad_()
    fast, slow = kernels.linear_scan(lam.expand(1, 45, 70), b, backend), loop_scan(lam.expand(1, 45, 70), b)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weight = complex_normal(3, 45, 70, generator=g)
    grads = [torch.autograd.grad((x * weight).real.sum(), [lam, b]) for x in (fast, slow)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("backend", FUSED_SCANS)
def test_the_fused_scan_in_float32_is_as_close_as_rounding_and_reads_conjugated_views(backend):
    g = torch.Generator().manual_seed(0)
    a = complex_normal(3, 100, 40, dtype=torch.complex64, generator=g) * 0.7
    b = complex_normal(3, 100, 40, dtype=torch.complex64, generator=g)
    want = loop_scan(a.conj().resolve_conj().to(torch.complex128), b.to(torch.complex128))
    got = kernels.linear_scan(a.conj(), b, backend)  # a lazily conjugated view, resolved, not read raw
    assert got.dtype == torch.complex64
    torch.testing.assert_close(got.to(torch.complex128), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def scan_op_and_inputs(backend: str, g: torch.Generator):
    """The backend's custom op and arguments for it: Triton's takes (re, im) pairs, the C kernel's complex."""
    if backend == "cpu":
        from ssmforge.kernels.cpu.linear_scan import linear_scan_cpu_op

        return linear_scan_cpu_op, [complex_normal(2, 40, 5, generator=g).requires_grad_() for _ in "ab"], (2, 40, 5)
    from ssmforge.kernels.triton.linear_scan import linear_scan_triton_op

    pairs = [torch.view_as_real(complex_normal(2, 40, 5, generator=g)).contiguous().requires_grad_() for _ in "ab"]
    return linear_scan_triton_op, [*pairs, True], (2, 40, 5, 2)


@pytest.mark.parametrize("backend", FUSED_SCANS)
def test_the_scan_op_passes_opcheck_traces_on_fake_tensors_and_compiles_whole(backend):
    g = torch.Generator().manual_seed(0)
    op, args, shape = scan_op_and_inputs(backend, g)
    torch.library.opcheck(op, tuple(args))
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) if torch.is_tensor(t) else t for t in args))
    assert fake.shape == shape and fake.dtype == args[0].dtype

    def loss(a, b):
        return kernels.linear_scan(a, b, backend).abs().square().sum()

    a, b = (complex_normal(2, 40, 5, dtype=torch.complex64, generator=g).requires_grad_() for _ in "ab")
    got, want = torch.compile(loss, fullgraph=True, backend="aot_eager")(a, b), loss(a, b)
    torch.testing.assert_close(got, want)
    for x, y in zip(torch.autograd.grad(got, [a, b]), torch.autograd.grad(want, [a, b])):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", FUSED_SCANS)
@pytest.mark.parametrize("a_shape,b_shape,dtypes", [
    ((2, 8, 3), (3, 8, 3), (torch.complex64,) * 2),  # a's batch neither 1 nor b's
    ((1, 8, 4), (2, 8, 3), (torch.complex64,) * 2),  # a's states not b's
    ((1, 8, 3), (2, 8, 3), (torch.complex64, torch.complex128)),
])
def test_the_fused_scan_refuses_mismatched_inputs_in_one_line(backend, a_shape, b_shape, dtypes):
    with pytest.raises(ValueError, match=r"^linear_scan takes a \(batch or 1, L, N\) and b \(batch, L, N\) of one "
                                         r"dtype; got a "):
        kernels.linear_scan(torch.zeros(a_shape, dtype=dtypes[0]), torch.zeros(b_shape, dtype=dtypes[1]), backend)
