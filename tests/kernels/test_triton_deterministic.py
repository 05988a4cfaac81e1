"""Deterministic mode (`ssmforge.kernels.set_deterministic`): the Triton backwards write dB/dC partials per
program (scan) or per head (SSD) and sum them with torch in a fixed order instead of adding atomically.
Under the interpreter both modes are reproducible (programs run one by one), so what is tested here is
that the partials path computes the same gradients as the atomic one and the oracle, at shapes where
several programs or heads share a group, and that it is taken; on a GPU the bitwise test is the real one.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels import selective_scan_ref, ssd_scan_ref
from ssmforge.kernels.selective_scan import triton_available

from . import test_selective_scan as scan_tests
from . import test_ssd as ssd_tests
from .oracle import assert_matches

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture
def deterministic():
    kernels.set_deterministic(True)
    yield
    kernels.set_deterministic(False)


def _scan(**kw):
    from ssmforge.kernels.triton import selective_scan_triton

    return selective_scan_triton(chunk=8, **kw)


def _ssd(**kw):
    from ssmforge.kernels.triton.ssd import ssd_triton

    return ssd_triton(chunk_size=16, **kw)


# d=12 in 2 groups: 6 channels a group, 3 programs of 2 channels each; B var (batch, n, L): one group of 12
SCAN_CASES = {"grouped": dict(d=12, bc="grouped", groups=2), "var": dict(d=12, bc="var"),
              "fixed": dict(d=12, bc="fixed")}


def _scan_grads(case):
    inputs = scan_tests.make_inputs(**SCAN_CASES[case], L=21)
    return inputs, scan_tests.run_with_grads(_scan, inputs, True, True)


def _ssd_grads():
    inputs = ssd_tests.make_inputs(batch=1, L=21, nheads=4, ngroups=2, headdim=8, dstate=5)  # 2 heads a group
    return inputs, ssd_tests.run_with_grads(_ssd, inputs, True, True)


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_scan_partials_match_atomics_and_oracle(case, deterministic):
    inputs, got = _scan_grads(case)
    assert_matches(got, scan_tests.run_with_grads(selective_scan_ref, inputs, True, True), 1e-4)
    assert _bitwise_equal(got, _scan_grads(case)[1])
    kernels.set_deterministic(False)
    assert_matches(got, _scan_grads(case)[1], 1e-6)


def test_ssd_partials_match_atomics_and_oracle(deterministic):
    inputs, got = _ssd_grads()
    assert_matches(got, ssd_tests.run_with_grads(ssd_scan_ref, inputs, True, True), 1e-4)
    assert _bitwise_equal(got, _ssd_grads()[1])
    kernels.set_deterministic(False)
    assert_matches(got, _ssd_grads()[1], 1e-6)


def test_the_partials_path_is_taken(deterministic, monkeypatch):
    """The flag reaches the launches: the scan's and the SSD's backward allocate per-program / per-head
    buffers (the atomic path would leave these uninitialized rows unsummed, failing the tests above)."""
    made = []
    real_empty = torch.empty

    def spy(*size, **kw):
        made.append(tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size)
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    _scan_grads("grouped")
    assert (2, 6, 21, 5) in made  # (batch, d / BLOCK_D, L, n): 6 programs of 2 channels
    made.clear()
    _ssd_grads()
    assert (1, 21, 4, 5) in made  # (batch, L, nheads, dstate)


def test_torch_deterministic_algorithms_turn_it_on():
    assert not kernels.deterministic()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)
