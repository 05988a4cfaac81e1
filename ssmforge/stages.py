"""`ssmforge run CONFIG`: the stages of a run (prepare, pretrain, export, eval_ppl, eval_harness, finetune_glue;
the config's `stages.run`), each the ssmforge command of that name run as a process of its own, one after the
other, so that a run ends with its evaluation.

Every stage is idempotent: one that is done for the run's current state is skipped with a line saying
why, so running the same command again continues where it stopped. prepare and pretrain are done
from the run's files (prepared shards, the latest checkpoint at train.max_steps); export, eval_ppl,
eval_harness and finetune_glue are recorded in run_dir/stages/state.json with what they were computed from
(the checkpoint tag and the settings of their section) and run again when that changes.

The config is frozen into run_dir/stages/config.yaml, which every stage reads. Signals that ask a run to
stop (SIGTERM, SIGUSR1) are passed on to the running stage; a stage that exits non-zero ends the run with
its exit code (75: pretraining stopped for a requeue).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ssmforge.errors import ConfigError

STATE_FILE = "state.json"


@dataclass
class Stage:
    name: str
    command: list[str]  # the argv of `python -m ssmforge ...`, or of torchrun for a multi-process pretrain


def frozen_config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "stages" / "config.yaml"


def trained_steps(run_dir: str | Path) -> tuple[str | None, int]:
    """(tag, step) of a run's latest complete checkpoint, read from its files alone; (None, 0) without one."""
    checkpoints = Path(run_dir) / "checkpoints"
    latest = checkpoints / "latest"
    if not latest.is_file():
        return None, 0
    tag = latest.read_text().strip()
    try:
        return tag, int(json.loads((checkpoints / tag / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, 0


def stage_key(name: str, config) -> str | None:
    """What a finished export, eval_ppl, eval_harness or finetune_glue was computed from, now: the latest
    checkpoint's tag and the stage's settings. None for prepare and pretrain, which tell themselves whether they
    are done."""
    sections = {"export": None, "eval_ppl": config.eval, "eval_harness": config.harness, "finetune_glue": config.glue}
    if name not in sections:
        return None
    tag, _ = trained_steps(config.run_dir)
    settings = asdict(sections[name]) if sections[name] is not None else None
    text = json.dumps({"checkpoint": tag, "export_dir": config.stages.export_dir, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def freeze(config) -> Path:
    """Write the resolved config where every stage reads it; returns the path."""
    from ssmforge.pretrain.config import to_yaml

    path = frozen_config_path(config.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)
    return path


def plan(config, frozen: Path, nproc_per_node: int = 1, only: list[str] | None = None) -> list[Stage]:
    """The stages to run, in order, with their commands."""
    run_dir, export = str(Path(config.run_dir)), str(Path(config.stages.export_dir))
    names = list(config.stages.run)
    if only:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ConfigError(f"--only {','.join(only)}: {', '.join(unknown)} not in stages.run "
                              f"({', '.join(names)})")
        names = [name for name in names if name in only]
    python = [sys.executable, "-m", "ssmforge"]
    pretrain = python + ["pretrain", str(frozen)]
    if nproc_per_node > 1:
        pretrain = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc_per_node}", "-m", "ssmforge", "pretrain", str(frozen)]
    commands = {
        "prepare": python + ["prepare", str(frozen)],
        "pretrain": pretrain,
        "export": python + ["export", run_dir, export],
        "eval_ppl": python + ["eval-ppl", export, "--out", f"{run_dir}/eval", *_eval_flags(config)],
        "eval_harness": python + ["eval-harness", export, "--out", f"{run_dir}/eval/harness", *_harness_flags(config)],
        "finetune_glue": python + ["finetune-glue", export, "--out", f"{run_dir}/eval/glue",
                                   *_section_overrides("glue", config.glue)],
    }
    return [Stage(name, commands[name]) for name in names]


def _eval_flags(config) -> list[str]:
    """The run's eval section as eval-ppl's flags (the stage scores what the config says, whatever the
    export's own defaults), the window defaulting to the training length."""
    section = config.eval
    flags = ["--dataset", section.dataset, "--batch-size", str(section.batch_size),
             "--max-length", str(section.max_length or config.data.seq_len)]
    return flags + (["--stride", str(section.stride)] if section.stride is not None else [])


def _harness_flags(config) -> list[str]:
    """The run's harness section as eval-harness's flags, the context defaulting to the training length."""
    section = config.harness
    flags = ["--tasks", ",".join(section.tasks), "--num-fewshot", str(section.num_fewshot), "--batch-size",
             str(section.batch_size), "--max-length", str(section.max_length or config.data.seq_len)]
    for flag, value in (("--limit", section.limit), ("--data-dir", section.data_dir),
                        ("--include-path", section.include_path)):
        flags += [flag, str(value)] if value is not None else []
    return flags


def _section_overrides(name: str, section) -> list[str]:
    """A config section as key=value overrides of a stage command."""
    return [f"{name}.{key}={json.dumps(value)}" for key, value in asdict(section).items()]


def read_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "stages" / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}  # a state file cut by a crash: every recorded stage runs again, which is safe


def _record(run_dir: str | Path, name: str, key: str) -> None:
    path = Path(run_dir) / "stages" / STATE_FILE
    state = read_state(run_dir)
    state[name] = {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def done_reason(stage: Stage, config, state: dict) -> str | None:
    """Why a stage has nothing to do, or None when it must run."""
    if stage.name == "prepare":
        from ssmforge.data_pipeline.pack import shards_ready
        from ssmforge.errors import DataError

        try:
            return f"{config.data.shard_dir} holds this config's shards" if shards_ready(config) else None
        except DataError:
            return None  # another config's shards: the stage says so itself
    if stage.name == "pretrain":
        tag, step = trained_steps(config.run_dir)
        return f"checkpoint {tag} is at step {step} of {config.train.max_steps}" if step >= config.train.max_steps \
            else None
    if stage.name == "export" and not (Path(config.stages.export_dir) / "config.json").is_file():
        return None
    key = stage_key(stage.name, config)
    if key is not None and state.get(stage.name, {}).get("key") == key:
        return f"done for this checkpoint and these settings at {state[stage.name]['finished']}"
    return None


class _Forwarder:
    """Passes SIGTERM and SIGUSR1 on to the running stage (a graceful stop of training), and Ctrl-C too."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self._previous = {sig: signal.signal(sig, self._forward) for sig in self.SIGNALS}

    def _forward(self, signum, _frame) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_stages(config, stages: list[Stage], out=sys.stdout) -> int:
    """Run the stages in order; return 0, or the exit code of the first stage that failed."""
    state = read_state(config.run_dir)
    forwarder = _Forwarder()
    try:
        for i, stage in enumerate(stages, 1):
            prefix = f"stage {i}/{len(stages)} {stage.name}"
            reason = done_reason(stage, config, state)
            if reason:
                print(f"{prefix}: skipped, {reason}", file=out, flush=True)
                continue
            print(f"{prefix}: {' '.join(stage.command[1:])}", file=out, flush=True)
            started = time.monotonic()
            forwarder.child = subprocess.Popen(stage.command)
            code = forwarder.child.wait()
            forwarder.child = None
            if code != 0:
                what = "stopped for a requeue" if code == 75 else f"failed with exit code {code}"
                print(f"{prefix}: {what}; run the same command again to continue from this stage", file=out,
                      flush=True)
                return code
            key = stage_key(stage.name, config)
            if key is not None:
                _record(config.run_dir, stage.name, key)
                state = read_state(config.run_dir)
            print(f"{prefix}: done in {time.monotonic() - started:.0f}s", file=out, flush=True)
    finally:
        forwarder.close()
    return 0
