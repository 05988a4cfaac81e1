"""The run config: strict keys, types and values, overrides and interpolation, one-line errors."""
from pathlib import Path

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import RunConfig, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, RunConfig) and config.run_dir


def test_overrides_and_interpolation():
    config = load_config(CONFIGS / "quickstart.yaml",
                         ["variables.seq_len=128", "train.lr=1e-3", "model.dt_rank=4", "train.betas=[0.8,0.9]",
                          "data.sources.0.weight=2"])
    assert config.data.seq_len == 128  # interpolated from the variables block
    assert config.train.lr == pytest.approx(1e-3) and config.model.dt_rank == 4
    assert config.train.betas == [0.8, 0.9] and config.data.sources[0].weight == 2.0
    assert config.data.shard_dir == "runs/quickstart/data"


def test_frozen_yaml_round_trips(tmp_path):
    config = load_config(CONFIGS / "quickstart.yaml", ["model.n_layer=3"])
    (tmp_path / "c.yaml").write_text(to_yaml(config))
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=64", r"model\.d_modle: Key 'd_modle' not in 'ModelConfig'"),
    ("model.d_model=abc", r"model\.d_model: Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.lr=-1", r"train\.lr=-1\.0 is invalid: must be > 0"),
    ("model.family=transformerxl", r"model\.family='transformerxl' is invalid: one of \["),
    ("model.d_conv=1", r"model\.d_conv=1 is invalid: must be between 2 and 8"),
    ("model.dt_rank=1000", r"model\.dt_rank=1000 is invalid: must be <= expand \* d_model"),
    ("model.dt_min=0.5", r"model\.dt_min=0\.5 is invalid: must satisfy 0 < dt_min <= dt_max"),
    ("deepspeed.zero_stage=4", r"deepspeed\.zero_stage=4 is invalid: one of 0, 1, 2, 3"),
    ("data.sources.0.kind=ftp", r"data\.sources\.0\.kind='ftp' is invalid"),
    ("data.sources.5.kind=local", r"'data\.sources\.5' is not a config section"),
    ("glue.tasks=[cola,squad]", r"glue\.tasks='squad' is invalid"),
    ("wandb.mode=cloud", r"wandb\.mode='cloud' is invalid: one of online, offline, disabled"),
    ("seq_len", r"override 'seq_len' is invalid: expected key\.sub=value"),
    ("model.n_layer=${variables.nope}", r"Interpolation key 'variables\.nope' not found"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(CONFIGS / "quickstart.yaml", [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("run_dir: r\nmodel: {d_model: [1]}\n", r"model\.d_model"),
    ("run_dir: r\nmodels: {}\n", r"Key 'models' not in 'RunConfig'"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("run_dir: [unclosed\n", r"not valid YAML"),
    ("model: {d_model: 64}\n", r"run_dir"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config("nope.yaml")
