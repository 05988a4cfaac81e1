"""S4D, DSS (EXP and softmax) and H3: each mixer's fast path (Vandermonde kernels, FFT convolutions, models.diagonal)
against a sequential oracle written from its paper's equations, forward and every parameter's gradient in float64;
decoding and chunked feeding against the parallel forward; documents; parameter and FLOP counts against formulas;
the papers' initialisations; fp32 parameters."""
import math

import pytest
import torch

from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel
from ssmforge.models.s4 import hippo_legs

from .contracts import ONE_BYTE_MIB, assert_causal, assert_steps_match_forward, model_config

VOCAB = 37
SECTIONS = dict(s4d=dict(d_state=8, dt_min=0.05, dt_max=0.5), dss=dict(d_state=6, dt_min=0.05, dt_max=0.5),
                h3=dict(d_state=6, dt_min=0.05, dt_max=0.5))


def config(family, d_model=8, n_layer=1, **overrides):
    base = dict(family=family, d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, residual_in_fp32=False, **SECTIONS)
    return model_config(base, overrides)


def mixer(family, seed=0, **overrides):
    torch.manual_seed(seed)
    model = LanguageModel(config(family, **overrides)).double()
    with torch.no_grad():  # non-default skips and weights, so that a wrongly used one shows
        for name, p in model.named_parameters():
            if name.endswith(".D") or name.endswith("D_k"):
                p.copy_(torch.randn_like(p))
    return model.layers[0].mixer


def diagonal_oracle(u, decay, weight, D):
    """x_t = decay x_{t-1} + u_t per channel and mode, y_t = Re(sum_n weight_n x_t,n) + D u_t, one step at a time.
    u (batch, H, L) real; decay, weight (H, N) complex; D (H,)."""
    x = torch.zeros(u.shape[0], *decay.shape, dtype=decay.dtype)
    ys = []
    for t in range(u.shape[-1]):
        x = decay * x + u[..., t, None]
        ys.append((weight * x).sum(-1).real + D * u[..., t])
    return torch.stack(ys, -1)


def s4d_oracle(m, u):
    """S4D from the paper: A = -exp(log_A_real) + i A_imag, zero-order hold Abar = exp(dt A), Bbar = (Abar - 1) / A B
    with B = 1, y = 2 Re(C x) + D u (the conjugate modes' half)."""
    k = m.kernel
    A = torch.complex(-torch.exp(k.log_A_real), k.A_imag)
    dt = torch.exp(k.log_dt)[:, None]
    Abar = torch.exp(dt * A)
    Bbar = (Abar - 1) / A
    C = torch.view_as_complex(k.C)
    return diagonal_oracle(u, Abar, 2 * C * Bbar, m.D)


def dss_oracle(m, u):
    """DSS from the paper's kernels, built tap by tap and applied as a direct causal sum:
    EXP: K_l = Re(sum_n W_n (exp(dt Lambda_n) - 1) / Lambda_n exp(dt Lambda_n l));
    softmax: K_l = Re(sum_n W_n / Lambda_n softmax_l(dt Lambda_n j, j < softmax_length)) with the regularised
    reciprocal conj(S) / (|S|^2 + eps) of S = sum_j exp(dt Lambda_n j), summed term by term."""
    k = m.kernel
    L = u.shape[-1]
    re = -torch.exp(k.Lambda_re) if k.variant == "exp" else k.Lambda_re
    lam = torch.complex(re, k.Lambda_im)
    dt_lam = torch.exp(k.log_dt)[:, None] * lam
    W = torch.view_as_complex(k.W)
    if k.variant == "exp":
        coeff = W * (torch.exp(dt_lam) - 1) / lam
    else:
        S = sum(torch.exp(dt_lam * j) for j in range(k.softmax_length))
        coeff = W / lam * S.conj() / (S.abs() ** 2 + 1e-7)
    K = torch.stack([(coeff * torch.exp(dt_lam * l)).sum(-1).real for l in range(L)], -1)  # (H, L)
    y = torch.stack([sum(K[:, s] * u[..., t - s] for s in range(t + 1)) for t in range(L)], -1)
    return y + m.D[:, None] * u


