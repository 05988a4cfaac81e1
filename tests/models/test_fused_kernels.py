"""model.kernel_backend=triton: the survey families' mixers run the fused Triton kernels (kernels.ssm_kernels:
the Vandermonde kernel and its state summary for S4D, DSS, H3 and GSS, the Cauchy sums for S4's and Liquid-S4's
kernels, state summaries and entering states, the linear scan for LRU; run in the interpreter here), and the LRU
on CPU its C scan, and give what the PyTorch path gives, with packed documents and with chunks through a state,
in float64, values and every parameter's gradient."""
import pytest
import torch

from ssmforge import kernels
from ssmforge.kernels.backends import triton_available
from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel

from .contracts import model_config

VOCAB = 37
SMALL = dict(dt_min=0.05, dt_max=0.5)
CASES = [  # (family, model settings, the kernel it builds)
    ("s4d", dict(s4d=dict(d_state=8, **SMALL)), "vandermonde"),
    ("dss", dict(dss=dict(d_state=6, **SMALL)), "vandermonde"),
    ("dss", dict(dss=dict(d_state=6, variant="softmax", softmax_length=64, **SMALL)), "vandermonde"),
    ("h3", dict(h3=dict(d_state=6, **SMALL)), "vandermonde"),
    ("h3", dict(h3=dict(d_state=6, head_dim=2, **SMALL)), "vandermonde"),
    ("gss", dict(gss=dict(d_state=8)), "vandermonde"),
    # d_model 8: the interpreter runs the Cauchy kernels' programs one by one
    ("s4", dict(d_model=8, s4=dict(d_state=8, **SMALL)), "cauchy"),
    ("liquid_s4", dict(d_model=8, liquid_s4=dict(d_state=8, liquid_kernel="kb", **SMALL)), "cauchy"),
    ("lru", dict(lru=dict(d_state=8, r_min=0.5, r_max=0.99)), "linear_scan"),
]


def fused_against_pytorch(family, settings, kernel, fused, monkeypatch):
    """The model on the `fused` backend of `kernel` against model.kernel_backend=ref: whole rows of packed
    documents and the same rows in two chunks through a state, logits and every parameter's gradient."""
    calls = []
    # the diagonal families' state summaries and entering-state responses run on the Vandermonde backends too
    for name in [kernel] + (["vandermonde_summary"] if kernel == "vandermonde" else []):
        registry = getattr(kernels, f"{name.upper()}_BACKENDS")
        monkeypatch.setitem(registry, fused, lambda *a, _name=name, _fn=registry[fused]: calls.append(_name) or _fn(*a))
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    ids[0, [5, 22]] = ids[1, 12] = 0
    seq_idx = document_index(ids, 0)
    results = {}
    # the C kernels are no model.kernel_backend value: auto picks them for CPU tensors
    for backend in ("ref", "auto" if fused == "cpu" else fused):
        torch.manual_seed(1)
        base = dict(family=family, d_model=16, n_layer=1, vocab_size=VOCAB, kernel_backend=backend)
        model = LanguageModel(model_config(base, settings)).double()
        state = model.allocate_state(2)
        chunks = torch.cat([model(ids[:, a:b], state=state, seq_idx=seq_idx[:, a:b]) for a, b in [(0, 11), (11, 30)]], 1)
        logits = torch.cat([model(ids, seq_idx=seq_idx), chunks])
        params = [p for p in model.parameters() if p.requires_grad]
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        results[backend] = (logits, *torch.autograd.grad((logits * weights).sum(), params))
    # the whole rows and each chunk on the fused kernel; S4's kernel is built once more in backward (recomputed);
    # the diagonal families' chunks each summarise their state, and the second takes the first's in (a kernel);
    # S4's summary is two Cauchy sums (the Woodbury factor, then the sum over the nodes) and its response one, each
    # recomputed in backward except the second chunk's summary, which nothing downstream uses: 6 + 4 + 2 + 2
    want = {"cauchy": ["cauchy"] * 14, "linear_scan": ["linear_scan"] * 3,
            "vandermonde": ["vandermonde"] * 4 + ["vandermonde_summary"] * 2}[kernel]
    assert sorted(calls) == want
    fast, slow = results.values()
    for a, b in zip(slow, fast):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * a.abs().max().item())


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("family,settings,kernel", CASES)
def test_the_fused_kernels_give_the_pytorch_paths_values_and_gradients(family, settings, kernel, monkeypatch):
    fused_against_pytorch(family, settings, kernel, "triton", monkeypatch)


def test_the_lru_on_cpu_runs_the_c_scan_and_gives_the_pytorch_paths_values_and_gradients(monkeypatch):
    fused_against_pytorch(*CASES[-1], "cpu", monkeypatch)
