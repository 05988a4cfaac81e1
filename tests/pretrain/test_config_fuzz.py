"""Property-based config faults: random wrong types, out-of-range values and unknown keys given to every
command that reads a run config. The answer is always one line naming the key, and exit code 2; never a
traceback, and never a started run."""
import dataclasses
import typing

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ssmforge.cli import main  # noqa: E402
from ssmforge.pretrain.config import RunConfig  # noqa: E402

from .conftest import ROOT  # noqa: E402

TINY = str(ROOT / "configs" / "tiny.yaml")


def typed_fields(kinds: tuple[type, ...], cls: type = RunConfig, prefix: str = "") -> list[str]:
    """`section.key` (`model.mamba.key` in a nested section) of every scalar field of the run config whose type
    is one of `kinds`."""
    keys = []
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            keys += typed_fields(kinds, kind, f"{prefix}{name}.")
        elif prefix and kind in kinds:
            keys.append(f"{prefix}{name}")
    return keys


NUMBERS = typed_fields((int, float))
NOT_A_NUMBER = ["abc", "[1, 2]", "{a: 1}", "1.5.2", "'12'x"]
OUT_OF_RANGE = {  # key -> values the validation must refuse
    "train.lr": [0, -1e-3], "train.max_steps": [0, -5], "train.micro_batch_size": [0], "train.grad_clip": [-1],
    "train.warmup_steps": [-1], "train.min_lr_ratio": [1.5, -0.1], "train.betas": ["[0.9]", "[1.0, 0.95]"],
    "train.precision": ["fp8", "half"], "train.nonfinite_loss": ["ignore"], "train.collective_timeout_s": [0, 5],
    "model.d_model": [0, -8], "model.n_layer": [0], "model.mamba.d_conv": [1, 9], "model.mamba.dt_min": [0, 0.5],
    "model.family": ["rnn", "Mamba"], "model.vocab_size": [0], "model.mamba.expand": [0],
    "model.kernel_backend": ["cuda"],
    "data.seq_len": [0, -1], "deepspeed.zero_stage": [4, -1], "deepspeed.param_persistence_threshold": [-1],
    "eval.batch_size": [0], "glue.lr": [0], "glue.warmup_ratio": [1.0, -0.5], "glue.epochs": [0],
    "tokenizer.kind": ["wordpiece"], "train.global_batch_size": [0, 3], "train.grad_accum_steps": [0],
    "train.num_canonical_nodes": [0],
}
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "variables"]  # variables: free-form


def wrong_type():
    return st.tuples(st.sampled_from(NUMBERS), st.sampled_from(NOT_A_NUMBER)).map(lambda kv: f"{kv[0]}={kv[1]}")


def out_of_range():
    return st.sampled_from(sorted(OUT_OF_RANGE)).flatmap(
        lambda key: st.sampled_from(OUT_OF_RANGE[key]).map(lambda value: f"{key}={value}"))


def unknown_key():
    known = {f"{s}.{name}" for s in SECTIONS for name in _field_names(s)}
    names = st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True)
    return st.tuples(st.sampled_from(SECTIONS + ["extra"]), names).map(lambda p: f"{p[0]}.{p[1]}=1").filter(
        lambda o: o.split("=")[0] not in known)


def _field_names(section: str) -> set[str]:
    cls = typing.get_type_hints(RunConfig).get(section)
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def bad_override():
    return st.one_of(wrong_type(), out_of_range(), unknown_key())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny exported model with the byte tokenizer, for the commands that read a checkpoint first."""
    import torch

    from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, save_pretrained

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    config = ModelConfig(d_model=16, n_layer=1, vocab_size=260, mamba=MambaConfig(d_state=4))
    save_pretrained(LanguageModel(config), out, token_ids={"bos_token_id": 1, "eos_token_id": 2}, byte_tokenizer=True)
    return out


COMMANDS = {  # command -> argv around the overrides (run folder, model folder)
    "prepare": lambda run, model: ["prepare", TINY, f"run_dir={run}"],
    "pretrain": lambda run, model: ["pretrain", TINY, f"run_dir={run}"],
    "submit": lambda run, model: ["submit", TINY, "--dry-run", f"run_dir={run}"],
    "finetune-glue": lambda run, model: ["finetune-glue", str(model), "--config", TINY, "--data-dir", str(run),
                                         "--out", str(run / "glue")],
}


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.lists(st.sampled_from(["train.lr=1e-3", "seed=3", "model.mamba.d_state=4"]), max_size=2),
       bad=bad_override(), where=st.integers(0, 2))
def test_every_command_answers_a_bad_override_with_one_line_and_exit_code_2(command, good, bad, where, capsys,
                                                                            tmp_path, model_dir):
    overrides = [g for g in good if g.split("=")[0] != bad.split("=")[0]]  # a later good value would win
    overrides.insert(min(where, len(overrides)), bad)
    argv = COMMANDS[command](tmp_path / "run", model_dir) + overrides  # overrides may follow the options
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("ssmforge: error:") and "Traceback" not in err, (argv, err)
    key = bad.split("=")[0]
    assert key.split(".")[-1] in lines[0], (argv, lines[0])  # the offending key is named
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was started


FLAGS = {  # command -> (argv before the flag, numeric flags it takes)
    "generate": (lambda model: ["generate", "--random-init", TINY, "--prompt", "x"],
                 ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]),
    "eval-ppl": (lambda model: ["eval-ppl", str(model), "--dataset", TINY],
                 ["--max-length", "--stride", "--batch-size"]),
}


@pytest.mark.parametrize("command", sorted(FLAGS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 4),
       value=st.one_of(st.sampled_from(["abc", "1x", "", "--", "1e999"]), st.integers(-10**6, -1).map(str)))
def test_numeric_flags_out_of_range_or_of_the_wrong_type(command, which, value, capsys, model_dir):
    before, flags = FLAGS[command]
    flag = flags[which % len(flags)]
    code, err = run(before(model_dir) + [f"{flag}={value}"], capsys)
    if code == 0:  # a negative seed is a valid seed; nothing else may pass
        assert flag == "--seed", (flag, value)
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ssmforge: error:") and "Traceback" not in err, err