def h3_oracle(m, hidden):
    """H3 from the paper: q, k, v projections; shift SSM k'_t = sum_{l < N} C_l k_{t-l} + D_k k_t; per head the
    outer products kv[i, j] = k'[h, i] v[h, j] through the head's S4D-Lin SSM (recurrence) plus D; y[h, j] =
    sum_i q[h, i] s[i, j]; the output projection."""
    q, k, v = (hidden @ m.in_proj.weight.T).chunk(3, -1)
    batch, L, d = hidden.shape
    N, p, heads = m.d_state, m.head_dim, m.heads
    C = m.shift_C
    shifted = torch.stack([sum(C[:, l] * k[:, t - l] for l in range(min(N, t + 1))) for t in range(L)], 1)
    shifted = shifted + m.D_k * k
    kern = m.kernel
    A = torch.complex(-torch.exp(kern.log_A_real), kern.A_imag)
    Abar = torch.exp(torch.exp(kern.log_dt)[:, None] * A)
    weight = 2 * torch.view_as_complex(kern.C) * (Abar - 1) / A  # (heads, N/2)
    out = torch.zeros(batch, L, d, dtype=hidden.dtype)
    for h in range(heads):
        for i in range(p):
            for j in range(p):
                u = (shifted[:, :, h * p + i] * v[:, :, h * p + j])[:, None]  # (batch, 1, L)
                s = diagonal_oracle(u, Abar[h:h + 1], weight[h:h + 1], m.D[h:h + 1])[:, 0]  # (batch, L)
                out[:, :, h * p + j] = out[:, :, h * p + j] + q[:, :, h * p + i] * s
    return out @ m.out_proj.weight.T


def assert_same_with_gradients(m, fast, oracle, inputs, tol=1e-9):
    """fast(inputs) == oracle(inputs) to tol, and the gradient of every parameter of m under a random weighting."""
    yf, yo = fast(inputs), oracle(inputs)
    torch.testing.assert_close(yf, yo, rtol=tol, atol=tol)
    weights = torch.randn(yf.shape, dtype=yf.dtype, generator=torch.Generator().manual_seed(3))
    params = [p for p in m.parameters() if p.requires_grad]
    used = [p for p, g in zip(params, torch.autograd.grad((yo * weights).sum(), params, allow_unused=True)) if g is not None]
    gf = torch.autograd.grad((fast(inputs) * weights).sum(), used)
    go = torch.autograd.grad((oracle(inputs) * weights).sum(), used)
    assert len(used) >= 4
    for a, b in zip(gf, go):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7 * b.abs().max().item())


@pytest.fixture(params=[False, True], ids=["whole", "channel_blocks"])
def kernel_blocks(request):
    """Model keys that build the Vandermonde kernel whole, or one channel at a time (recomputed_by_channels, a
    block of one byte), as wide layers are."""
    return dict(kernel_block_mib=ONE_BYTE_MIB) if request.param else {}


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_equals_its_recurrence(init, kernel_blocks):
    m = mixer("s4d", s4d=dict(init=init), **kernel_blocks)
    u = torch.randn(2, 8, 40, dtype=torch.float64)
    assert_same_with_gradients(m, m.ssm, lambda x: s4d_oracle(m, x), u)


@pytest.mark.parametrize("variant", ["exp", "softmax"])
def test_dss_equals_its_kernel_definition(variant, kernel_blocks):
    m = mixer("dss", dss=dict(variant=variant, softmax_length=48), **kernel_blocks)
    if variant == "softmax":  # a mode with a growing real part, which only the softmax variant allows
        with torch.no_grad():
            m.kernel.Lambda_re[:, 0] = 0.3
    u = torch.randn(2, 8, 24, dtype=torch.float64)
    assert_same_with_gradients(m, m.ssm, lambda x: dss_oracle(m, x), u)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_equals_its_equations(head_dim, kernel_blocks):
    m = mixer("h3", h3=dict(head_dim=head_dim), **kernel_blocks)
    hidden = torch.randn(2, 20, 8, dtype=torch.float64)
    assert_same_with_gradients(m, m, lambda x: h3_oracle(m, x), hidden)


CASES = [("s4d", {}), ("dss", {}), ("dss", dict(dss=dict(variant="softmax", softmax_length=64))), ("h3", {}),
         ("h3", dict(h3=dict(head_dim=2)))]


