"""benchmarks/gss_induction_diagnosis.py: the two GSS variants it trains change what they claim and nothing else."""
import json
import sys

import pytest
import torch

from .conftest import ROOT


def diagnosis():
    sys.path.insert(0, str(ROOT))
    import benchmarks.gss_induction_diagnosis as module

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
    D.per_channel_eigenvalues(shared)
    assert shared.Lambda_re_log.shape == shared.Lambda_im.shape == (shared.ssm_dim, 4)
    assert shared.Lambda_re_log.dtype == torch.float32
    torch.testing.assert_close(shared(hidden), expected, rtol=1e-6, atol=1e-6)  # the same kernel at init
    assert torch.autograd.grad(shared(hidden).sum(), shared.Lambda_im)[0].shape == (shared.ssm_dim, 4)


def test_short_conv_feeds_only_the_ssm_branch_with_the_shifted_input():
    """With the one-step-delay filter, the gate is the unpatched gate of the input and the SSM branch the
    unpatched branch of the input delayed by one position (zero first); the block stays causal."""
    D = diagnosis()
    plain, patched = mixer(), mixer()
    D.short_conv(patched)
    with torch.no_grad():
        patched.short_conv.weight.zero_()
        patched.short_conv.weight[:, 0, D.SHORT_CONV_WIDTH - 2] = 1.0  # y_t = x_{t-1}
        patched.short_conv.bias.zero_()
    hidden = torch.randn(2, 10, 16)
    delayed = torch.cat([torch.zeros(2, 1, 16), hidden[:, :-1]], dim=1)
    gate, v = patched._branches(hidden)
    torch.testing.assert_close(gate, plain._branches(hidden)[0])
    torch.testing.assert_close(v, plain._branches(delayed)[1])
    changed = hidden.clone()
    changed[:, 6] += 1.0
    before, after = patched(hidden), patched(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])  # nothing before position 6 moved
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_a_run_records_its_variant_and_refuses_to_merge_with_plain_gss(tmp_path, monkeypatch):
    from ssmforge.models import gss

    D = diagnosis()
    original = gss.GSSMixer.__init__
    monkeypatch.setattr(gss.GSSMixer, "__init__", original)  # whatever main patches is undone after the test
    threads = torch.get_num_threads()
    try:
        assert D.main(["short-conv", "--smoke", "--lrs", "3e-3", "--out", str(tmp_path / "patched.json")]) == 0
        import benchmarks.zoo as zoo

        gss.GSSMixer.__init__ = original  # the paper's GSS again
        zoo.main(["--smoke", "--families", "gss", "--tasks", "induction", "--lrs", "3e-3",
                  "--out", str(tmp_path / "plain.json")])
    finally:
        torch.set_num_threads(threads)
    saved, plain = (json.loads((tmp_path / name).read_text()) for name in ("patched.json", "plain.json"))
    assert saved["command"] == "python benchmarks/gss_induction_diagnosis.py short-conv --smoke --lrs 3e-3"
    assert saved["overrides"]["gss"]["patched"] == "short-conv" and "depthwise causal" in saved["variant"]
    assert [(r["family"], r["task"]) for r in saved["rows"]] == [("gss", "induction")]
    # the parameter match counted the convolution: 2 layers of d_model filters of width 4 and their biases
    plain_counts = {point[0]: point[1] for point in plain["families"]["gss"]["search"]}
    for d_model, count in saved["families"]["gss"]["search"]:
        assert count - plain_counts[d_model] == 2 * d_model * (D.SHORT_CONV_WIDTH + 1)
    with pytest.raises(zoo.MergeRefused, match="model overrides of gss differ"):
        zoo.merge([tmp_path / "plain.json", tmp_path / "patched.json"])
    assert D.main(["no-such-variant"]) == 2
