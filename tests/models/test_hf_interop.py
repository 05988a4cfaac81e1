"""Weight interop with transformers' MambaForCausalLM, checked against transformers itself."""
import json

import pytest
import torch

from ssmforge.errors import CheckpointError

from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, load_pretrained, save_pretrained

from .contracts import randomize_hf_weights

transformers = pytest.importorskip("transformers")


def hf_model(seed=0, **overrides):
    kwargs = dict(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                  time_step_rank="auto", use_bias=False, use_conv_bias=True, residual_in_fp32=True)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomize_hf_weights(transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs)).eval())


def tokens(vocab, seed=1, shape=(2, 13)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "use_bias": True}, {"vocab_size": 101}])
def test_transformers_folder_loads_with_equal_logits(tmp_path, safe_serialization, overrides):
    theirs = hf_model(**overrides)
    theirs.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = load_pretrained(tmp_path).eval()
    ids = tokens(theirs.config.vocab_size)
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours(ids)
    assert isinstance(got, torch.Tensor) and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_loads_in_transformers_unchanged(tmp_path):
    torch.manual_seed(5)
    ours = LanguageModel(ModelConfig(d_model=32, n_layer=3, vocab_size=250, mamba=MambaConfig(d_state=8))).eval()
    save_pretrained(ours, tmp_path / "export")
    theirs, info = transformers.MambaForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = tokens(250, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    # and back: the round trip keeps our config exactly
    again = load_pretrained(tmp_path / "export")
    assert again.config == ours.config


def test_save_replaces_an_existing_folder_atomically(tmp_path):
    torch.manual_seed(0)
    a = LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=64, mamba=MambaConfig(d_state=4)))
    b = LanguageModel(ModelConfig(d_model=16, n_layer=2, vocab_size=64, mamba=MambaConfig(d_state=4)))
    save_pretrained(a, tmp_path / "m")
    save_pretrained(b, tmp_path / "m")
    assert load_pretrained(tmp_path / "m").config.n_layer == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def write_export(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layer=1, vocab_size=64, mamba=MambaConfig(d_state=4))
    save_pretrained(LanguageModel(config), tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.pop("ssmforge_model")
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope: not a directory"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        load_pretrained(tmp_path)


def test_malformed_config(tmp_path):
    folder = write_export(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_pretrained(folder)


def test_other_architecture(tmp_path):
    folder = write_export(tmp_path)
    edit_config(folder, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config.json: field 'model_type' is 'llama'"):
        load_pretrained(folder)


def test_wrong_field_type(tmp_path):
    folder = write_export(tmp_path)
    edit_config(folder, hidden_size="big")
    with pytest.raises(CheckpointError, match=r"config.json: field 'hidden_size' should be int"):
        load_pretrained(folder)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = write_export(tmp_path)
    edit_config(folder, state_size=8)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'backbone.layers.0.mixer.A_log' has shape"):
        load_pretrained(folder)


def test_vocab_mismatch_names_the_embedding(tmp_path):
    folder = write_export(tmp_path)
    edit_config(folder, vocab_size=128)
    with pytest.raises(CheckpointError, match=r"tensor 'backbone.embeddings.weight' has shape \(64, 16\)"):
        load_pretrained(folder)


def test_missing_tensor(tmp_path):
    folder = write_export(tmp_path)
    edit_config(folder, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone.layers.1.*' and \d+ more"):
        load_pretrained(folder)


def test_truncated_weights(tmp_path):
    folder = write_export(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_pretrained(folder)


def test_no_weights(tmp_path):
    folder = write_export(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found"):
        load_pretrained(folder)


class Payload:
    """Any class outside torch's weights-only allow-list: unpickling it could run code."""


def test_bin_with_pickled_objects_is_refused(tmp_path):
    folder = write_export(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"backbone.norm_f.weight": torch.ones(16), "evil": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a loadable weights-only"):
        load_pretrained(folder)
