"""SLURM submission: render slurm/job.sbatch for a run, submit it with sbatch, and report on runs.

At submit time the config (with its overrides) is resolved and frozen into `run_dir/slurm/config.yaml`
and the job script into `run_dir/slurm/job-<n>.sbatch`; every later requeue of the job trains from that
frozen config and resumes from `run_dir/checkpoints/latest`. Values that reach the script's shell body
are quoted with shlex.quote; values that reach `#SBATCH` lines (which no shell reads) must be plain
tokens, anything else is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ssmforge.errors import ConfigError
from ssmforge.pretrain.config import SlurmConfig
from ssmforge.pretrain.signals import REQUEUE_EXIT_CODE

TEMPLATE = Path(__file__).resolve().parent / "job.sbatch"
TASK_TEMPLATE = Path(__file__).resolve().parent / "task.sbatch"
# what may appear in a #SBATCH line: sbatch splits these itself and no shell quoting applies
_DIRECTIVE_VALUE = re.compile(r"^[A-Za-z0-9_.,:/@+=%-]+$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
log = logging.getLogger(__name__)


# the `ssmforge submit` flag of each SlurmConfig field (the others are --field-name), for errors that
# name what the user typed
_FLAGS = {"signal_seconds_before_end": "--signal-seconds"}


def flag_of(key: str) -> str:
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


@dataclass
class SubmitOptions(SlurmConfig):
    """The job's shape and limits: the config's `slurm` section (SlurmConfig, whose fields these are) with
    the command line's flags applied, plus the job's name, which only the command line sets."""
    job_name: str | None = None

    @classmethod
    def from_config(cls, slurm: SlurmConfig, **flags) -> "SubmitOptions":
        """The config's slurm section with every flag that was given (not None) applied."""
        values = dataclasses.asdict(slurm)
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    def slurm_config(self) -> SlurmConfig:
        """The config section these options amount to, to freeze with the run."""
        return SlurmConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SlurmConfig)})

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def resolve(self) -> str:
        """Fill what the config leaves open from the cluster (CPUs per task, see slurm.resources); returns a
        line saying what was chosen and why."""
        from .resources import cpus_per_task

        self.cpus_per_task, source = cpus_per_task(self.cpus_per_task, self.partition, self.ntasks_per_node)
        gpus = f" and {self.gpus_per_node} GPU{'s' if self.gpus_per_node > 1 else ''}" if self.gpus_per_node else ""
        memory = self.mem if self.mem is not None else ("all of it (--mem=0)" if self.gpus_per_node else
                                                        "the partition's default")
        return (f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.ntasks_per_node} tasks{gpus}; "
                f"{self.cpus_per_task} CPUs per task ({source}); memory per node: {memory}")

    def validate(self) -> None:
        try:
            SlurmConfig.validate(self)
        except ConfigError as e:
            # the config's own checks, reworded to name the flag (a value from the config file was checked,
            # under its key, when the config loaded)
            match = re.match(r"slurm\.(\w+)=(.*)", str(e))
            if not match:
                raise
            raise ConfigError(f"{flag_of(match.group(1))}={match.group(2)} (config key slurm.{match.group(1)})") \
                from None
        if self.signal_seconds_before_end > 65535:
            raise ConfigError(f"--signal-seconds={self.signal_seconds_before_end} is invalid: must be in [0, 65535]")
        seconds = time_limit_seconds(self.time)
        if self.signal_seconds_before_end >= seconds:
            raise ConfigError(f"the signal {self.signal_seconds_before_end} s before the end does not fit in "
                              f"--time={self.time}")
        for key in ("partition", "account", "qos", "job_name"):
            value = getattr(self, key)
            if value is not None and not _DIRECTIVE_VALUE.match(value):
                raise ConfigError(f"{flag_of(key)}={value!r} is invalid: only letters, digits and "
                                  f"_ . , : / @ + = % - may go into an #SBATCH line")


def time_limit_seconds(value: str) -> int:
    """SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS -> seconds."""
    match = _TIME.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"--time={value!r} is invalid: use MM, HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00)")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + m * 60 + s
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds <= 0:
        raise ConfigError(f"--time={value!r} is invalid: must be longer than zero")
    return seconds


