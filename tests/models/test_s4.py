"""The S4 mixer: the FFT forward (Cauchy kernel for bilinear, Krylov kernel for zoh) and every gradient against a
sequential oracle on dense matrices, the state a chunk leaves and continues, step decoding, document resets,
context parallelism (ranks simulated by threads), the HiPPO-LegS initialisation, parameter and FLOP counts, fp32
parameters, config errors and the tiny config."""
import copy
import math

import pytest
import torch

from ssmforge.errors import ConfigError
from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.models import s4 as s4_module
from ssmforge.models import s4_bilinear
from ssmforge.models.hf import cast_model

from .contracts import (ONE_BYTE_MIB, assert_causal, assert_chunks_then_steps_match_forward, assert_steps_match_forward,
                        model_config)
from .test_document_resets import assert_documents_run_alone

VOCAB = 61
EOS = 0
SSM_PARAMETERS = ("Lambda_re_log", "Lambda_im", "P", "B", "C", "log_dt", "D")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def s4_config(**overrides) -> ModelConfig:
    # dt up to 0.5: the kernel's memory is a few dozen steps, so the tests' sequences see it decay
    base = dict(family="s4", d_model=8, n_layer=2, vocab_size=VOCAB, s4=dict(d_state=8, dt_min=0.05, dt_max=0.5))
    return model_config(base, overrides)


def build(config: ModelConfig, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def mixer_of(config: ModelConfig, seed: int = 0, double: bool = True):
    mixer = build(config, seed).layers[0].mixer
    return mixer.double() if double else mixer


def with_complex_p(mixer):
    """The mixer with random imaginary parts in P: HiPPO's P is real, so A = diag(Lambda) - p p* is complex
    symmetric at initialisation, where a transposed Abar would go unseen."""
    with torch.no_grad():
        mixer.P[..., 1] = 0.3 * torch.randn(mixer.P.shape[:-1], generator=torch.Generator().manual_seed(5))
    return mixer


# --- the oracle --------------------------------------------------------------------------------------------------

def dense_system(mixer):
    """(Abar (H, N, N), Bbar (H, N), C (H, N)) written from the paper: the full N-state system (each kept mode and
    its conjugate), A = diag(Lambda) - p p* dense, discretised by solves (bilinear) or the matrix exponential."""
    pairs = lambda x: torch.cat([x, x.conj()], dim=-1)  # noqa: E731
    lam = pairs(torch.complex(-mixer.Lambda_re_log.exp(), mixer.Lambda_im))
    p, b, c = (pairs(torch.view_as_complex(x)) for x in (mixer.P, mixer.B, mixer.C))
    A = torch.diag_embed(lam) - p[:, :, None] * p.conj()[:, None, :]
    dt = mixer.log_dt.exp()[:, None, None]
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    if mixer.discretization == "bilinear":
        Abar = torch.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A)
        Bbar = torch.linalg.solve(eye - dt / 2 * A, dt * b[..., None])[..., 0]
    else:
        Abar = torch.linalg.matrix_exp(dt * A)
        Bbar = torch.linalg.solve(A, (Abar - eye) @ b[..., None])[..., 0]
    return Abar, Bbar, c


def run_system(system, w, seq_idx=None, h0=None):
    """x_t = Abar x_{t-1} + Bbar w_t (x zero at every document start, h0 before the first), Re(C x_t):
    returns the outputs (batch, H, L) and the final state (batch, H, N)."""
    Abar, Bbar, c = system
    batch, H, L = w.shape
    x = torch.zeros(batch, H, Abar.shape[-1], dtype=Abar.dtype) if h0 is None else h0
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            x = x * (seq_idx[:, t] == seq_idx[:, t - 1]).to(w.dtype)[:, None, None]
        x = torch.einsum("hnm,bhm->bhn", Abar, x) + Bbar * w[..., t, None]
        ys.append((c * x).sum(-1).real)
    return torch.stack(ys, dim=-1), x


def oracle_ssm(mixer, u, seq_idx=None):
    """S4's SSM output before the GELU: y_t = Re(C x_t) + D u_t."""
    y, _ = run_system(dense_system(mixer), u, seq_idx)
    return y + mixer.D[:, None] * u