@pytest.mark.parametrize("family,overrides", CASES)
def test_decoding_and_chunks_equal_the_parallel_forward(family, overrides):
    torch.manual_seed(1)
    model = LanguageModel(config(family, d_model=16, n_layer=2, **overrides)).double().eval()
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    assert_steps_match_forward(model, ids, prefill=11, tol=1e-9)
    assert_causal(model, 20, 9, vocab=VOCAB)
    with torch.no_grad():
        whole, state = model(ids), model.allocate_state(2)
        pieces = [model(ids[:, a:b], state=state) for a, b in [(0, 3), (3, 4), (4, 21), (21, 30)]]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family,overrides", CASES)
def test_chunks_in_one_channel_blocks_keep_the_whole_rows_values_and_gradients(family, overrides):
    """The kernel, the state summary and the entering state's response built one channel at a time
    (recomputed_by_channels, model.kernel_block_mib of one byte): chunks through a state, with documents starting
    inside them, give the whole row's outputs and every parameter's gradient (the same parameters, built whole)."""
    torch.manual_seed(1)
    model = LanguageModel(config(family, d_model=16, n_layer=2, **overrides)).double()
    blocked = LanguageModel(config(family, d_model=16, n_layer=2, kernel_block_mib=ONE_BYTE_MIB, **overrides)).double()
    blocked.load_state_dict(model.state_dict())
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    # documents start inside chunks (a chunk's first position continues the state's document, by the API)
    ids[0, [5, 12, 22]] = ids[1, [2, 25]] = 0
    seq_idx = document_index(ids, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    whole = model(ids, seq_idx=seq_idx)
    weights = torch.randn(whole.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = torch.autograd.grad((whole * weights).sum(), params)
    state = blocked.allocate_state(2)
    cuts = [0, 3, 4, 21, 30]
    chunks = torch.cat([blocked(ids[:, a:b], state=state, seq_idx=seq_idx[:, a:b]) for a, b in zip(cuts, cuts[1:])], 1)
    got = torch.autograd.grad((chunks * weights).sum(), [p for p in blocked.parameters() if p.requires_grad])
    torch.testing.assert_close(chunks, whole, rtol=1e-9, atol=1e-9)
    # measured 5e-8 relative with the kernel built whole as well: the chunks take the carried-state path
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)) < 1e-6


@pytest.mark.parametrize("family,overrides", CASES)
def test_documents_run_alone_inside_a_packed_row(family, overrides):
    torch.manual_seed(1)
    model = LanguageModel(config(family, d_model=16, n_layer=2, **overrides)).double().eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (1, 26), generator=g)
    for start in (4, 5, 17):  # a one-token document, and one longer than the shift filter
        ids[0, start] = 0
    with torch.no_grad():
        packed = model(ids, seq_idx=document_index(ids, 0))
        for a, b in [(0, 4), (4, 5), (5, 17), (17, 26)]:
            torch.testing.assert_close(packed[:, a:b], model(ids[:, a:b]), rtol=1e-9, atol=1e-9)
        assert (model(ids)[:, 17:] - packed[:, 17:]).abs().max() > 1e-4  # without seq_idx they mix


def test_parameter_counts_and_flops_follow_the_formulas():
    H, L = 16, 512
    glu = 2 * H * H  # the S4 block's output: d -> 2d (no bias)
    s4d = LanguageModel(config("s4d", d_model=H, s4d=dict(d_state=8))).layers[0].mixer
    assert sum(p.numel() for p in s4d.parameters()) == H * 8 + H * 8 + H + H + glu  # A (re, im), C (re, im), dt, D
    dss = LanguageModel(config("dss", d_model=H, dss=dict(d_state=6))).layers[0].mixer
    assert sum(p.numel() for p in dss.parameters()) == 2 * H * 6 + 2 * H * 6 + H + H + glu  # Lambda, W, dt, D
    h3 = LanguageModel(config("h3", d_model=H, h3=dict(d_state=6, head_dim=2))).layers[0].mixer
    heads = H // 2
    assert sum(p.numel() for p in h3.parameters()) == 4 * H * H + H * 6 + H + heads * 6 + heads * 6 + heads + heads
    fft = 10 * math.log2(2 * L) + 6
    assert s4d.forward_flops_per_token(L) == round(H * (fft + 2)) + 2 * H * 2 * H + H
    assert dss.forward_flops_per_token(L) == round(H * (fft + 2)) + 2 * H * 2 * H + H
    # projections 8 d^2; shift conv + skip per channel; per product channel (d * head_dim of them): the
    # product, the conv and its skip; the read-out's multiply-add
    assert h3.forward_flops_per_token(L) == 8 * H * H + round(H * (fft + 2) + H * 2 * (1 + fft + 2) + 2 * H * 2)


