"""The run config: strict keys, types and values, overrides and interpolation, one-line errors."""
import dataclasses
from pathlib import Path

import pytest

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import RunConfig, Setting, describe, field_docs, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, RunConfig) and config.run_dir


def test_overrides_and_interpolation():
    config = load_config(CONFIGS / "quickstart.yaml",
                         ["variables.seq_len=128", "train.lr=1e-3", "model.mamba.dt_rank=4", "train.betas=[0.8,0.9]",
                          "data.sources.0.weight=2"])
    assert config.data.seq_len == 128  # interpolated from the variables block
    assert config.train.lr == pytest.approx(1e-3) and config.model.mamba.dt_rank == 4
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
    ("model.mamba.d_conv=1", r"model\.mamba\.d_conv=1 is invalid: must be between 2 and 8"),
    ("model.mamba.dt_rank=1000", r"model\.mamba\.dt_rank=1000 is invalid: must be <= expand \* d_model"),
    ("model.mamba.dt_min=0.5", r"model\.mamba\.dt_min=0\.5 is invalid: must satisfy 0 < dt_min <= dt_max"),
    ("deepspeed.zero_stage=4", r"deepspeed\.zero_stage=4 is invalid: one of 0, 1, 2, 3"),
    ("data.sources.0.kind=ftp", r"data\.sources\.0\.kind='ftp' is invalid"),
    ("data.sources.5.kind=local", r"'data\.sources\.5' is not a config section"),
    ("glue.tasks=[cola,squad]", r"glue\.tasks='squad' is invalid"),
    ("wandb.mode=cloud", r"wandb\.mode='cloud' is invalid: one of online, offline, disabled"),
    ("data.document_boundaries=sometimes", r"data\.document_boundaries='sometimes' is invalid: one of flow, reset"),
    ("seq_len", r"override 'seq_len' is invalid: expected key\.sub=value"),
    ("model.n_layer=${variables.nope}", r"Interpolation key 'variables\.nope' not found"),
    ("model.mamba2_d_state=16", r"model\.mamba2_d_state was renamed: use model\.mamba2\.d_state$"),
    ("model.attn_heads=4", r"model\.attn_heads was renamed: use model\.attention\.heads$"),
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
    ("run_dir: r\nmodel: {gss_expand: 2}\n", r"model\.gss_expand was renamed: use model\.gss\.expand"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_run_folders_frozen_config_with_flat_model_keys_still_loads(tmp_path):
    """config.yaml frozen into a run folder before the per-mixer sections: converted, not refused."""
    path = tmp_path / "config.yaml"
    path.write_text("run_dir: r\nmodel: {family: mamba2, d_model: 64, n_layer: 2, expand: 3, mamba2_headdim: 16}\n")
    with pytest.raises(ConfigError, match=r"model\.expand was renamed"):
        load_config(path)
    config = load_config(path, frozen=True)
    assert config.model.mamba2.expand == 3 and config.model.mamba2.headdim == 16 and config.model.mamba.expand == 3


def test_missing_file():
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config("nope.yaml")


def test_every_config_key_and_section_is_documented():
    """`config show` prints each key's docstring: every field reachable from the run config has one."""
    rows = describe(load_config(CONFIGS / "hybrid-tiny.yaml"))
    settings = [r for r in rows if isinstance(r, Setting)]
    assert len(settings) > 80
    undocumented = [r.key for r in settings if len(r.doc) < 8] + [key for key, doc in (r for r in rows
                                                                                    if isinstance(r, tuple)) if not doc]
    assert not undocumented, undocumented
    keys = {r.key for r in settings}
    assert {"train.log_every", "train.eval_every", "train.save_every", "deepspeed.zero_stage",
            "data.sources.0.kind", "model.d_model"} <= keys


def test_field_docs_reads_only_the_line_under_a_field():
    @dataclasses.dataclass
    class Example:
        documented: int = 1
        """What it is."""
        undocumented: int = 2  # a comment is not documentation
        last: str = "x"
        """Spread
        over lines."""

    assert field_docs(Example) == {"documented": "What it is.", "last": "Spread over lines."}


def test_config_show_prints_value_type_default_and_meaning(capsys):
    from ssmforge.cli import main

    assert main(["config", "show", str(CONFIGS / "tiny.yaml"), "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("train.lr = 0.5 "))
    assert "# float, default 0.0006. Peak learning rate" in line
    assert "\n# train: " in out and "train.log_every = " in out
    assert main(["config", "show", "train.max_steps=7"]) == 0  # the defaults with an override
    out = capsys.readouterr().out
    assert "train.max_steps = 7 " in out and "run_dir = <run_dir> " in out and "data.shard_dir = <run_dir>/data" in out
    assert main(["config", "show", str(CONFIGS / "tiny.yaml"), "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err


@pytest.mark.parametrize("overrides,message", [
    (["model.family=hyena", "model.hyena.l_max=32", "data.seq_len=64"],
     r"tiny\.yaml: model\.hyena\.l_max=32 is invalid: must be at least data\.seq_len=64"),
    (["model.family=h3", "model.h3.d_state=64", "data.seq_len=64", "train.context_parallel=2"],
     r"tiny\.yaml: model\.h3\.d_state=64 is invalid: must be at most data\.seq_len / train\.context_parallel \+ 1 = 33"),
])
def test_mixer_limits_that_depend_on_the_sequence_length_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", overrides)