def _directive_path(path: Path, what: str) -> str:
    text = str(path)
    if not _DIRECTIVE_VALUE.match(text):
        raise ConfigError(f"{what} {text!r} cannot go into an #SBATCH line (spaces or shell characters): "
                          f"choose a run_dir of letters, digits and _ . / - only")
    return text


def fill(template: Path, **values) -> str:
    """Replace each @@name@@ of the template; a placeholder left without a value is a bug, so it raises."""
    text = re.sub(r"@@(\w+)@@", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                  template.read_text())
    missing = re.findall(r"@@(\w+)@@", text)
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    return text


def _job_name(run_dir: Path, options: SubmitOptions) -> str:
    job_name = options.job_name or f"ssmforge-{run_dir.name}"
    if not _DIRECTIVE_VALUE.match(job_name):
        job_name = "ssmforge-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name)
    return job_name


def _site_directives(options: SubmitOptions) -> list[str]:
    return [f"#SBATCH --{key}={getattr(options, key)}" for key in ("partition", "account", "qos")
            if getattr(options, key)]


def _command_line(python: str | None, subcommand: str) -> str:
    command = [python or sys.executable, "-m", "ssmforge", subcommand]
    return "COMMAND=(" + " ".join(shlex.quote(c) for c in command) + ")"


def render(run_dir: Path, config_path: Path, options: SubmitOptions, workdir: Path | None = None,
           python: str | None = None) -> str:
    """The training job script for a run whose frozen config is config_path."""
    options.validate()
    run_dir, config_path = Path(run_dir).resolve(), Path(config_path).resolve()
    workdir = Path(workdir or Path.cwd()).resolve()
    gpus = options.gpus_per_node > 0
    extra = [f"#SBATCH --gpus-per-node={options.gpus_per_node}"] if gpus else []
    memory = options.mem if options.mem is not None else ("0" if gpus else None)  # 0: all of the node's
    extra += [f"#SBATCH --mem={memory}"] if memory is not None else []
    return fill(TEMPLATE,
        job_name=_job_name(run_dir, options), nodes=options.nodes, tasks_per_node=options.ntasks_per_node,
        cpus_per_task=_cpus(options), time=options.time.strip(),
        log_dir=_directive_path(run_dir / "logs", "the log folder"),
        signal_seconds=options.signal_seconds_before_end, requeue_code=REQUEUE_EXIT_CODE,
        extra_directives="\n".join(extra + _site_directives(options)), run_dir=shlex.quote(str(run_dir)),
        config=shlex.quote(str(config_path)), workdir=shlex.quote(str(workdir)), max_requeues=options.max_requeues,
        max_failures=options.max_failures_without_progress,
        srun_gpus="--gpus-per-task=1 " if gpus and options.bind_gpus else "",
        command_line=_command_line(python, "pretrain") + '\nCOMMAND+=("$CONFIG")')


def _cpus(options: SubmitOptions) -> int:
    if options.cpus_per_task is None:  # not resolved by the caller (which prints why): from the cluster
        options.resolve()
    return options.cpus_per_task


def render_task(run_dir: Path, config_path: Path, options: SubmitOptions, stage: str, arguments: str = "",
                array: int = 1, workdir: Path | None = None, python: str | None = None) -> str:
    """A single-task job script running `ssmforge SUBCOMMAND CONFIG ARGUMENTS` for `stage`: tokenizer and
    prepare on CPUs (prepare as an array of `array` tasks when > 1), evaluate (`ssmforge run --only`) on one
    GPU of a GPU job's kind."""
    options.validate()
    run_dir, config_path = Path(run_dir).resolve(), Path(config_path).resolve()
    workdir = Path(workdir or Path.cwd()).resolve()
    extra = [f"#SBATCH --array=0-{array - 1}"] if array > 1 else []
    if stage == "evaluate" and options.gpus_per_node > 0:
        extra.append("#SBATCH --gpus-per-node=1")
    subcommand = "run" if stage == "evaluate" else "prepare"
    return fill(TASK_TEMPLATE,
        job_name=f"{_job_name(run_dir, options)}-{stage}", cpus_per_task=_cpus(options), time=options.time.strip(),
        log_dir=_directive_path(run_dir / "logs", "the log folder"), log_id="%A_%a" if array > 1 else "%j",
        extra_directives="\n".join(extra + _site_directives(options)), config=shlex.quote(str(config_path)),
        workdir=shlex.quote(str(workdir)), command_line=_command_line(python, subcommand), arguments=arguments)


