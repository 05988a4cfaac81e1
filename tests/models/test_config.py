"""The model config: one typed section per mixer, the registry that ties sections, symbols and modules
together, a torch-free import, the renamed flat keys (refused in new configs, converted in old exports),
and the README's mixer table against the registry."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmforge.errors import CheckpointError, ConfigError
from ssmforge.models import (FAMILIES, MIXERS, RENAMED_MODEL_KEYS, SYMBOLS, LanguageModel, Mamba2Config,
                             MambaConfig, ModelConfig, load_pretrained, save_pretrained)
from ssmforge.models import config as config_module
from ssmforge.models import registry

ROOT = Path(__file__).resolve().parents[2]


def test_loading_a_run_config_does_not_import_torch():
    code = f"""
import sys
from ssmforge.pretrain.config import load_config
from ssmforge.errors import ConfigError
config = load_config({str(ROOT / 'configs' / 'hybrid-tiny.yaml')!r}, ["model.mamba.d_state=4"])
assert config.model.mamba.d_state == 4 and config.model.layer_kinds == ["mamba", "attention", "mlp", "mamba"]
try:
    load_config(None, ["run_dir=r", "model.family=mamba2", "model.mamba2.headdim=48", "model.d_model=64"])
except ConfigError as e:
    assert "model.mamba2.headdim=48 is invalid" in str(e), e
import ssmforge.models
ssmforge.models.ModelConfig, ssmforge.models.SYMBOLS, ssmforge.models.FAMILIES
assert "torch" not in sys.modules, "torch was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_section_is_registered_with_a_symbol_a_field_and_a_module():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(SYMBOLS.values()) == set(registry.SECTIONS) == set(MIXERS)
    for name, section in registry.SECTIONS.items():
        assert fields[name].default_factory is section
        assert section.mixer_name == MIXERS[name].mixer_name == name
        assert registry.mixer_description(name)  # the README table's description
    assert {FAMILIES[name] for name in ("mamba", "mamba2", "gss")} == {"M", "2", "G"}
    assert FAMILIES["transformer"] == "*-" and FAMILIES["hybrid"] is None


def test_a_module_without_a_section_and_a_section_without_a_module_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"mixer 's5' has no config section: add a dataclass decorated "
                                         r"@mixer_config\('s5'"):
        registry.register_mixer("s5")(type("S5Mixer", (), {}))
    monkeypatch.setitem(registry.SECTIONS, "s5", type("S5Config", (), {"__doc__": "S5."}))
    with pytest.raises(ImportError, match=r"mixer section\(s\) \['s5'\] have no module"):
        registry.check_complete()
    with pytest.raises(ValueError, match="registered twice"):
        registry.mixer_config("other", symbol="M")(type("OtherConfig", (), {"__doc__": "Other."}))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_mixer("mamba")(type("AnotherMamba", (), {}))


def test_each_section_validates_itself_naming_the_full_key():
    with pytest.raises(ConfigError, match=r"^model\.mamba2\.headdim=48 is invalid: must divide expand \* d_model "
                                          r"\(128\) into heads$"):
        ModelConfig(family="mamba2", d_model=64, mamba2=Mamba2Config(headdim=48)).validate()
    with pytest.raises(ConfigError, match=r"^model\.mamba\.d_state=0 is invalid: must be a positive integer$"):
        ModelConfig(mamba=MambaConfig(d_state=0)).validate()
    rates = [(family, "ssm_lr") for family in ("s4", "s4d", "dss", "h3", "liquid_s4", "gss")]
    for family, key in rates + [("hyena", "filter_lr"), ("lru", "ssm_lr_factor")]:
        with pytest.raises(ConfigError, match=rf"^model\.{family}\.{key}=0\.0 is invalid: must be > 0, or null "
                                              r"\(train\.lr\)$"):
            ModelConfig.from_dict({"family": family, family: {key: 0.0}}).validate()
        ModelConfig.from_dict({"family": family, family: {key: None}}).validate()
    # only the sections of the mixers the stack uses are checked
    ModelConfig(family="transformer", mamba=MambaConfig(d_state=0), mamba2=Mamba2Config(headdim=48)).validate()
    transformer = ModelConfig.from_dict({"family": "transformer", "d_model": 64, "attention": {"heads": 5}})
    with pytest.raises(ConfigError, match=r"^run\.model\.attention\.heads=5 is invalid"):
        transformer.validate("run.model")


def test_mamba2_and_gss_have_their_own_copies_of_the_keys_they_shared_with_mamba():
    shared = {"d_conv", "expand", "dt_min", "dt_max", "dt_init_floor", "conv_bias"}
    mamba, mamba2 = MambaConfig(), Mamba2Config()
    assert {key: getattr(mamba2, key) for key in shared} == {key: getattr(mamba, key) for key in shared}
    gss = config_module.GSSConfig()
    assert (gss.dt_min, gss.dt_max) == (mamba.dt_min, mamba.dt_max)


