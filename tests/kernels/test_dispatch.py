"""`ssmforge.kernels.selective_scan` picks the right backend, a CUDA tensor without triton is one clear error
rather than the oracle, the start-up line names each kernel's backend, and `import ssmforge.kernels` stays
light."""
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ssmforge import kernels
from ssmforge.errors import SsmforgeError
from ssmforge.kernels import selective_scan, selective_scan_ref
from ssmforge.kernels.backends import BackendUnavailableError, describe_backends


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 10, generator=g), torch.randn(2, 4, 10, generator=g), -torch.rand(4, 3, generator=g),
            torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g))


def test_default_backend_by_device(monkeypatch):
    assert kernels.scan_default_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setitem(kernels.SCAN_BACKENDS, "triton", kernels.SCAN_BACKENDS["ref"])  # as if triton were installed
    assert kernels.scan_default_backend(torch.device("cuda")) == "triton"


def without_triton(monkeypatch):
    """The kernels' registries as they are where triton is not installed."""
    for registry in (kernels.SCAN_BACKENDS, kernels.SSD_BACKENDS, kernels.CONV1D_BACKENDS, kernels.VANDERMONDE_BACKENDS,
                     kernels.VANDERMONDE_SUMMARY_BACKENDS, kernels.CAUCHY_BACKENDS, kernels.LINEAR_SCAN_BACKENDS):
        monkeypatch.delitem(registry, "triton", raising=False)


def test_cuda_without_triton_is_one_clear_error_not_the_oracle(monkeypatch):
    without_triton(monkeypatch)
    calls = []
    monkeypatch.setitem(kernels.SCAN_BACKENDS, "ref", lambda *a, **k: calls.append(1))
    with pytest.raises(BackendUnavailableError) as caught:
        kernels.scan_default_backend(torch.device("cuda"))
    message = str(caught.value)
    assert isinstance(caught.value, SsmforgeError)  # the CLI prints it as one line, exit code 2
    assert "\n" not in message and "triton" in message and "pip install triton" in message
    # through the public function, on fake CUDA tensors (shapes and a device, no data: no GPU needed)
    with FakeTensorMode():
        u, delta, A, B, C = (torch.empty(t.shape, device="cuda") for t in _inputs())
        with pytest.raises(BackendUnavailableError, match="selective scan on cuda tensors needs triton"):
            selective_scan(u, delta, A, B, C)
        assert calls == []  # the oracle never ran
        selective_scan(u, delta, A, B, C, backend="ref")  # asked for by name: it runs
    assert calls == [1]


def test_cuda_without_triton_keeps_the_usable_pytorch_fallbacks(monkeypatch):
    without_triton(monkeypatch)
    assert kernels.ssd_default_backend(torch.device("cuda")) == "torch"  # chunked matmuls, not the oracle
    assert kernels.conv1d_default_backend(torch.device("cuda")) == "ref"  # torch's (cuDNN) conv1d
    line = describe_backends(torch.device("cuda"))
    assert line.startswith("selective scan: none (triton is not installed")
    assert "ssd: torch (triton is not installed" in line and "causal conv1d: ref (triton is not installed" in line
    assert kernels.vandermonde_default_backend(torch.device("cuda")) == "ref"
    assert kernels.cauchy_default_backend(torch.device("cuda")) == "ref"
    for kernel in ("vandermonde", "cauchy"):
        assert f"{kernel}: ref (triton is not installed: PyTorch's, in blocks of channels)" in line
    assert kernels.linear_scan_default_backend(torch.device("cuda")) == "ref"
    assert "linear scan: ref (triton is not installed: PyTorch's doubling scan)" in line


def test_describe_backends():
    assert describe_backends(torch.device("cpu")) == \
        "selective scan: cpu, ssd: torch, causal conv1d: cpu, vandermonde: ref, cauchy: ref, linear scan: cpu, " \
        "fft conv: torch"
    assert describe_backends("cpu", backend="ref") == \
        "selective scan: ref, ssd: ref, causal conv1d: ref, vandermonde: ref, cauchy: ref, linear scan: ref, " \
        "fft conv: torch"
    if kernels.backends.triton_available():
        assert describe_backends("cuda") == "selective scan: triton, ssd: triton, causal conv1d: triton, " \
            "vandermonde: triton, cauchy: triton, linear scan: triton, fft conv: torch"
        assert "causal conv1d: ref (torch's conv1d: the Triton kernel takes widths 2..4, not 6)" in \
            describe_backends("cuda", conv_width=6)


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