def assert_grads_match(mixer, fast, slow, inputs, tol):
    """Gradients of a random-weighted sum of the outputs, with respect to every parameter and the inputs."""
    weight = torch.randn(fast.shape, generator=torch.Generator().manual_seed(11), dtype=fast.dtype)
    params = dict(mixer.named_parameters())
    targets = list(params.values()) + [inputs]
    g_fast = torch.autograd.grad((fast * weight).sum(), targets, allow_unused=True)
    g_slow = torch.autograd.grad((slow * weight).sum(), targets, allow_unused=True)
    worst = 0.0
    for name, a, b in zip([*params, "inputs"], g_fast, g_slow):
        if b is None:  # not reached by the oracle (the GLU output when comparing the SSM alone)
            assert a is None or a.abs().max() == 0, name
            continue
        assert b.abs().max() > 0, name
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    return worst


def packed_seq_idx(L: int, starts, batch: int = 2) -> torch.Tensor:
    """seq_idx (batch, L): row 0 with documents starting at `starts`, row 1 one document."""
    ids = torch.ones(batch, L, dtype=torch.long)
    for s in starts:
        ids[0, s] = EOS
    return document_index(ids, EOS)


# --- the SSM against the oracle ------------------------------------------------------------------------------

@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("channel_blocks", [False, True])
def test_ssm_and_gradients_equal_the_sequential_oracle(discretization, resets, channel_blocks):
    # channel_blocks: the kernel built one channel at a time (recomputed_by_channels), as wide layers are
    blocks = dict(kernel_block_mib=ONE_BYTE_MIB) if channel_blocks else {}
    mixer = mixer_of(s4_config(s4=dict(discretization=discretization), **blocks))
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 8, 40, generator=g, dtype=torch.float64, requires_grad=True)
    seq_idx = packed_seq_idx(40, [1, 9, 10, 31]) if resets else None
    fast, slow = mixer.ssm(u, seq_idx), oracle_ssm(mixer, u, seq_idx)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert assert_grads_match(mixer, fast, slow, u, 1e-9) < 1e-9
    # the whole block: GELU and the GLU output on the oracle's SSM, every parameter's gradient
    hidden = u.detach().transpose(1, 2).requires_grad_()
    fast = mixer(hidden, seq_idx=seq_idx)
    slow = mixer.output(oracle_ssm(mixer, hidden.transpose(1, 2), seq_idx).transpose(1, 2))
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert_grads_match(mixer, fast, slow, hidden, 1e-9)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_float32_forward_with_the_fft_conv_is_close_to_the_float64_oracle(discretization):
    mixer = mixer_of(s4_config(s4=dict(discretization=discretization)), double=False)
    u = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2))
    seq_idx = packed_seq_idx(64, [20, 21, 50])
    with torch.no_grad():
        fast = mixer.ssm(u, seq_idx)
        slow = oracle_ssm(mixer.double(), u.double(), seq_idx)
    assert ((fast.double() - slow).abs().max() / slow.abs().max()) < 1e-6  # measured 1e-7


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_paper_default_kernel_is_accurate_in_float32(discretization):
    """d_state 64, dt in [0.001, 0.1]: the float32 kernel (Cauchy sums, or float64 zoh then Krylov powers)
    against the float64 one, over a long kernel."""
    mixer = mixer_of(s4_config(d_model=4, s4=dict(d_state=64, dt_min=0.001, dt_max=0.1,
                                                  discretization=discretization)), double=False)
    with torch.no_grad():
        k32 = mixer.kernel(512, *mixer.discrete())
        mixer.double()
        k64 = mixer.kernel(512, *mixer.discrete())
    assert k32.dtype == torch.float32 and k64.dtype == torch.float64
    assert ((k32.double() - k64).abs().max() / k64.abs().max()) < 5e-6  # measured 3e-7 (bilinear), 1.2e-6 (zoh)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_float32_kernel_gradients_are_accurate_at_the_paper_dt(discretization):
    """The discretisation and the Cauchy sums run in float64 (see models.s4): the float32 module's kernel
    gradients stay within a few 1e-6 of the float64 ones (in float32 throughout they were off by 1e-5..3e-4)."""
    mixer = mixer_of(s4_config(d_model=16, s4=dict(d_state=16, dt_min=0.001, dt_max=0.1,
                                                   discretization=discretization)), double=False)
    wide = copy.deepcopy(mixer).double()
    g = torch.Generator().manual_seed(9)
    for L in (1, 17, 64):
        weight = torch.randn(16, L, generator=g, dtype=torch.float64)
        grads = [torch.autograd.grad((m.kernel(L, *m.discrete()) * weight.to(m.log_dt.dtype)).sum(),
                                     [getattr(m, n) for n in SSM_PARAMETERS[:-1]]) for m in (mixer, wide)]
        for name, a, b in zip(SSM_PARAMETERS, *grads):
            assert ((a.double() - b).abs().max() / b.abs().max()) < 5e-6, (L, name)