def test_every_removed_flat_key_names_its_one_new_home():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for old, new in RENAMED_MODEL_KEYS.items():
        section, leaf = new.split(".")
        assert old not in fields and leaf in {f.name for f in dataclasses.fields(registry.SECTIONS[section])}
        with pytest.raises(TypeError):  # Python construction does not take the old names either
            ModelConfig(**{old: getattr(getattr(ModelConfig(), section), leaf)})
    assert config_module.renamed_model_key_message("mamba2_d_state") == \
        "model.mamba2_d_state was renamed: use model.mamba2.d_state"
    assert config_module.renamed_model_key_message("attn_heads") == \
        "model.attn_heads was renamed: use model.attention.heads"
    assert config_module.renamed_model_key_message("d_model") is None
    with pytest.raises(ConfigError, match=r"^model\.gss_d_state was renamed: use model\.gss\.d_state"):
        ModelConfig.from_dict({"gss_d_state": 8})
    with pytest.raises(ConfigError, match=r"^model\.mamba\.heads: unknown key$"):
        ModelConfig.from_dict({"mamba": {"heads": 8}})


def old_flat_config(config: ModelConfig) -> dict:
    """The `ssmforge_model` dict the flat ModelConfig of earlier versions wrote for `config` (whose Mamba-2 and
    GSS keys shared with Mamba must equal Mamba's: the flat config had one value for them)."""
    flat = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)
            if f.name not in registry.SECTIONS and f.name != "kernel_backend"}
    for old, new in RENAMED_MODEL_KEYS.items():
        section, leaf = new.split(".")
        flat[old] = getattr(config.section(section), leaf)
    return flat


def test_an_export_written_with_the_old_flat_keys_still_loads(tmp_path):
    dt = dict(dt_min=0.01, dt_max=0.2)
    config = ModelConfig(family="hybrid", layer_pattern="M2G*-", n_layer=5, d_model=32, vocab_size=64,
                         mamba=MambaConfig(d_state=4, d_conv=3, expand=3, conv_bias=False, **dt),
                         mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=16, d_conv=3, expand=3,
                                             conv_bias=False, **dt),
                         gss=config_module.GSSConfig(d_state=4, ssm_dim=8, **dt),
                         attention=config_module.AttentionConfig(heads=4, window=3),
                         mlp=config_module.MLPConfig(hidden=40))
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    folder = save_pretrained(model, tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "ssmforge" and hf["ssmforge_model"]["mamba2"]["headdim"] == 16  # written nested
    assert load_pretrained(folder).config == config
    hf["ssmforge_model"] = old_flat_config(config)
    assert "mamba2_headdim" in hf["ssmforge_model"] and "mamba2" not in hf["ssmforge_model"]
    (folder / "config.json").write_text(json.dumps(hf))
    loaded = load_pretrained(folder).eval()
    assert loaded.config == config
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_old_flat_keys_go_where_the_old_model_read_them():
    """A flat `expand` set Mamba-2's width too, and a flat dt range GSS's: an old Mamba-2 export keeps its shape."""
    upgraded = config_module.upgrade_flat_model_dict(
        {"family": "mamba2", "d_model": 32, "expand": 4, "d_conv": 3, "dt_max": 0.5, "mamba2_headdim": 16})
    config = ModelConfig.from_dict(upgraded).validate()
    assert (config.mamba2.expand, config.mamba2.d_conv, config.mamba2.dt_max, config.mamba2.headdim) == (4, 3, 0.5, 16)
    assert (config.mamba.expand, config.gss.dt_max) == (4, 0.5)
    new = {"family": "mamba", "mamba": {"d_state": 8}}
    assert config_module.upgrade_flat_model_dict(new) is new


def test_an_unknown_key_in_an_export_is_one_checkpoint_error(tmp_path):
    folder = save_pretrained(LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=64)), tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    hf["ssmforge_model"]["mamba"]["d_staet"] = 4
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"config.json: field 'ssmforge_model': ssmforge_model\.mamba\.d_staet: "
                                              r"unknown key$"):
        load_pretrained(folder)


def test_kernel_backend_and_block_are_not_exported(tmp_path):
    model = LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=64, kernel_backend="ref", kernel_block_mib=1))
    folder = save_pretrained(model, tmp_path / "m")
    exported = json.loads((folder / "config.json").read_text())["ssmforge_model"]
    assert "kernel_backend" not in exported and "kernel_block_mib" not in exported
    loaded = load_pretrained(folder).config  # the loading machine's choices
    assert (loaded.kernel_backend, loaded.kernel_block_mib) == ("auto", 256)


MARKERS = ("<!-- mixer-table", "<!-- /mixer-table -->")


def test_the_readme_mixer_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(MARKERS[0]), readme.index(MARKERS[1])
    rows = [line for line in readme[start:end].splitlines()[1:] if line.startswith("|")]
    parsed = [tuple(cell.strip() for cell in row.strip("|").split("|")) for row in rows[2:]]
    want = [(f"`{symbol}`", f"`model.{name}`", registry.mixer_description(name)) for symbol, name in SYMBOLS.items()]
    assert parsed == want, ("README.md's mixer table is out of date; replace the lines between the markers with "
                            "the output of `python -m ssmforge.models.registry`:\n" + registry.mixer_table())
    assert "\n".join(rows) == registry.mixer_table()


def test_the_registry_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "ssmforge.models.registry"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == registry.mixer_table(), proc.stderr
    assert re.search(r"^\| `2` \| `model\.mamba2` \| Mamba-2 ", proc.stdout, re.M)
