"""Document resets (seq_idx) in every SSD backend against the oracle `ssd_scan_ref(..., seq_idx=...)`: outputs,
final state and every gradient, with resets at and inside chunk boundaries; a packed row equals its
documents run alone; and the same inputs without seq_idx differ (so the comparisons can fail)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge.kernels import ssd_scan, ssd_scan_ref
from ssmforge.kernels.ssd import SSD_BACKENDS, ssd_chunked

from .oracle import assert_matches
from .test_ssd import _triton, make_inputs, needs_triton, run_with_grads

TOL = 1e-5  # fp32, relative to the oracle's largest magnitude


def documents(*rows: list[int], first: int = 0) -> torch.Tensor:
    """seq_idx (batch, L) of rows packed from documents of the given lengths, numbered from `first`."""
    return torch.stack([torch.repeat_interleave(torch.arange(first, first + len(r)), torch.tensor(r))
                        for r in rows])


def check(path, seq_idx, tol=TOL, dt_softplus=True, **shape):
    """y, final state and the gradients of every input (x, dt, A, B, C, D, dt_bias, initial_state) of `path`
    with seq_idx against the oracle's; returns the oracle's results."""
    batch, L = seq_idx.shape
    inputs = make_inputs(batch=batch, L=L, **shape)
    want = run_with_grads(ssd_scan_ref, inputs, dt_softplus, True, seq_idx=seq_idx)
    got = run_with_grads(path, inputs, dt_softplus, True, seq_idx=seq_idx)
    assert_matches(got, want, tol)
    return inputs, want


def torch_path(chunk):
    return lambda **kw: ssd_chunked(chunk_size=chunk, **kw)


# chunks of 8 steps; L = 37 ends inside the fifth chunk
TORCH_LAYOUTS = {
    "at chunk boundaries": (8, documents([8, 16, 13], [16, 8, 8, 5])),
    "inside chunks": (8, documents([5, 11, 3, 18], [2, 30, 5])),
    "consecutive resets": (8, documents([3, 1, 1, 1, 7, 1, 23], [7, 1, 1, 28])),
    "at the last position": (8, documents([36, 1], [31, 5, 1])),
    "one document per step": (8, documents([1] * 37, [1] * 37)),
    "numbered from 5, the first document one step long": (8, documents([1, 36], [20, 17], first=5)),
    "chunk longer than L": (64, documents([5, 11, 3, 18], [16, 21])),
    "chunk of 1": (1, documents([5, 11, 3, 18], [36, 1])),
    "chunk not a power of two": (6, documents([6, 6, 1, 24], [11, 26])),
}


@pytest.mark.parametrize("chunk, seq_idx", list(TORCH_LAYOUTS.values()), ids=list(TORCH_LAYOUTS))
def test_torch_path_equals_the_oracle_with_resets(chunk, seq_idx):
    check(torch_path(chunk), seq_idx, nheads=4, ngroups=2, headdim=4, dstate=3)


def test_torch_path_several_heads_per_group_without_options():
    """Three heads share each group's B/C; no D, dt_bias, softplus or initial state."""
    check(torch_path(8), documents([9, 7, 21], [24, 13]), nheads=6, ngroups=2, headdim=3, dstate=4,
          with_D=False, with_bias=False, with_initial=False, dt_softplus=False)


def test_torch_path_reads_seq_idx_as_the_oracle_does():
    """Any integers: a reset wherever two neighbours differ, also where the index goes back down."""
    seq_idx = torch.tensor([[0] * 5 + [1] * 6 + [0] * 9 + [7] * 17, [3] * 12 + [2] * 25])
    check(torch_path(8), seq_idx, nheads=2, ngroups=1, headdim=4, dstate=3)


# the interpreter runs Triton programs one by one: chunks of 16 and few heads
TRITON_LAYOUTS = {
    "at chunk boundaries, the last position, L inside a chunk": documents([16, 16, 8, 1], [32, 9]),
    "inside chunks, consecutive, numbered from 3": documents([5, 1, 1, 20, 14], [1, 23, 1, 16], first=3),
}


@needs_triton
@pytest.mark.parametrize("seq_idx", list(TRITON_LAYOUTS.values()), ids=list(TRITON_LAYOUTS))
def test_triton_equals_the_oracle_with_resets(seq_idx):
    check(lambda **kw: _triton(chunk_size=16, **kw), seq_idx, nheads=4, ngroups=2, headdim=4, dstate=5)