def test_bilinear_kernel_has_no_pole_at_odd_lengths_and_z_minus_one():
    """The Cauchy kernel at lengths 1, 2, odd and even (z = -1 is a node for even L) equals C Abar^l Bbar."""
    mixer = with_complex_p(mixer_of(s4_config()))
    Abar, Bbar, c = dense_system(mixer)
    with torch.no_grad():
        for L in (1, 2, 5, 16, 33):
            powers = [Bbar]
            for _ in range(L - 1):
                powers.append(torch.einsum("hnm,hm->hn", Abar, powers[-1]))
            want = torch.einsum("hn,lhn->hl", c, torch.stack(powers)).real
            torch.testing.assert_close(mixer.kernel(L, *mixer.discrete()), want, rtol=1e-10, atol=1e-12)


def bilinear_summaries(mixer, w, h0):
    """The bilinear final state of w (batch, H, L) from zero and the response Re(C Abar^(t+1) h0) to h0
    (batch, H, N), by models.s4_bilinear's Cauchy sums, in the mixer's precision: (batch, H, N), (batch, H, L)."""
    dt, lam, p, b, c = mixer.system()
    L = w.shape[-1]
    ones = torch.ones_like(w).transpose(0, 1)
    b_tilde = s4_bilinear.truncated_input(dt, lam, p, b, L)
    c_tilde = s4_bilinear.truncated_output(dt, lam, p, c, L)
    last = s4_bilinear.bilinear_final_state(w.transpose(0, 1), ones, dt, b_tilde, lam, p, L)
    response = s4_bilinear.bilinear_entering_response(h0.transpose(0, 1), ones, dt, c_tilde, lam, p, L)
    return last.transpose(0, 1), response.transpose(0, 1)