def test_initialisations_are_the_papers():
    s4d = mixer("s4d", s4d=dict(d_state=8, dt_min=0.001, dt_max=0.1)).kernel
    n = torch.arange(4, dtype=torch.float64)
    torch.testing.assert_close(-torch.exp(s4d.log_A_real), torch.full((8, 4), -0.5, dtype=torch.float64))
    torch.testing.assert_close(s4d.A_imag, (math.pi * n).repeat(8, 1))
    inv = mixer("s4d", s4d=dict(d_state=8, init="inv")).kernel
    torch.testing.assert_close(inv.A_imag, (8 / math.pi * (8 / (2 * n + 1) - 1)).repeat(8, 1))
    dt = torch.exp(s4d.log_dt)
    assert dt.min() >= 0.001 and dt.max() <= 0.1
    dss = mixer("dss").kernel
    torch.testing.assert_close(-torch.exp(dss.Lambda_re), torch.full((8, 6), -0.5, dtype=torch.float64))
    # the skew-HiPPO eigenvalues: w with S = A_legs + P P^T = -I/2 + skew of size 2N, i w its eigenvalues, w > 0
    A, _, P = hippo_legs(12)
    skew = (A + P[:, None] * P[None, :]) - torch.diag(torch.diagonal(A + P[:, None] * P[None, :]))
    w = torch.linalg.eigvals(skew).imag.sort().values[6:]
    torch.testing.assert_close(dss.Lambda_im, w.repeat(8, 1), rtol=1e-6, atol=1e-5)
    assert mixer("dss", dss=dict(variant="softmax")).kernel.Lambda_re.eq(-0.5).all()  # the real part itself


def test_ssm_parameters_stay_fp32():
    for family in ("s4d", "dss", "h3"):
        m = LanguageModel(config(family)).layers[0].mixer
        flagged = {n for n, p in m.named_parameters() if getattr(p, "_ssmforge_fp32", False)}
        projections = {n for n, _ in m.named_parameters() if "proj" in n}
        assert flagged and flagged == {n for n, _ in m.named_parameters()} - projections, family


def test_dss_softmax_stays_finite_for_growing_modes():
    """DSS-softmax leaves Re(Lambda) free; a mode grown far past the float32 range of exp(dt Lambda L) is capped, so
    the kernel, outputs and gradients stay finite (the uncapped normaliser gave inf / inf)."""
    m = mixer("dss", dss=dict(variant="softmax", softmax_length=2048, dt_min=0.1, dt_max=0.1)).float()
    with torch.no_grad():
        m.kernel.Lambda_re[:, :2] = 5.0
    u = torch.randn(2, 8, 64, requires_grad=True)
    y = m.ssm(u)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(u.grad).all()


def test_sizes_do_not_come_from_partitioned_parameters():
    """Under ZeRO-3 a partitioned parameter is an empty tensor: FLOPs per token (MFU) and decoding states must come
    from the config, for every mixer of the stack."""
    from .contracts import every_mixer_config

    model = LanguageModel(every_mixer_config())
    flops = model.forward_flops_per_token(512)
    shapes = [state_shapes(block.mixer.allocate_state(2, torch.device("cpu"), torch.float32)) for block in model.layers]
    for p in model.parameters():
        p.data = torch.empty(0)
    assert model.forward_flops_per_token(512) == flops
    assert [state_shapes(block.mixer.allocate_state(2, torch.device("cpu"), torch.float32))
            for block in model.layers] == shapes


def state_shapes(state):
    """The tensor shapes held by a decoding state (nested dataclasses), in order."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return tuple(state.shape)
    if hasattr(state, "__dataclass_fields__"):
        return [state_shapes(getattr(state, f)) for f in state.__dataclass_fields__]
    return state

