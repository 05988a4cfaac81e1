"""The order in which the Triton scan composes its steps, on inputs where order matters.

h_t = a_t h_{t-1} + x_t composes affine maps, which do not commute when a varies from step to step; a
scan that composes them in the wrong order (what compiled reverse scans do on GPUs, triton#4362 and
#8412, while the interpreter gets them right) still gives plausible numbers on gentle inputs. So: a per
step spread over (0.01, 0.97), nonzero x, asymmetric shapes, L not a multiple of the chunk, against the
sequential oracle in fp64; a check that this comparison does fail when the combine is swapped; and a
scan of the sources that no kernel uses a reverse scan at all (on a GPU the first test runs compiled).
"""
import ast
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on CPU tensors

import pytest
import torch

import ssmforge.kernels
from ssmforge.kernels import selective_scan_ref
from ssmforge.kernels.selective_scan import triton_available

from .oracle import values_and_grads

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TRITON_DIR = Path(ssmforge.kernels.__file__).parent / "triton"
SCANS = {"associative_scan", "cumsum", "cumprod"}  # every tl scan takes reverse=


def _reverse_scans(source: str) -> list[int]:
    """Lines of calls to a tl scan with a reverse= that is not literally False."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            reverse = [k.value for k in node.keywords if k.arg == "reverse"]
            if name in SCANS and reverse and not (isinstance(reverse[0], ast.Constant) and reverse[0].value is False):
                lines.append(node.lineno)
    return lines


def test_the_source_scan_finds_reverse_scans():
    assert _reverse_scans("a, x = tl.associative_scan((a, x), 1, f, reverse=True)") == [1]
    assert _reverse_scans("y = tl.cumsum(x, axis=0, reverse=flag)") == [1]
    assert _reverse_scans("y = tl.associative_scan((a, x), 1, f, reverse=False)\nz = tl.cumsum(x, 0)") == []


def test_no_kernel_uses_a_reverse_scan():
    files = sorted(TRITON_DIR.glob("*.py"))
    assert any(f.name == "scan_kernels.py" for f in files)
    found = {f.name: lines for f in files if (lines := _reverse_scans(f.read_text()))}
    assert not found, f"reverse scans (miscompiled for non-commutative combines on GPUs) at {found}"


def test_compose_applies_its_first_map_first():
    from ssmforge.kernels.triton.scan_kernels import _compose

    a1, x1, a2, x2, h = (torch.tensor(v, dtype=torch.float64) for v in (0.3, 2.0, 0.9, -1.0, 5.0))
    a, x = _compose.fn(a1, x1, a2, x2)
    assert torch.allclose(a * h + x, a2 * (a1 * h + x1) + x2)
    assert not torch.allclose(a * h + x, a1 * (a2 * h + x2) + x1)  # the other order differs on these values


def ordered_inputs(batch=3, d=12, L=45, n=3, groups=2, seed=0):
    """fp32 leaves of a scan whose step maps are far from commuting: delta * A spread over (-4.5, -0.03)
    so a = exp(delta A) in (0.01, 0.97), a different mix each step, and x = delta u B of order one.
    d=12 over 2 groups: 6 channels a group, 3 programs of 2 channels each add into a group's dB/dC."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        u=torch.randn(batch, d, L, generator=g) + 1.0,
        delta=torch.rand(batch, d, L, generator=g) * 2.95 + 0.05,
        A=-(torch.rand(d, n, generator=g) + 0.5),
        B=torch.randn(batch, groups, n, L, generator=g),
        C=torch.randn(batch, groups, n, L, generator=g),
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def _scan_and_grads(fn, inputs, **kwargs):
    out, last = fn(**inputs, return_last_state=True, **kwargs)
    return values_and_grads({"out": out, "last_state": last}, inputs)


def _worst_error(got: dict, want: dict) -> float:
    """Largest error of any output or gradient, relative to the oracle's largest magnitude of it."""
    return max(((got[k].double() - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


def _errors(L, chunk=16, **shape):
    from ssmforge.kernels.triton import selective_scan_triton

    inputs = ordered_inputs(L=L, **shape)
    oracle = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    want = _scan_and_grads(selective_scan_ref, oracle)
    return _worst_error(_scan_and_grads(selective_scan_triton, inputs, chunk=chunk), want)


@needs_triton
@pytest.mark.parametrize("L, chunk", [(45, 16), (7, 16), (33, 8)])  # 3 chunks, the last partial; one partial
def test_scan_matches_fp64_oracle_where_order_matters(L, chunk):
    assert _errors(L, chunk) < 1e-5  # fp32 against fp64: about 3e-7 here


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="patches the kernel source: interpreter only")
def test_a_swapped_combine_fails_that_comparison(monkeypatch):
    """The comparison above is sensitive to the order: composing second-then-first is caught."""
    from ssmforge.kernels.triton import scan_kernels

    @scan_kernels.triton.jit
    def swapped(a_prev, x_prev, a_next, x_next):
        return a_next * a_prev, a_prev * x_next + x_prev

    monkeypatch.setattr(scan_kernels, "_compose", swapped)
    assert _errors(45) > 1e-2