@needs_triton
def test_triton_resets_over_slices_of_the_state_deterministic(monkeypatch):
    """Three heads per group (dB/dC summed per head in deterministic mode), d_state 20 in backward slices of
    16 (the last partly masked), headdim not a power of two."""
    from ssmforge import kernels
    from ssmforge.kernels.triton import ssd as triton_ssd

    monkeypatch.setattr(triton_ssd, "BWD_SLICE", 16)
    monkeypatch.setattr(kernels, "_deterministic", True)
    check(lambda **kw: _triton(chunk_size=16, **kw), documents([7, 25, 1]), nheads=3, ngroups=1, headdim=6,
          dstate=20)


PATHS = [pytest.param(torch_path(8), id="torch"),
         pytest.param(lambda **kw: _triton(chunk_size=16, **kw), id="triton", marks=needs_triton)]


@pytest.mark.parametrize("path", PATHS)
def test_packed_row_equals_its_documents_run_alone(path):
    """One row of three documents = three rows of one: outputs, the final state (the last document's) and the
    gradients of x; the initial state belongs to the first document only."""
    lengths = [13, 19, 8]
    inputs = {k: v.detach() for k, v in make_inputs(batch=1, L=sum(lengths), nheads=4, ngroups=2, headdim=4,
                                                    dstate=5).items()}
    x = inputs["x"].clone().requires_grad_()
    y, last = path(**{**inputs, "x": x}, dt_softplus=True, return_final_state=True, seq_idx=documents(lengths))
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (dx,) = torch.autograd.grad((y * weights).sum(), x)
    start = 0
    for i, n in enumerate(lengths):
        steps = slice(start, start + n)
        alone = {k: v[:, steps] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
        alone["initial_state"] = inputs["initial_state"] if i == 0 else None
        alone["x"] = alone["x"].clone().requires_grad_()
        y_alone, last_alone = path(**alone, dt_softplus=True, return_final_state=True)
        (dx_alone,) = torch.autograd.grad((y_alone * weights[:, steps]).sum(), alone["x"])
        torch.testing.assert_close(y[:, steps], y_alone, rtol=TOL, atol=TOL)
        torch.testing.assert_close(dx[:, steps], dx_alone, rtol=TOL, atol=TOL)
        start += n
    torch.testing.assert_close(last, last_alone, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("path", PATHS)
def test_without_seq_idx_the_same_inputs_differ(path):
    """The negative check: the layouts above are not all equal to one document per row, so a backend that
    ignored seq_idx would fail them."""
    seq_idx = documents([16, 16, 8, 1], [5, 1, 1, 20, 14])
    inputs = make_inputs(batch=2, L=41, nheads=2, ngroups=1, headdim=4, dstate=5)
    want = run_with_grads(ssd_scan_ref, inputs, True, True, seq_idx=seq_idx)
    got = run_with_grads(path, inputs, True, True)
    del want["dD"]  # the skip D x does not pass through the state
    for name in want:
        with pytest.raises(AssertionError):
            assert_matches({name: got[name]}, {name: want[name]}, 1e-2)


def test_dispatch_passes_seq_idx_to_every_backend():
    seq_idx = documents([5, 11, 3, 18], [36, 1])
    inputs = {k: v.detach() for k, v in make_inputs(batch=2, L=37, nheads=4, ngroups=2, headdim=4, dstate=3).items()}
    want, want_last = ssd_scan_ref(**inputs, seq_idx=seq_idx, return_final_state=True)
    for backend in [None, *SSD_BACKENDS]:  # "ref", "torch" and, where installed, "triton"
        y, last = ssd_scan(**inputs, chunk_size=16, seq_idx=seq_idx, return_final_state=True, backend=backend)
        assert_matches(dict(y=y, last=last), dict(y=want, last=want_last), TOL)


@pytest.mark.parametrize("path", PATHS)
def test_bad_seq_idx_is_refused(path):
    inputs = {k: v.detach() for k, v in make_inputs(batch=2, L=37, nheads=2, ngroups=1, headdim=4, dstate=3).items()}
    for bad in (torch.zeros(2, 36, dtype=torch.int64), torch.zeros(2, 37)):
        with pytest.raises(ValueError, match="seq_idx"):
            path(**inputs, seq_idx=bad)


@needs_triton
def test_triton_op_traces_on_fake_tensors_with_resets():
    """FakeTensorMode (how the planner traces a step) sees through the op with documents, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = make_inputs(batch=2, L=41, nheads=2, ngroups=1, headdim=4, dstate=5)
    seq_idx = documents([16, 16, 8, 1], [32, 9])
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v).requires_grad_() for k, v in inputs.items()}
        y, last = _triton(**fake, chunk_size=16, dt_softplus=True, return_final_state=True,
                          seq_idx=mode.from_tensor(seq_idx))
        grads = torch.autograd.grad((y.sum() + last.sum()), list(fake.values()))
    assert y.shape == inputs["x"].shape and last.shape == inputs["initial_state"].shape
    assert [g.shape for g in grads] == [v.shape for v in inputs.values()]