@dataclass
class Job:
    """One job of a submission: its stage (tokenizer, prepare, pretrain, evaluate) and script; each runs after
    the one before it succeeded (--dependency=afterok)."""
    stage: str
    script: str


EVALUATION_STAGES = ("export", "eval_ppl", "eval_harness", "finetune_glue")


def plan_jobs(config, run_dir: Path, config_path: Path, options: SubmitOptions, prepare_parts: int = 1) -> list[Job]:
    """The jobs of the config's stages (stages.run): preparation jobs when the shards are missing and too large
    for the training job to prepare (data_pipeline.pack.needs_preparation_job), the training job, and one job
    for the evaluation stages (`ssmforge run --only ...`) after it."""
    from ssmforge.data_pipeline.pack import needs_preparation_job
    from ssmforge.data_pipeline.parts import check_splittable

    if prepare_parts < 1:
        raise ConfigError(f"--prepare-parts={prepare_parts} is invalid: must be a positive integer")
    stages, jobs = list(config.stages.run), []
    if "prepare" in stages and needs_preparation_job(config):
        if prepare_parts > 1:
            check_splittable(config, prepare_parts, f"--prepare-parts={prepare_parts}: ")
            if config.tokenizer.kind == "sentencepiece" and not config.tokenizer.path:
                jobs.append(Job("tokenizer", render_task(run_dir, config_path, options, "tokenizer",
                                                         " --train-tokenizer")))
        arguments = f' --parts {prepare_parts} --part "$SLURM_ARRAY_TASK_ID"' if prepare_parts > 1 else ""
        jobs.append(Job("prepare", render_task(run_dir, config_path, options, "prepare", arguments, prepare_parts)))
    elif prepare_parts > 1:
        log.info("the shards of %s are there or small enough for the training job: --prepare-parts ignored",
                 config.data.shard_dir)
    if "pretrain" in stages:
        jobs.append(Job("pretrain", render(run_dir, config_path, options)))
    evaluation = [stage for stage in stages if stage in EVALUATION_STAGES]
    if evaluation:
        jobs.append(Job("evaluate", render_task(run_dir, config_path, options, "evaluate",
                                                f" --only {','.join(evaluation)}")))
    if not jobs:
        raise ConfigError(f"stages.run={stages}: nothing to submit (the shards are prepared and no other stage "
                          f"is listed)")
    return jobs


def freeze_config(config_path: str, overrides: list[str], options: SubmitOptions):
    """(config, run_dir, frozen path): the config with run_dir made absolute and the job's shape recorded, and
    where write_frozen puts it (run_dir/slurm/config.yaml), which every job of the run reads."""
    from ssmforge.pretrain.config import load_config_for_jobs

    config = load_config_for_jobs(config_path, overrides)
    config.slurm = options.slurm_config()  # the frozen config records the job's shape, flags included
    run_dir = Path(config.run_dir)
    return config, run_dir, run_dir / "slurm" / "config.yaml"


