"""`model.kernel_backend`: a whole model runs against the reference kernels (or the Triton ones) with the
logits and gradients of the default dispatch, and every kernel call really goes to the named backend."""
import pytest
import torch

from ssmforge import kernels
from ssmforge.errors import ConfigError
from ssmforge.kernels.selective_scan import triton_available
from ssmforge.models import LanguageModel

from .contracts import model_config

TABLES = {"scan": kernels.SCAN_BACKENDS, "ssd": kernels.SSD_BACKENDS, "conv1d": kernels.CONV1D_BACKENDS}


def config(**kw):
    # every mixer; Mamba and Mamba-2 call the tables' kernels (scan, SSD, conv1d), GSS its FFT conv
    base = dict(family="hybrid", layer_pattern="M2G*-M", n_layer=6, d_model=32, vocab_size=101,
                mamba=dict(d_state=8), mamba2=dict(d_state=16, headdim=16, chunk_size=16),
                gss=dict(d_state=8, ssm_dim=16), attention=dict(heads=4))
    return model_config(base, kw).validate()


def counted(monkeypatch) -> dict[tuple[str, str], int]:
    """Wrap every entry of the three backend tables to count its calls: (table, backend) -> calls."""
    calls = {}
    for table_name, table in TABLES.items():
        for backend, fn in list(table.items()):
            def wrapper(*args, _fn=fn, _key=(table_name, backend), **kwargs):
                calls[_key] = calls.get(_key, 0) + 1
                return _fn(*args, **kwargs)

            monkeypatch.setitem(table, backend, wrapper)
    return calls


def logits_and_grads(kernel_backend: str):
    torch.manual_seed(0)
    model = LanguageModel(config(kernel_backend=kernel_backend))
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(1))  # 2 SSD chunks of 16
    logits = model(ids)
    (logits.square().mean() + logits[:, -1].sum()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", [
    "ref",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed")),
])
def test_a_model_runs_against_the_named_backend_with_the_default_results(backend, monkeypatch):
    want_logits, want_grads = logits_and_grads("auto")
    calls = counted(monkeypatch)
    got_logits, got_grads = logits_and_grads(backend)
    # two Mamba layers (a conv and a scan each), one Mamba-2 layer (a conv and an SSD), all to `backend`
    assert calls == {("conv1d", backend): 3, ("scan", backend): 2, ("ssd", backend): 1}
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_auto_dispatches_by_device(monkeypatch):
    calls = counted(monkeypatch)
    logits_and_grads("auto")
    device = torch.device("cpu")
    assert calls == {("conv1d", kernels.conv1d_default_backend(device)): 3,
                     ("scan", kernels.scan_default_backend(device)): 2, ("ssd", kernels.ssd_default_backend(device)): 1}


@pytest.mark.parametrize("overrides, message", [
    (dict(kernel_backend="cuda"), r"^model\.kernel_backend='cuda' is invalid: one of auto, ref, triton$"),
    (dict(kernel_backend="triton", mamba=dict(d_conv=6)),
     r"^model\.mamba\.d_conv=6 is invalid: must be between 2 and 4 with model\.kernel_backend=triton"),
    (dict(kernel_backend="triton", mamba2=dict(d_conv=5)), r"^model\.mamba2\.d_conv=5 is invalid"),
    (dict(kernel_block_mib=0), r"^model\.kernel_block_mib=0 is invalid: must be a number > 0 \(MiB of kernel work"),
    (dict(kernel_block_mib=float("inf")), r"^model\.kernel_block_mib=inf is invalid: must be a number > 0"),
])
def test_impossible_backends_are_config_errors(overrides, message):
    if overrides.get("kernel_backend") == "triton" and not triton_available():
        message = r"^model\.kernel_backend='triton' is invalid: triton is not installed$"
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_wider_convs_stay_valid_off_triton():
    config(kernel_backend="ref", mamba=dict(d_conv=6), mamba2=dict(d_conv=5))


def test_triton_on_a_cpu_without_the_interpreter_is_one_line(monkeypatch):
    cfg = config(kernel_backend="ref")
    cfg.kernel_backend = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"^model\.kernel_backend=triton cannot run on cpu: it needs a CUDA GPU"):
        cfg.check_device("cpu")
    cfg.check_device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg.check_device("cpu")  # the interpreter runs the kernels on CPU tensors (how the tests run them)
    config(kernel_backend="auto").check_device("cpu")
