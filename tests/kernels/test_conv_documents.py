"""Document resets (seq_idx) in the causal depthwise conv (the C kernel, the Triton kernel, the dispatcher) and
in the FFT long convolution, against the oracles of kernels.ref: outputs and the gradients of every input."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels import causal_conv1d, causal_conv1d_ref
from ssmforge.kernels.cpu.build import cpu_kernels_available
from ssmforge.kernels.fftconv import fft_causal_conv, slot_sizes
from ssmforge.kernels.ref import long_conv_ref
from ssmforge.kernels.selective_scan import triton_available

from .oracle import assert_matches, conv_grads, values_and_grads


def seq_from_starts(L: int, *rows: list[int]) -> torch.Tensor:
    """seq_idx (len(rows), L): row i has a document starting at each position of rows[i] (besides 0)."""
    seq = torch.zeros(len(rows), L, dtype=torch.int32)
    for i, starts in enumerate(rows):
        for s in starts:
            seq[i, s:] += 1
    return seq


# resets at positions 0..4 (0: no reset), consecutive ones (documents of one step), documents shorter than the
# widest conv, and a last document of one step; the second row differs from the first
CONV_SEQ = seq_from_starts(23, [1, 2, 3, 5, 9, 10, 13, 22], [4, 6, 7, 8, 16])

CONV_BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not cpu_kernels_available(), reason="no C compiler")),
                 pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]


def conv_inputs(width: int, with_bias: bool, L: int = 23, d: int = 11, batch: int = 2):
    g = torch.Generator().manual_seed(width + 10 * with_bias)
    x = torch.randn(batch, d, L, generator=g).requires_grad_()  # d, L not multiples of the Triton blocks
    weight = torch.randn(d, width, generator=g).requires_grad_()
    bias = torch.randn(d, generator=g).requires_grad_() if with_bias else None
    return x, weight, bias


def conv_with(backend, seq_idx):
    return lambda *a, **k: causal_conv1d(*a, backend=backend, seq_idx=seq_idx, **k)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_with_resets_matches_the_oracle(backend, width, activation, with_bias):
    x, weight, bias = conv_inputs(width, with_bias)
    want = conv_grads(lambda *a, **k: causal_conv1d_ref(*a, seq_idx=CONV_SEQ, **k), x, weight, bias, activation)
    got = conv_grads(conv_with(backend, CONV_SEQ), x, weight, bias, activation)
    assert_matches(got, want, 1e-5, same_dtype=True)
    # the resets matter (a kernel that ignored them would fail above): the plain conv differs everywhere
    plain = conv_grads(causal_conv1d_ref, x, weight, bias, activation)
    for name in want.keys() - ({"dbias"} if activation is None else set()):  # dbias = sum(dout) then
        assert not torch.allclose(plain[name], want[name], atol=1e-3), name


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("first_reset", [0, 1, 2, 3, 4])
def test_conv_reset_at_each_position_near_the_start(backend, first_reset):
    """A reset at position p (0: none) of a width-4 conv: before p and from p on, each output only sees its side."""
    x, weight, bias = conv_inputs(4, True, L=12, d=5, batch=1)
    seq = seq_from_starts(12, [first_reset] if first_reset else [])
    want = conv_grads(lambda *a, **k: causal_conv1d_ref(*a, seq_idx=seq, **k), x, weight, bias, "silu")
    assert_matches(conv_grads(conv_with(backend, seq), x, weight, bias, "silu"), want, 1e-5, same_dtype=True)


@pytest.mark.parametrize("backend", CONV_BACKENDS + ["ref"])
def test_a_packed_conv_row_equals_its_documents_run_alone(backend):
    x, weight, bias = conv_inputs(4, True, L=30, d=6, batch=1)
    x = x.detach()
    starts = [0, 3, 4, 11, 30]
    seq = seq_from_starts(30, starts[1:-1])
    packed = causal_conv1d(x, weight, bias, activation="silu", backend=backend, seq_idx=seq)
    alone = torch.cat([causal_conv1d(x[..., a:b], weight, bias, activation="silu", backend=backend)
                       for a, b in zip(starts, starts[1:])], dim=-1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_dispatch_passes_seq_idx_to_the_backend(monkeypatch):
    seen = []
    monkeypatch.setitem(kernels.CONV1D_BACKENDS, "cpu", lambda *a, **k: seen.append(k.get("seq_idx")) or a[0])
    x, weight, seq = torch.randn(1, 4, 9), torch.randn(4, 3), seq_from_starts(9, [4])
    causal_conv1d(x, weight, backend="cpu", seq_idx=seq)
    causal_conv1d(x, weight, backend="cpu")
    assert seen[0] is seq and seen[1] is None


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_rejects_a_malformed_seq_idx(backend):
    x, weight, bias = conv_inputs(3, False, L=8, d=4, batch=2)
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(x, weight, backend=backend, seq_idx=torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(x, weight, backend=backend, seq_idx=torch.zeros(2, 8))


# ---- the FFT long convolution -------------------------------------------------------------------------------

def fft_grads(fn, u, k) -> dict:
    return values_and_grads({"y": fn(u, k)}, dict(u=u, k=k))


def fft_inputs(batch, channels, L, Lk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, L, generator=g).requires_grad_()
    k = (torch.randn(channels, Lk or L, generator=g) / (Lk or L) ** 0.5).requires_grad_()
    return u, k


FFT_SEQS = {
    # several documents per row, different splits per row: one-step documents, consecutive resets, a reset at 1
    # and at L - 1, documents long enough for larger slots (16, 24, 32, 48, 64 at L 100: see slot_sizes)
    "mixed": (100, seq_from_starts(100, [1, 2, 3, 20, 37, 99], [50], [30, 31, 77], [])),
    "one document": (40, seq_from_starts(40, [], [])),
    "long and short": (96, seq_from_starts(96, [70], [1], [95])),
    "every step": (9, torch.arange(9, dtype=torch.int32).repeat(2, 1)),
}


@pytest.mark.parametrize("name", sorted(FFT_SEQS))
@pytest.mark.parametrize("short_kernel", [False, True])
def test_fft_conv_with_resets_matches_the_oracle(name, short_kernel):
    L, seq = FFT_SEQS[name]
    u, k = fft_inputs(seq.shape[0], 5, L, Lk=L // 3 + 1 if short_kernel else None, seed=L)
    want = fft_grads(lambda u, k: long_conv_ref(u, k, seq_idx=seq), u, k)
    got = fft_grads(lambda u, k: fft_causal_conv(u, k, seq_idx=seq), u, k)
    assert_matches(got, want, 1e-5)
    if name != "one document":  # and the resets matter
        plain = fft_grads(fft_causal_conv, u, k)
        assert not torch.allclose(plain["y"], want["y"], atol=1e-3)
        assert not torch.allclose(plain["du"], want["du"], atol=1e-3)
        assert not torch.allclose(plain["dk"], want["dk"], atol=1e-3)


def test_fft_conv_of_a_packed_row_equals_its_documents_run_alone():
    L, starts = 200, [0, 1, 7, 60, 61, 130, 200]
    u, k = fft_inputs(1, 3, L, seed=3)
    u, k = u.detach(), k.detach()
    packed = fft_causal_conv(u, k, seq_idx=seq_from_starts(L, starts[1:-1]))
    alone = torch.cat([fft_causal_conv(u[..., a:b], k[:, : b - a]) for a, b in zip(starts, starts[1:])], dim=-1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_fft_conv_half_inputs_and_gradients_keep_their_dtypes():
    L, seq = FFT_SEQS["mixed"]
    u = torch.randn(seq.shape[0], 3, L).bfloat16().requires_grad_()
    k = torch.randn(3, L).requires_grad_()
    y = fft_causal_conv(u, k, seq_idx=seq.long())  # any integer dtype
    assert y.dtype == torch.float32 and y.shape == u.shape
    y.sum().backward()
    assert u.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.float32
    torch.testing.assert_close(y, long_conv_ref(u.detach(), k.detach(), seq_idx=seq), rtol=1e-4, atol=1e-4)


def test_fft_conv_without_resets_is_the_plain_fft():
    u, k = fft_inputs(2, 3, 50, seed=5)
    seq = torch.full((2, 50), 7, dtype=torch.int32)
    torch.testing.assert_close(fft_causal_conv(u, k, seq_idx=seq), fft_causal_conv(u, k), rtol=0, atol=0)


def test_slot_sizes_cover_every_document_length():
    assert slot_sizes(2048)[:6] == [16, 24, 32, 48, 64, 96] and slot_sizes(2048)[-2:] == [1536, 2048]
    assert slot_sizes(10) == [10] and slot_sizes(16) == [16] and slot_sizes(17) == [16, 17]
    for L in (1, 5, 16, 100, 2048, 3000):
        sizes = slot_sizes(L)
        assert sizes == sorted(sizes) and sizes[-1] == L
        assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:]))  # padding below 50% past the smallest slot


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_operators_with_seq_idx_pass_opcheck(backend):
    """seq_idx rides as an option of ssmforge::causal_conv1d_<backend> (no gradient): schema, autograd
    registration and fake implementation hold with it, and the backward operator honours it."""
    import ssmforge.kernels.triton.conv1d  # noqa: F401  (defines the Triton operators)

    op = getattr(torch.ops.ssmforge, f"causal_conv1d_{backend}").default
    backward = getattr(torch.ops.ssmforge, f"causal_conv1d_{backend}_backward").default
    x, weight, bias = conv_inputs(4, True, L=23, d=5, batch=2)
    seq = CONV_SEQ.clone()
    torch.library.opcheck(op, (x, weight, bias, True, seq), test_utils=("test_schema", "test_autograd_registration",
                                                                      "test_faketensor"))
    grads = [torch.randn(x.shape)]
    torch.library.opcheck(backward, (grads, [x.detach(), weight.detach(), bias.detach()], [], True, seq),
                          test_utils=("test_schema", "test_faketensor"))
