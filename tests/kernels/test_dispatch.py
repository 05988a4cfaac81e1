"""`ssmforge.kernels.selective_scan` picks the right backend and `import ssmforge.kernels` stays light."""
import subprocess
import sys

import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels import selective_scan, selective_scan_ref


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 10, generator=g), torch.randn(2, 4, 10, generator=g), -torch.rand(4, 3, generator=g),
            torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g))


def test_default_backend_by_device():
    assert kernels.scan_default_backend(torch.device("cpu")) == "cpu"
    expected = "triton" if "triton" in kernels.SCAN_BACKENDS else "ref"
    assert kernels.scan_default_backend(torch.device("cuda")) == expected


def test_cpu_tensors_use_cpu_path(monkeypatch):
    calls = []
    fast = kernels.SCAN_BACKENDS["cpu"]
    monkeypatch.setitem(kernels.SCAN_BACKENDS, "cpu", lambda *a, **k: calls.append(1) or fast(*a, **k))
    out = selective_scan(*_inputs(), delta_softplus=True)
    assert calls == [1]
    torch.testing.assert_close(out, selective_scan_ref(*_inputs(), delta_softplus=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_forced_backend_returns_last_state(backend):
    out, last = selective_scan(*_inputs(), return_last_state=True, backend=backend)
    want_out, want_last = selective_scan_ref(*_inputs(), return_last_state=True)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(*_inputs(), backend="cuda-magic")


def test_cpu_backend_rejects_other_devices():
    u, delta, A, B, C = _inputs()
    with pytest.raises(ValueError, match="CPU tensors"):
        kernels.SCAN_BACKENDS["cpu"](u.to("meta"), delta, A, B, C)


def test_import_does_not_import_triton():
    code = "import sys, ssmforge.kernels as kernels; kernels.selective_scan; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
