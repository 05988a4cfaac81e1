"""Document resets (seq_idx) in every fast selective-scan path: output, last state and every gradient equal the
oracle's (`selective_scan_ref(..., seq_idx=...)`), a packed row equals its documents run one by one, and
seq_idx=None changes nothing. Chunks of 4 steps, so that resets fall on chunk boundaries, inside chunks, on
consecutive steps (documents of one token) and on the last step. Small shapes: the Triton interpreter is slow."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge.kernels import selective_scan, selective_scan_ref
from ssmforge.kernels.cpu import selective_scan_chunked, selective_scan_cpu
from ssmforge.kernels.selective_scan import triton_available

from .oracle import assert_matches
from .test_selective_scan import make_inputs, run_with_grads

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
CHUNK = 4
TOL = 1e-5  # fp32, relative to the oracle's largest magnitude
L = 16
# documents of each row, as lengths: row 0 starts documents at 4, 8 and 12 (chunk boundaries), 5 and 6 (one-token
# documents: 4 and 5 are too) and 15 (the last step, inside a chunk); row 1, whose first index is not 0, at 7
DOCUMENTS = [[4, 1, 1, 2, 4, 3, 1], [7, 9]]
FIRST_INDEX = [0, 2]


def _seq_idx(documents=DOCUMENTS, first=FIRST_INDEX) -> torch.Tensor:
    rows = [torch.repeat_interleave(torch.arange(len(lengths)) + start, torch.tensor(lengths))
            for lengths, start in zip(documents, first)]
    return torch.stack(rows).to(torch.int64)  # any integer dtype: the kernels take int32 themselves


def _triton(**kwargs):
    from ssmforge.kernels.triton import selective_scan_triton

    return selective_scan_triton(chunk=CHUNK, **kwargs)


PATHS = [
    pytest.param(lambda **kw: selective_scan_cpu(chunk=CHUNK, **kw), id="cpu"),
    pytest.param(lambda **kw: selective_scan_chunked(chunk=CHUNK, **kw), id="chunked"),
    pytest.param(_triton, id="triton", marks=needs_triton),
]


def _inputs(bc="var", options=True, length=L, **shape):
    return make_inputs(batch=2, d=8, L=length, n=5, bc=bc, groups=2, with_z=options, with_D=options,
                       with_bias=options, **shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bc", ["fixed", "var", "grouped"])
@pytest.mark.parametrize("options", [True, False], ids=["D-z-bias-softplus", "bare"])
def test_matches_oracle_with_resets(path, bc, options):
    """Output, last state and the gradients of u, delta, A, B, C (and D, z, delta_bias when given)."""
    inputs, seq_idx = _inputs(bc, options), _seq_idx()
    want = run_with_grads(selective_scan_ref, inputs, options, True, seq_idx=seq_idx)
    got = run_with_grads(path, inputs, options, True, seq_idx=seq_idx)
    assert_matches(got, want, TOL)
    # the resets matter at these inputs: without them the output, the last state and the gradients differ
    plain = run_with_grads(selective_scan_ref, inputs, options, True)
    for name in ("out", "last_state", "du", "ddelta", "dA"):
        with pytest.raises(AssertionError):
            assert_matches({name: got[name]}, {name: plain[name]}, 100 * TOL)


@pytest.mark.parametrize("path", PATHS)
def test_packed_row_equals_documents_run_alone(path):
    """Each document of a packed row, run alone from a zero state: the same outputs and input gradients, and the
    packed last state is the last document's. The documents run alone through the oracle without seq_idx (the
    fast paths without it are tested against it elsewhere), so this holds whatever the oracle does with seq_idx."""
    inputs, seq_idx = _inputs("grouped"), _seq_idx()
    packed = run_with_grads(path, inputs, True, True, seq_idx=seq_idx)
    weights = torch.cos(torch.arange(packed["out"].numel(), dtype=torch.float32)).view_as(packed["out"])
    last_weights = torch.sin(torch.arange(packed["last_state"].numel(), dtype=torch.float32)).view_as(
        packed["last_state"])
    for b, lengths in enumerate(DOCUMENTS):
        start = 0
        for length in lengths:
            window = slice(start, start + length)
            alone = {k: v if k in ("A", "D", "delta_bias") else v[b:b + 1, ..., window]
                     for k, v in inputs.items() if v is not None}
            alone = {k: v.detach().clone().requires_grad_() for k, v in alone.items()}
            out, last = selective_scan_ref(**alone, delta_softplus=True, return_last_state=True)
            assert_matches({"out": packed["out"][b:b + 1, :, window]}, {"out": out}, TOL)
            # the packed loss weighs out[b, c, t] by cos of its flat index (values_and_grads), and the last state
            # by sin: the same weights here, the last state's only in the row's last document
            loss = (out * weights[b:b + 1, :, window]).sum()
            if start + length == L:
                loss = loss + (last * last_weights[b:b + 1]).sum()
            du, ddelta = torch.autograd.grad(loss, [alone["u"], alone["delta"]])
            assert_matches({"du": packed["du"][b:b + 1, :, window], "ddelta": packed["ddelta"][b:b + 1, :, window]},
                           {"du": du, "ddelta": ddelta}, TOL)
            start += length
        assert_matches({"last": packed["last_state"][b:b + 1]}, {"last": last}, TOL)


@pytest.mark.parametrize("path", PATHS)
def test_no_seq_idx_is_unchanged(path):
    """seq_idx=None is the call without it, bit for bit, and one document per row (a constant index, however
    large, is no reset) matches it."""
    inputs = _inputs("var", length=2 * CHUNK)
    without = run_with_grads(path, inputs, True, True)
    with_none = run_with_grads(path, inputs, True, True, seq_idx=None)
    for name in without:
        assert torch.equal(without[name], with_none[name]), name
    one_document = torch.full((2, 2 * CHUNK), 2**31 - 1)
    assert_matches(run_with_grads(path, inputs, True, True, seq_idx=one_document), without, TOL)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_dispatch_passes_seq_idx(backend):
    inputs = {k: v.detach() if v is not None else None for k, v in _inputs("var").items()}
    seq_idx = _seq_idx()
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend,
                               seq_idx=seq_idx)
    want_out, want_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True,
                                             seq_idx=seq_idx)
    assert_matches({"out": out, "last": last}, {"out": want_out, "last": want_last}, TOL)


def test_cpu_kernel_every_chunk_length():
    """The C kernel at chunks 1 (every step a chunk), 3 and 64 (one chunk), the same resets."""
    inputs, seq_idx = _inputs("var"), _seq_idx()
    want = run_with_grads(selective_scan_ref, inputs, True, True, seq_idx=seq_idx)
    for chunk in (1, 3, 64):
        assert_matches(run_with_grads(selective_scan_cpu, inputs, True, True, seq_idx=seq_idx, chunk=chunk), want,
                       TOL)


def _op_args(op_name):
    inputs = _inputs("grouped")
    return getattr(torch.ops.ssmforge, op_name).default, (*inputs.values(), _seq_idx().to(torch.int32), True, CHUNK)


@pytest.mark.parametrize("op_name", [
    "selective_scan_cpu_channels_last",
    pytest.param("selective_scan_triton", marks=needs_triton),
])
def test_op_with_seq_idx_passes_opcheck(op_name):
    """The custom op with seq_idx given: schema, fake implementation, autograd registration (seq_idx gets no
    gradient)."""
    if "triton" in op_name:
        import ssmforge.kernels.triton.selective_scan  # noqa: F401  (defines the operator)
    op, args = _op_args(op_name)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
