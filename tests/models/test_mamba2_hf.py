"""Weight interop with transformers' Mamba2ForCausalLM, checked against transformers itself."""
import json

import pytest
import torch

from ssmforge.errors import CheckpointError

from ssmforge.models import LanguageModel, Mamba2Config, ModelConfig, load_pretrained, save_pretrained

from .contracts import randomize_hf_weights

transformers = pytest.importorskip("transformers")
modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


def hf_model(seed=0, **overrides):
    kwargs = dict(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2, head_dim=16,
                  num_heads=4, n_groups=1, chunk_size=16, conv_kernel=4, use_bias=False, use_conv_bias=True,
                  residual_in_fp32=True, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize_hf_weights(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs)).eval())


def tokens(vocab, seed=1, shape=(2, 37)):
    """37 steps: two full chunks of 16 and a partial one."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def grouped_hf_norm(monkeypatch):
    """transformers' PyTorch path normalises y * silu(z) over all of d_inner, its CUDA path (like the
    paper's code and ours) over each of the n_groups groups; the two agree only for n_groups = 1. For
    n_groups > 1 the comparison patches the PyTorch path to the grouped form."""

    def forward(self, hidden_states, gate=None):
        h = hidden_states.float() * torch.nn.functional.silu(gate.float())
        groups = h.view(*h.shape[:-1], self.n_groups, -1)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * groups.view(h.shape).to(hidden_states.dtype)

    monkeypatch.setattr(modeling_mamba2.MambaRMSNormGated, "forward", forward)

    def set_groups(model, n_groups):
        for layer in model.backbone.layers:
            layer.mixer.norm.n_groups = n_groups

    return set_groups


@pytest.mark.parametrize("overrides", [{}, {"use_bias": True, "use_conv_bias": False, "vocab_size": 101}])
def test_transformers_folder_loads_with_equal_logits(tmp_path, overrides):
    theirs = hf_model(**overrides)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.family == "mamba2"
    ids = tokens(theirs.config.vocab_size)
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tied_pytorch_bin_folder_loads(tmp_path):
    """transformers writes tied Mamba-2 weights only as .bin (safetensors refuses the shared tensor)."""
    theirs = hf_model(tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.tie_embeddings
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_several_groups_load_with_equal_logits(tmp_path, grouped_hf_norm):
    theirs = hf_model(n_groups=2, state_size=8)
    grouped_hf_norm(theirs, 2)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.mamba2.ngroups == 2
    ids = tokens(96)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_export_loads_in_transformers_unchanged(tmp_path, grouped_hf_norm, ngroups):
    torch.manual_seed(5)
    config = ModelConfig(family="mamba2", d_model=32, n_layer=2, vocab_size=250, bias=ngroups == 2,
                         mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=ngroups, chunk_size=16))
    ours = LanguageModel(config).eval()
    save_pretrained(ours, tmp_path / "export")
    theirs, info = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.lm_head.weight.data_ptr() == theirs.backbone.embeddings.weight.data_ptr()  # tied, as ours
    grouped_hf_norm(theirs, ngroups)
    ids = tokens(250, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    again = load_pretrained(tmp_path / "export")
    assert again.config == ours.config  # the round trip keeps our config exactly


def edited_export(tmp_path, **changes):
    torch.manual_seed(0)
    config = ModelConfig(family="mamba2", d_model=16, n_layer=1, vocab_size=64,
                         mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=16))
    folder = save_pretrained(LanguageModel(config), tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    hf.pop("ssmforge_model")
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def test_transformers_fields_alone_rebuild_the_config(tmp_path):
    config = load_pretrained(edited_export(tmp_path)).config
    assert (config.family, config.mamba2.headdim, config.mamba2.d_state, config.mamba2.chunk_size) == \
        ("mamba2", 8, 8, 16)


@pytest.mark.parametrize("changes, message", [
    ({"num_heads": 3}, r"config.json: field 'num_heads' is 3; num_heads \* head_dim must equal expand \* hidden_size"),
    ({"time_step_limit": [0.0, 0.1]}, r"config.json: field 'time_step_limit' is \[0.0, 0.1\]; only \[0.0, inf\]"),
    ({"n_groups": 3}, r"config.json: model.mamba2.ngroups=3 is invalid: must divide the number of heads"),
    ({"state_size": 4}, r"model.safetensors: tensor 'backbone.layers.0.mixer.\S+' has shape"),
])
def test_bad_transformers_config_names_the_field(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(edited_export(tmp_path, **changes))
