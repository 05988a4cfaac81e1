"""The run config: one typed, strict omegaconf structure read by every stage.

`load_config(path, overrides)` merges a YAML file and `a.b=c` overrides onto the dataclasses below.
Unknown keys, wrong types and impossible values raise ConfigError naming the key; a `variables`
block holds shared values that other keys interpolate as `${variables.name}`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssmforge.models.config import ModelConfig
from ssmforge.errors import ConfigError


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class SourceConfig:
    """One text source of the training mixture."""

    kind: str = "synthetic"  # synthetic | hub | local
    name: str | None = None  # hub dataset name (e.g. "wikitext") or a label for local files
    subset: str | None = None  # hub config name (e.g. "wikitext-103-raw-v1")
    split: str = "train"
    paths: list[str] = field(default_factory=list)  # local files or globs (jsonl, parquet, txt)
    text_field: str = "text"
    weight: float = 1.0  # mixing weight relative to the other sources
    max_documents: int | None = None  # stop this source after so many documents (None: all of it)
    streaming: bool = True  # hub sources: stream instead of downloading the whole dataset first

    def validate(self, key: str) -> None:
        _need(self.kind in ("synthetic", "hub", "local"), f"{key}.kind", self.kind, "one of synthetic, hub, local")
        _need(self.weight > 0, f"{key}.weight", self.weight, "must be > 0")
        _need(self.kind != "hub" or bool(self.name), f"{key}.name", self.name, "a hub source needs a dataset name")
        _need(self.kind != "local" or bool(self.paths), f"{key}.paths", self.paths, "a local source needs paths")
        _need(self.kind != "synthetic" or self.max_documents is not None, f"{key}.max_documents",
              self.max_documents, "a synthetic source needs a document count")
        _need(self.max_documents is None or self.max_documents >= 1, f"{key}.max_documents", self.max_documents,
              "must be a positive integer or null")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(max_documents=20000)])
    shard_dir: str = "${run_dir}/data"  # MDS shards and manifest: a local folder, or a remote URL (s3://...)
    cache_dir: str = "${run_dir}/data_cache"  # local copy of remote shards
    seq_len: int = 512
    val_fraction: float = 0.01  # share of documents held out for validation
    invalid_utf8: str = "fail"  # fail | skip (skipped documents are counted in the manifest)
    num_workers: int = 2  # loader worker processes per rank
    tokenize_workers: int = 0  # processes for tokenizing in prepare; 0: one per core

    def validate(self) -> None:
        _need(len(self.sources) > 0, "data.sources", self.sources, "needs at least one source")
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources.{i}")
        _need(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be a positive integer")
        _need(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        _need(self.invalid_utf8 in ("fail", "skip"), "data.invalid_utf8", self.invalid_utf8, "one of fail, skip")
        _need(self.tokenize_workers >= 0, "data.tokenize_workers", self.tokenize_workers, "must be >= 0")
        _need(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | sentencepiece | hf
    path: str | None = None  # an existing tokenizer file; sentencepiece without a path is trained
    vocab_size: int = 8192  # for training a sentencepiece model
    model_type: str = "bpe"  # bpe | unigram
    train_documents: int = 20000  # documents from the start of the mixture used to train it

    def validate(self) -> None:
        _need(self.kind in ("byte", "sentencepiece", "hf"), "tokenizer.kind", self.kind,
              "one of byte, sentencepiece, hf")
        _need(self.kind != "hf" or bool(self.path), "tokenizer.path", self.path, "kind hf needs a tokenizer.json path")
        _need(self.vocab_size >= 16, "tokenizer.vocab_size", self.vocab_size, "must be >= 16")
        _need(self.model_type in ("bpe", "unigram"), "tokenizer.model_type", self.model_type, "one of bpe, unigram")
        _need(self.train_documents >= 1, "tokenizer.train_documents", self.train_documents, "must be >= 1")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    activation_checkpointing: bool = False
    nonfinite_loss: str = "stop"  # stop (name the step and the last good checkpoint) | skip (drop that batch)
    eval_batches: int = 0  # validation batches per rank per evaluation; 0: the whole validation split
    stop_at_step: int | None = None  # checkpoint and exit with the requeue code at this step (chunked jobs)
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int = 2
    collective_timeout_s: int = 600  # a hung rank fails the others' collectives after this long (a dead one at once)

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "eval_every",
                    "save_every", "keep_checkpoints"):
            value = getattr(self, key)
            _need(value >= 1, f"train.{key}", value, "must be a positive integer")
        _need(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _need(self.collective_timeout_s >= 10, "train.collective_timeout_s", self.collective_timeout_s,
              "must be at least 10 seconds")
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _need(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _need(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", self.betas,
              "must be two numbers in [0, 1)")
        _need(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _need(self.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision", self.precision,
              "one of auto, bf16, fp16, fp32")
        _need(self.nonfinite_loss in ("stop", "skip"), "train.nonfinite_loss", self.nonfinite_loss, "one of stop, skip")
        _need(self.eval_batches >= 0, "train.eval_batches", self.eval_batches, "must be >= 0")
        _need(self.stop_at_step is None or self.stop_at_step >= 1, "train.stop_at_step", self.stop_at_step,
              "must be a positive integer or null")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False
    # ZeRO-3 keeps parameters of at most this many elements whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold); 0 partitions every parameter
    param_persistence_threshold: int = 100_000

    def validate(self) -> None:
        _need(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _need(self.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
              self.param_persistence_threshold, "must be >= 0")


@dataclass
class EvalConfig:
    dataset: str = "wikitext-103"  # wikitext-103 | wikitext-2 | a local file or glob
    max_length: int | None = None  # window; None uses data.seq_len
    stride: int | None = None  # None: non-overlapping windows
    batch_size: int = 8

    def validate(self) -> None:
        _need(self.max_length is None or self.max_length >= 1, "eval.max_length", self.max_length, "must be >= 1")
        _need(self.stride is None or self.stride >= 1, "eval.stride", self.stride, "must be >= 1")
        _need(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


@dataclass
class GlueConfig:
    tasks: list[str] = field(default_factory=lambda: list(GLUE_TASKS))
    data_dir: str | None = None  # local GLUE TSV folder; None reads from the hub
    max_length: int = 128
    lr: float = 3e-5
    batch_size: int = 32
    epochs: int = 3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 42

    def validate(self) -> None:
        for task in self.tasks:
            _need(task in GLUE_TASKS, "glue.tasks", task, f"each one of {', '.join(GLUE_TASKS)}")
        for key in ("max_length", "batch_size", "epochs"):
            _need(getattr(self, key) >= 1, f"glue.{key}", getattr(self, key), "must be a positive integer")
        _need(self.lr > 0, "glue.lr", self.lr, "must be > 0")
        _need(0 <= self.warmup_ratio < 1, "glue.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _need(self.weight_decay >= 0, "glue.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU job (no GPU request)
    tasks_per_node: int | None = None  # default: one task per GPU (1 without GPUs)
    cpus_per_task: int = 8
    signal_seconds_before_end: int = 120
    max_requeues: int = 20

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task"):
            _need(getattr(self, key) >= 1, f"slurm.{key}", getattr(self, key), "must be a positive integer")
        _need(self.gpus_per_node >= 0, "slurm.gpus_per_node", self.gpus_per_node, "must be >= 0 (0: a CPU job)")
        _need(self.tasks_per_node is None or self.tasks_per_node >= 1, "slurm.tasks_per_node", self.tasks_per_node,
              "must be a positive integer or null")
        _need(self.gpus_per_node == 0 or self.tasks_per_node in (None, self.gpus_per_node), "slurm.tasks_per_node",
              self.tasks_per_node, "must equal gpus_per_node (one task per GPU)")
        _need(self.signal_seconds_before_end >= 0, "slurm.signal_seconds_before_end",
              self.signal_seconds_before_end, "must be >= 0")
        _need(self.max_requeues >= 0, "slurm.max_requeues", self.max_requeues, "must be >= 0")


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "ssmforge"
    entity: str | None = None
    run_name: str | None = None

    def validate(self) -> None:
        _need(self.mode in ("online", "offline", "disabled"), "wandb.mode", self.mode,
              "one of online, offline, disabled")


@dataclass
class RunConfig:
    run_dir: str = MISSING
    seed: int = 1234
    variables: dict[str, Any] = field(default_factory=dict)  # shared values: ${variables.name}
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    glue: GlueConfig = field(default_factory=GlueConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> "RunConfig":
        _need(bool(self.run_dir), "run_dir", self.run_dir, "must be a non-empty path")
        self.model.validate("model")
        for section in (self.data, self.tokenizer, self.train, self.deepspeed, self.eval, self.glue,
                        self.slurm, self.wandb):
            section.validate()
        return self


def _describe(error: OmegaConfBaseException) -> str:
    """omegaconf's multi-line message -> one line naming the key."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0].strip()
    return f"{key}: {message}" if key and key not in message else message


def _apply_override(config, item: str) -> None:
    """Apply one `a.b=value` (list items as `a.0.b`); the value is parsed as omegaconf parses dotlists."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is invalid: expected key.sub=value")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {key} has a value that is not valid YAML "
                          f"({str(e).splitlines()[0]})") from None
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key, throw_on_missing=True) if parent_key else config
    if parent is None or not OmegaConf.is_config(parent):
        raise ConfigError(f"override {item!r}: '{parent_key}' is not a config section")
    if OmegaConf.is_list(parent) and (not leaf.isdigit() or int(leaf) >= len(parent)):
        raise ConfigError(f"override {item!r}: '{parent_key}' has {len(parent)} items, no index {leaf!r}")
    OmegaConf.update(config, key, value, merge=True)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (or only the defaults when path is None), apply `key=value` overrides,
    resolve interpolations and validate. Raises ConfigError with the file and key on any problem."""
    where = str(path) if path is not None else "defaults"
    layers = [OmegaConf.structured(RunConfig)]
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
        layers.append(OmegaConf.create(data or {}))
    try:
        merged = OmegaConf.merge(*layers)
        for item in overrides:
            _apply_override(merged, item)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None
    try:
        return config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, to freeze into the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(config)))
