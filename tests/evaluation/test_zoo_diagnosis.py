"""benchmarks/zoo_diagnosis.py: each variant it trains changes what it claims and nothing else, and its report says
so."""
import json
import sys

import pytest
import torch

from .conftest import ROOT


def diagnosis():
    sys.path.insert(0, str(ROOT))
    import benchmarks.zoo_diagnosis as module

    return module


def mixer(seed: int = 0):
    from ssmforge.models import GSSConfig, ModelConfig
    from ssmforge.models.gss import GSSMixer

    torch.manual_seed(seed)
    return GSSMixer(ModelConfig(family="gss", d_model=16, n_layer=1, vocab_size=32, gss=GSSConfig(d_state=4)), 0)


def test_per_channel_eigenvalues_start_as_the_shared_ones():
    D = diagnosis()
    shared, hidden = mixer(), torch.randn(2, 12, 16)
    expected = shared(hidden)
    D.per_channel_eigenvalues(shared, None)  # this change reads no config
    assert shared.Lambda_re_log.shape == shared.Lambda_im.shape == (shared.ssm_dim, 4)
    assert shared.Lambda_re_log.dtype == torch.float32
    torch.testing.assert_close(shared(hidden), expected, rtol=1e-6, atol=1e-6)  # the same kernel at init
    assert torch.autograd.grad(shared(hidden).sum(), shared.Lambda_im)[0].shape == (shared.ssm_dim, 4)


def test_a_run_records_its_variant_and_refuses_to_merge_with_plain_gss(tmp_path, monkeypatch):
    from ssmforge.models import gss

    D = diagnosis()
    original = gss.GSSMixer.__init__
    monkeypatch.setattr(gss.GSSMixer, "__init__", original)  # whatever main patches is undone after the test
    threads = torch.get_num_threads()
    try:
        assert D.main(["per-channel", "--smoke", "--lrs", "3e-3", "--out", str(tmp_path / "patched.json")]) == 0
        import benchmarks.zoo as zoo

        gss.GSSMixer.__init__ = original  # the paper's GSS again
        zoo.main(["--smoke", "--families", "gss", "--tasks", "induction", "--lrs", "3e-3",
                  "--out", str(tmp_path / "plain.json")])
    finally:
        torch.set_num_threads(threads)
    saved, plain = (json.loads((tmp_path / name).read_text()) for name in ("patched.json", "plain.json"))
    assert saved["command"] == "python benchmarks/zoo_diagnosis.py per-channel --smoke --lrs 3e-3"
    assert saved["overrides"]["gss"]["patched"] == "per-channel" and "per channel" in saved["variant"]
    assert [(r["family"], r["task"]) for r in saved["rows"]] == [("gss", "induction")]
    # the parameter match counted the per-channel eigenvalues: 2 layers of (re, im) for H - 1 more channels
    plain_counts = {point[0]: point[1] for point in plain["families"]["gss"]["search"]}
    d_state = saved["families"]["gss"]["sections"]["gss"]["d_state"]
    for d_model, count in saved["families"]["gss"]["search"]:
        assert count - plain_counts[d_model] == 2 * 2 * d_state * (d_model // 2 - 1)  # H = d_model // 2
    with pytest.raises(zoo.MergeRefused, match="model overrides of gss differ"):
        zoo.merge([tmp_path / "plain.json", tmp_path / "patched.json"])
    assert D.main(["no-such-variant"]) == 2


def test_the_ungated_s4_output_is_gelu_then_one_linear_map():
    from ssmforge.models import ModelConfig
    from ssmforge.models.config import S4Config
    from ssmforge.models.s4 import S4Mixer

    D = diagnosis()
    config = ModelConfig(family="s4", d_model=8, n_layer=1, vocab_size=32, s4=S4Config(d_state=4))
    torch.manual_seed(0)
    mixer = S4Mixer(config, 0)
    gated = sum(p.numel() for p in mixer.parameters())
    D.ungated_output(mixer, config)
    # the GLU's map d -> 2d (with bias where the config has one) becomes d -> d
    assert gated - sum(p.numel() for p in mixer.parameters()) == 8 * 8 + (8 if config.bias else 0)
    y = torch.randn(2, 5, 8)
    weight = mixer.output.proj.weight
    bias = mixer.output.proj.bias if mixer.output.proj.bias is not None else 0
    torch.testing.assert_close(mixer.output(y), torch.nn.functional.gelu(y) @ weight.T + bias)
    assert mixer.output.flops_per_token() == 2 * 8 * 8