def test_bilinear_state_summaries_equal_the_sequential_oracle():
    """The state a chunk leaves and an entering state's response, by Cauchy sums at the roots of unity, are the
    dense system's x_L and Re(C x_t) run step by step, at lengths 1, 2, odd and even, for an entering state that
    is not conjugate-symmetric (the response is the real part of the state's own)."""
    mixer = with_complex_p(mixer_of(s4_config()))
    system = dense_system(mixer)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for L in (1, 2, 5, 16, 33):
            w = torch.randn(3, 8, L, generator=g, dtype=torch.float64)
            h0 = torch.randn(3, 8, 8, generator=g, dtype=torch.complex128)
            last, response = bilinear_summaries(mixer, w, h0)
            torch.testing.assert_close(last, run_system(system, w)[1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(response, run_system(system, torch.zeros_like(w), h0=h0)[0], rtol=1e-10,
                                       atol=1e-12)


def test_bilinear_state_summaries_are_accurate_in_float32_at_the_paper_dt():
    """d_state 64, dt in [0.001, 0.1], 1,000 positions: from float32 parameters, the summaries (float64 inside,
    like the kernel, Abar rebuilt there from the parameters) are within 2e-6 of the same system's in float64
    (5e-7 and 3e-7 here); the Krylov powers in float32 were 6e-6 and 1.2e-5 off, and the sums over the float32
    Abar's powers 9e-7 and 3.3e-6."""
    mixer = mixer_of(s4_config(d_model=16, s4=dict(d_state=64, dt_min=0.001, dt_max=0.1)), double=False)
    wide = copy.deepcopy(mixer).double()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 16, 1000, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 16, 64, generator=g, dtype=torch.complex128)
    with torch.no_grad():
        want = bilinear_summaries(wide, w, h0)
        assert (want[0] - run_system(dense_system(wide), w)[1]).abs().max() < 1e-10 * want[0].abs().max()
        got = bilinear_summaries(mixer, w.float(), h0.to(torch.complex64))
    for a, b in zip(got, want):
        assert a.dtype in (torch.float32, torch.complex64)
        assert (a.to(b.dtype) - b).abs().max() < 2e-6 * b.abs().max()


# --- states: chunks, steps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_chunks_through_a_state_equal_the_oracle_and_leave_its_state(discretization):
    """Chunks of uneven sizes through one state, with document boundaries inside chunks (a chunk continues the
    state's document): the outputs are the whole row's, and the state left is the oracle's x_L (the last
    document's)."""
    mixer = mixer_of(s4_config(s4=dict(discretization=discretization)))
    u = torch.randn(2, 8, 37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seq_idx = packed_seq_idx(37, [5, 12, 13, 30])
    state = mixer.allocate_state(2, u.device, u.dtype)
    assert state.ssm.dtype == torch.complex128 and state.fresh
    cuts = [0, 1, 3, 11, 20, 36, 37]
    with torch.no_grad():
        outs = [mixer.ssm(u[..., a:b], seq_idx[:, a:b], state) for a, b in zip(cuts, cuts[1:])]
        want, final = run_system(dense_system(mixer), u, seq_idx)
    torch.testing.assert_close(torch.cat(outs, -1), want + mixer.D[:, None].detach() * u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, final, rtol=1e-10, atol=1e-10)
    assert final.abs().max() > 0.1  # a real state, not decayed to nothing
    # steps continue it: x = Abar x + Bbar u, y = Re(C x) + D u
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        y = mixer.step_ssm(x, state)
        want, _ = run_system(dense_system(mixer), x[..., None], h0=final)
    torch.testing.assert_close(y, want[..., 0] + mixer.D.detach() * x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_chunks_in_one_channel_blocks_keep_the_whole_rows_values_and_gradients(discretization):
    """Every Krylov power and Cauchy sum built one channel at a time (recomputed_by_channels, model.kernel_block_mib
    of one byte): chunks through a state, with document boundaries inside and between them, give the whole row's
    outputs and gradients (the same parameters, built whole)."""
    mixer = mixer_of(s4_config(s4=dict(discretization=discretization)))
    blocked = mixer_of(s4_config(s4=dict(discretization=discretization), kernel_block_mib=ONE_BYTE_MIB))
    assert (mixer.kernel_block_bytes, blocked.kernel_block_bytes) == (256 * 2**20, 1)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 8, 37, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 8, 37, generator=g, dtype=torch.float64)
    seq_idx = packed_seq_idx(37, [5, 12, 13, 30])
    whole = mixer.ssm(u, seq_idx)
    want = torch.autograd.grad((whole * weights).sum(), [u] + [getattr(mixer, name) for name in SSM_PARAMETERS])
    state = blocked.allocate_state(2, u.device, u.dtype)
    cuts = [0, 3, 11, 20, 37]
    chunks = torch.cat([blocked.ssm(u[..., a:b], seq_idx[:, a:b], state) for a, b in zip(cuts, cuts[1:])], -1)
    got = torch.autograd.grad((chunks * weights).sum(), [u] + [getattr(blocked, name) for name in SSM_PARAMETERS])
    torch.testing.assert_close(chunks, whole, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["u", *SSM_PARAMETERS], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("discretization,prefill", [("bilinear", 0), ("bilinear", 7), ("zoh", 7)])
def test_step_decoding_equals_parallel_forward(discretization, prefill):
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    assert_steps_match_forward(build(s4_config(s4=dict(discretization=discretization))), ids, prefill)


def test_chunked_feeding_through_the_model_state_equals_the_whole_forward():
    model = build(s4_config())
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_chunks_then_steps_match_forward(model, ids)


def test_backward_through_steps_equals_the_fft_backward():
    mixer = build(s4_config()).layers[0].mixer.train()
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    params = dict(mixer.named_parameters())
    fft_grads = torch.autograd.grad((mixer(hidden) * weight).sum(), list(params.values()))
    state = mixer.allocate_state(2, hidden.device, hidden.dtype)
    out = torch.stack([mixer.step(hidden[:, t], state) for t in range(20)], 1)
    step_grads = torch.autograd.grad((out * weight).sum(), list(params.values()))
    for name, a, b in zip(params, fft_grads, step_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item(), msg=name)
    assert all(grad.abs().max() > 0 for grad in fft_grads)


def test_causal():
    assert_causal(build(s4_config()), length=20, position=9, vocab=VOCAB)


# --- documents ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("discretization", ["bilinear", "zoh"])
def test_a_packed_row_equals_each_document_run_alone(discretization):
    model = build(s4_config(s4=dict(discretization=discretization)))
    assert_documents_run_alone(model, [[5, 1, 9, 17]])
    # the negative: without seq_idx the second document sees the first
    ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[:, 6:] - model(ids[:, 6:])).abs().max() > 1e-3


# --- initialisation, parameters, flops, config --------------------------------------------------------------

def test_hippo_legs_initialisation():
    N = 16
    A, B, P = s4_module.hippo_legs(N)
    n = torch.arange(N, dtype=torch.float64)
    for i in range(N):  # the LegS matrix, entry by entry from its definition
        for k in range(N):
            want = -math.sqrt(2 * i + 1) * math.sqrt(2 * k + 1) if i > k else (-(i + 1) if i == k else 0.0)
            assert A[i, k].item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(B, torch.sqrt(2 * n + 1))
    torch.testing.assert_close(P, torch.sqrt(n + 0.5))
    lam, p, b, V = s4_module.hippo_legs_nplr(N)
    Vf = torch.cat([V, V.conj()], 1)
    lamf = torch.cat([lam, lam.conj()])
    torch.testing.assert_close(Vf.conj().T @ Vf, torch.eye(N, dtype=Vf.dtype), rtol=0, atol=1e-12)  # unitary
    legs = Vf @ torch.diag(lamf) @ Vf.conj().T - P[:, None] * P[None, :]
    assert (legs - A).abs().max() < 1e-8
    torch.testing.assert_close(lam.real, torch.full((N // 2,), -0.5, dtype=torch.float64))
    assert (lam.imag > 0).all() and (lam.imag.diff() > 0).all()
    torch.testing.assert_close(p, V.conj().T @ P.to(V.dtype))
    torch.testing.assert_close(b, V.conj().T @ B.to(V.dtype))
    assert p.imag.abs().max() < 1e-12 and (p.real > 0).all()  # the phase choice: p and B~ = sqrt(2) p real

    # every channel of a mixer starts from these values; in the full basis its A is the LegS matrix
    config = s4_config(d_model=6, s4=dict(d_state=N, dt_min=0.001, dt_max=0.1))
    mixer = mixer_of(config)
    dt, lam_m, p_m, b_m, c_m = mixer.system()
    torch.testing.assert_close(lam_m, lamf.expand(6, N), rtol=1e-7, atol=1e-5)  # float32 parameters
    torch.testing.assert_close(p_m, torch.cat([p, p.conj()]).expand(6, N), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b_m, torch.cat([b, b.conj()]).expand(6, N), rtol=1e-6, atol=1e-6)
    dense = torch.diag_embed(lam_m) - p_m[:, :, None] * p_m.conj()[:, None, :]
    assert (Vf @ dense.detach() @ Vf.conj().T - A).abs().max() < 1e-4
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.max() / dt.min() > 3  # spread over the range, log-uniform
    c = torch.view_as_complex(mixer.C.detach())
    assert c.shape == (6, N // 2) and 0.3 < c.abs().pow(2).mean() < 3  # complex normal, E|c|^2 = 1


def test_parameter_counts():
    d, N, n_layer = 8, 6, 3
    config = s4_config(n_layer=n_layer, s4=dict(d_state=N))
    per_mixer = d * (N // 2) * 2 + 3 * d * (N // 2) * 2 + 2 * d  # Lambda (re, im), P, B, C (complex), log_dt, D
    per_mixer += d * 2 * d  # the GLU output's linear map to 2d
    model = build(config)
    assert sum(p.numel() for p in model.layers[0].mixer.parameters()) == per_mixer == d * (4 * N + 2 + 2 * d)
    padded = 64  # vocab 61 padded to a multiple of 8
    assert model.num_parameters() == padded * d + n_layer * (per_mixer + d) + d  # embedding (tied), blocks, norm
    biased = build(s4_config(n_layer=n_layer, s4=dict(d_state=N), bias=True))
    assert biased.num_parameters() == model.num_parameters() + n_layer * 2 * d


def test_flops_count_the_fft_and_the_glu_per_token():
    mixer = build(s4_config(d_model=16)).layers[0].mixer
    d = 16
    glu = 2 * d * 2 * d + d
    assert mixer.forward_flops_per_token(64) == glu + d * (10 * 7 + 6 + 2)  # log2(128) = 7
    assert mixer.forward_flops_per_token(128) - mixer.forward_flops_per_token(64) == 10 * d


def test_ssm_parameters_are_kept_fp32_through_a_bf16_cast():
    model = build(s4_config(n_layer=4))
    mixer = model.layers[0].mixer
    model = cast_model(model, torch.bfloat16)
    for name in SSM_PARAMETERS:
        param = getattr(mixer, name)
        assert param._ssmforge_fp32 and param._no_weight_decay and param.dtype == torch.float32, name
    assert mixer.output.proj.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, VOCAB, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    bound = 1 / math.sqrt(8) / math.sqrt(4)  # the GLU projection into the residual stream, rescaled by 1/sqrt(4)
    assert 0.8 * bound < mixer.output.proj.weight.float().abs().max() <= bound


@pytest.mark.parametrize("key,value", [("d_state", 7), ("d_state", 0), ("discretization", "foh"), ("dt_min", 0.0)])
def test_impossible_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^model\.s4\.{key}="):
        s4_config(s4={key: value}).validate()


def test_tiny_config_loads():
    from pathlib import Path

    from ssmforge.pretrain.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "s4-tiny.yaml")
    assert config.model.family == "s4" and config.model.layer_kinds == ["s4"] * config.model.n_layer