def write_frozen(config, frozen: Path) -> None:
    """Write the frozen config, and the log folder the scripts name."""
    from ssmforge.pretrain.config import to_yaml

    frozen.parent.mkdir(parents=True, exist_ok=True)
    (Path(config.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    frozen.write_text(to_yaml(config))


def prepare_job(config_path: str, overrides: list[str], options: SubmitOptions) -> tuple[Path, Path, str]:
    """Resolve and freeze the config, and render the training job's script: (run_dir, frozen config, script)."""
    config, run_dir, frozen = freeze_config(config_path, overrides, options)
    script = render(run_dir, frozen, options)  # a refused script writes nothing
    write_frozen(config, frozen)
    return run_dir, frozen, script


def submit(config_path: str, overrides: list[str], options: SubmitOptions, dry_run: bool = False,
           prepare_parts: int = 1) -> list[tuple[str, str]]:
    """Render and submit the run's jobs (plan_jobs), each after the one before it succeeded; return
    (stage, job id) per job, or with dry_run (stage, script) and nothing submitted (the frozen config and the
    log folder the scripts name are written, so that they can be submitted by hand)."""
    config, run_dir, frozen = freeze_config(config_path, overrides, options)
    jobs = plan_jobs(config, run_dir, frozen, options, prepare_parts)  # every script renders before any is sent
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise ConfigError("sbatch not found on PATH: submit from a SLURM login node, or use --dry-run to print "
                          "the job scripts")
    write_frozen(config, frozen)  # a dry run's scripts can be submitted by hand
    if dry_run:
        return [(job.stage, job.script) for job in jobs]
    jobs_dir = run_dir / "slurm"
    submitted = []
    for job in jobs:
        n = len(list(jobs_dir.glob("job-*.sbatch"))) + 1
        script_path = jobs_dir / f"job-{n}.sbatch"
        script_path.write_text(job.script)
        dependency = [f"--dependency=afterok:{submitted[-1][1]}", "--kill-on-invalid-dep=yes"] if submitted else []
        proc = subprocess.run([sbatch, "--parsable", *dependency, str(script_path)], capture_output=True, text=True,
                              cwd=Path.cwd())
        if proc.returncode != 0:
            message = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
            sent = "; ".join(f"{stage} job {job_id}" for stage, job_id in submitted)
            raise ConfigError(f"sbatch refused the {job.stage} job: {message}"
                              + (f" (already submitted: {sent}; scancel them before submitting again)" if sent else ""))
        job_id = proc.stdout.strip().split(";")[0]
        with open(jobs_dir / "jobs.jsonl", "a") as f:
            f.write(json.dumps({"job_id": job_id, "stage": job.stage, "script": str(script_path),
                                "submitted": time.time()}) + "\n")
        submitted.append((job.stage, job_id))
    return submitted


@dataclass
class RunStatus:
    run_dir: Path
    job_id: str | None
    state: str
    restarts: int | None
    last_step: int | None
    last_checkpoint: str | None
    stopped: str | None = None
    """Why the job script stopped the job for good (a crash loop, the requeue limit), when it did."""


def _job_state(job_id: str) -> tuple[str, int | None]:
    """(state, restarts) from scontrol, then sacct; ('UNKNOWN', None) when SLURM no longer knows the job."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        if "JobState" in fields:
            return fields["JobState"], int(fields.get("Restarts", "0"))
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0], None
    except (OSError, subprocess.SubprocessError):
        pass
    return "UNKNOWN", None


def run_status(run_dir: str | Path) -> RunStatus:
    """Job id, SLURM state, requeue count, last logged step and last checkpoint of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    jobs = run_dir / "slurm" / "jobs.jsonl"
    job_id = None
    if jobs.is_file():
        lines = [json.loads(line) for line in jobs.read_text().splitlines() if line.strip()]
        training = [line for line in lines if line.get("stage", "pretrain") == "pretrain"]
        job_id = (training or lines)[-1]["job_id"] if lines else None  # the training job: the run's state
    state, restarts = _job_state(job_id) if job_id else ("NOT SUBMITTED", None)
    last_step = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written
            if record.get("kind") == "train":
                last_step = record.get("step")
    latest = run_dir / "checkpoints" / "latest"
    last_checkpoint = latest.read_text().strip() if latest.is_file() else None
    stopped_file = run_dir / "slurm" / f"stopped-{job_id}"
    stopped = stopped_file.read_text().strip() if job_id and stopped_file.is_file() else None
    return RunStatus(run_dir, job_id, state, restarts, last_step, last_checkpoint, stopped)


def format_status(statuses: list[RunStatus]) -> str:
    rows = [("RUN", "JOB", "STATE", "RESTARTS", "STEP", "CHECKPOINT")]
    for s in statuses:
        rows.append((str(s.run_dir), s.job_id or "-", s.state, "-" if s.restarts is None else str(s.restarts),
                     "-" if s.last_step is None else str(s.last_step), s.last_checkpoint or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines + [f"{s.run_dir}: stopped: {s.stopped}" for s in statuses if s.stopped])
