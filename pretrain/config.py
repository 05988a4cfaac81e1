"""The run config: one typed, strict omegaconf structure read by every stage.

`load_config(path, overrides)` merges a YAML file and `a.b=c` overrides onto the dataclasses below.
Unknown keys, wrong types and impossible values raise ConfigError naming the key; a `variables`
block holds shared values that other keys interpolate as `${variables.name}`. Every field carries a
docstring on the line below it: the one place a key is documented, printed by `ssmforge config show`.
Importing this module loads no torch, so config errors come back at once.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssmforge.models.config import ModelConfig, renamed_model_key_message, upgrade_flat_model_dict
from ssmforge.errors import ConfigError


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class SourceConfig:
    """One text source of the training mixture."""

    kind: str = "synthetic"
    """synthetic (the embedded corpus) | hub (Hugging Face datasets) | local (files)."""
    name: str | None = None
    """Hub dataset name (e.g. "wikitext") or a label for local files."""
    subset: str | None = None
    """Hub config name (e.g. "wikitext-103-raw-v1")."""
    split: str = "train"
    """Hub split to read (train, validation, test)."""
    paths: list[str] = field(default_factory=list)
    """Local files or globs (jsonl, parquet, txt)."""
    text_field: str = "text"
    """Column or JSON key holding the document text."""
    weight: float = 1.0
    """Mixing weight relative to the other sources."""
    max_documents: int | None = None
    """Stop this source after so many documents (null: all of it)."""
    max_tokens: int | None = None
    """Stop this source after the document that brings its tokens (the run's tokenizer, EOS included) to this many."""
    streaming: bool = True
    """Hub sources: stream instead of downloading the whole dataset first."""

    def validate(self, key: str) -> None:
        _need(self.kind in ("synthetic", "hub", "local"), f"{key}.kind", self.kind, "one of synthetic, hub, local")
        _need(self.weight > 0, f"{key}.weight", self.weight, "must be > 0")
        _need(self.kind != "hub" or bool(self.name), f"{key}.name", self.name, "a hub source needs a dataset name")
        _need(self.kind != "local" or bool(self.paths), f"{key}.paths", self.paths, "a local source needs paths")
        _need(self.kind != "synthetic" or self.max_documents is not None or self.max_tokens is not None,
              f"{key}.max_documents", self.max_documents, "a synthetic source needs a document count or max_tokens")
        for name in ("max_documents", "max_tokens"):
            value = getattr(self, name)
            _need(value is None or (type(value) is int and value >= 1), f"{key}.{name}", value,
                  "must be a positive integer or null")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is packed and read."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(max_documents=20000)])
    """The training mixture: one entry per source (see data.sources.N.*)."""
    shard_dir: str = "${run_dir}/data"
    """MDS shards and manifest: a local folder, or a remote URL (s3://...)."""
    cache_dir: str = "${run_dir}/data_cache"
    """Local copy of remote shards."""
    seq_len: int = 512
    """Tokens per training sequence (samples hold seq_len + 1 for the shifted targets)."""
    val_fraction: float = 0.01
    """Share of documents held out for validation."""
    invalid_utf8: str = "fail"
    """What a document that is not valid UTF-8 does: fail | skip (skipped ones are counted in the manifest)."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    tokenize_workers: int = 0
    """Processes for tokenizing (and compressing shards) in prepare; 0: one per core this job may use."""
    document_boundaries: str = "flow"
    """What a packed row's documents (joined by EOS) see of each other: flow (the state, conv window and
    attention run on across the EOS, as the Mamba paper trained) | reset (each document starts from a zero
    state with no conv tap or attention across the boundary, as if it ran alone; see the README)."""

    def validate(self) -> None:
        _need(len(self.sources) > 0, "data.sources", self.sources, "needs at least one source")
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources.{i}")
        _need(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be a positive integer")
        _need(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in [0, 1)")
        _need(self.invalid_utf8 in ("fail", "skip"), "data.invalid_utf8", self.invalid_utf8, "one of fail, skip")
        _need(self.tokenize_workers >= 0, "data.tokenize_workers", self.tokenize_workers, "must be >= 0")
        _need(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _need(self.document_boundaries in ("flow", "reset"), "data.document_boundaries", self.document_boundaries,
              "one of flow, reset")


@dataclass
class TokenizerConfig:
    """The tokenizer: the byte tokenizer, a SentencePiece model to train or load, or an HF tokenizer.json."""

    kind: str = "byte"
    """byte (256 bytes + specials) | sentencepiece | hf (a tokenizer.json)."""
    path: str | None = None
    """An existing tokenizer file; sentencepiece without a path is trained."""
    vocab_size: int = 8192
    """Vocabulary size when a sentencepiece model is trained."""
    model_type: str = "bpe"
    """SentencePiece algorithm when one is trained: bpe | unigram."""
    train_documents: int = 20000
    """Documents from the start of the mixture used to train the tokenizer."""
    allow_lossy: bool = False
    """Prepare data with a tokenizer file whose decode(encode(text)) differs from the text (e.g. NFKC)."""

    def validate(self) -> None:
        _need(self.kind in ("byte", "sentencepiece", "hf"), "tokenizer.kind", self.kind,
              "one of byte, sentencepiece, hf")
        _need(self.kind != "hf" or bool(self.path), "tokenizer.path", self.path, "kind hf needs a tokenizer.json path")
        _need(self.vocab_size >= 16, "tokenizer.vocab_size", self.vocab_size, "must be >= 16")
        _need(self.model_type in ("bpe", "unigram"), "tokenizer.model_type", self.model_type, "one of bpe, unigram")
        _need(self.train_documents >= 1, "tokenizer.train_documents", self.train_documents, "must be >= 1")
        _need(isinstance(self.allow_lossy, bool), "tokenizer.allow_lossy", self.allow_lossy, "must be true or false")


@dataclass
class TrainConfig:
    """The optimisation and the run's rhythm: steps, batch, schedule, precision, logging, checkpoints."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (a resumed run stops at the same step)."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; accumulation is derived: global / (micro_batch_size x ranks)."""
    grad_accum_steps: int | None = None
    """Micro-steps per optimizer step when global_batch_size is null (null: 1); set one of the two, not both."""
    num_canonical_nodes: int = 1
    """Streaming's canonical nodes: fixes the sample order on any node count that divides it or that it divides."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases, A_log, D, dt bias)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, else fp32) | bf16 | fp32. Weights stay fp32; bf16 is the autocast dtype."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """Compile the model's forward and backward with torch.compile (the kernels are custom ops it traces
    whole); the first steps then take the compilation time."""
    deterministic: bool = False
    """Bitwise-reproducible GPU backwards of the Triton scan and SSD (per-program partials summed in a fixed
    order instead of atomics), at the cost of a transient buffer per B and C; the CPU kernels always are."""
    nonfinite_loss: str = "stop"
    """On a non-finite loss: stop (name the step and the last good checkpoint) | skip (drop that batch)."""
    eval_batches: int = 0
    """Validation batches per data-parallel rank per evaluation; 0: the whole validation split."""
    stop_at_step: int | None = None
    """Checkpoint and exit with the requeue code at this step (chunked jobs); null: never."""
    log_every: int = 10
    """Write a train record (loss, lr, tokens/s, MFU, memory) every so many steps."""
    eval_every: int = 200
    """Compute the validation loss every so many steps (and at the end)."""
    save_every: int = 200
    """Save a checkpoint every so many steps (and at the end and on a stop signal)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted after a save succeeds."""
    collective_timeout_s: int = 600
    """Seconds after which a hung rank fails the others' collectives and their waits for a batch (a dead one
    fails them at once)."""
    context_parallel: int = 1
    """Ranks that share every sequence, each running the model on 1/K of it and passing SSM states (context
    parallelism, models.context_parallel): K consecutive ranks of a node form a group that reads the same samples;
    data-parallel ranks = ranks / K, and ZeRO shards over all ranks. data.seq_len must divide by K."""

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_size", "log_every", "eval_every", "save_every", "keep_checkpoints",
                    "num_canonical_nodes"):
            value = getattr(self, key)
            _need(value >= 1, f"train.{key}", value, "must be a positive integer")
        for key in ("global_batch_size", "grad_accum_steps"):
            value = getattr(self, key)
            _need(value is None or value >= 1, f"train.{key}", value, "must be a positive integer or null")
        _need(self.global_batch_size is None or self.grad_accum_steps is None, "train.grad_accum_steps",
              self.grad_accum_steps, f"set it or train.global_batch_size={self.global_batch_size}, not both "
              f"(accumulation is derived from the global batch)")
        _need(self.global_batch_size is None or self.global_batch_size % self.micro_batch_size == 0,
              "train.global_batch_size", self.global_batch_size,
              f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        _need(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _need(self.collective_timeout_s >= 10, "train.collective_timeout_s", self.collective_timeout_s,
              "must be at least 10 seconds")
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _need(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _need(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", self.betas,
              "must be two numbers in [0, 1)")
        _need(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _need(self.precision in ("auto", "bf16", "fp32"), "train.precision", self.precision,
              "one of auto, bf16, fp32 (fp16 is refused: without loss scaling its small gradients underflow to "
              "zero; on GPUs without bf16, such as V100 and T4, use fp32)")
        _need(isinstance(self.compile, bool), "train.compile", self.compile, "must be true or false")
        _need(self.nonfinite_loss in ("stop", "skip"), "train.nonfinite_loss", self.nonfinite_loss, "one of stop, skip")
        _need(self.eval_batches >= 0, "train.eval_batches", self.eval_batches, "must be >= 0")
        _need(self.stop_at_step is None or self.stop_at_step >= 1, "train.stop_at_step", self.stop_at_step,
              "must be a positive integer or null")
        _need(isinstance(self.context_parallel, int) and self.context_parallel >= 1, "train.context_parallel",
              self.context_parallel, "must be a positive integer (1: every rank holds whole sequences)")

    def data_parallel_ranks(self, ranks: int) -> int:
        """Ranks that read different samples: ranks / context_parallel. Raises ConfigError when K does not
        divide the rank count."""
        if ranks % self.context_parallel:
            raise ConfigError(f"train.context_parallel={self.context_parallel} does not divide the {ranks} ranks: "
                              f"run on a multiple of {self.context_parallel} ranks")
        return ranks // self.context_parallel

    def accumulation_steps(self, ranks: int) -> int:
        """Micro-steps per optimizer step on `ranks` ranks: global_batch_size / (micro_batch_size x data-parallel
        ranks), or grad_accum_steps (1 when null) without a global batch. Raises ConfigError, one line naming
        the three numbers, when the global batch does not divide."""
        ranks = self.data_parallel_ranks(ranks)
        if self.global_batch_size is None:
            return self.grad_accum_steps or 1
        per_step = self.micro_batch_size * ranks
        if self.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={self.micro_batch_size} x {ranks} data-parallel ranks "
                              f"(= {per_step}): change the micro-batch or the number of ranks")
        return self.global_batch_size // per_step

    def sequences_per_step(self, ranks: int) -> int:
        """Sequences per optimizer step over all ranks (global_batch_size when set)."""
        return self.micro_batch_size * self.accumulation_steps(ranks) * self.data_parallel_ranks(ranks)

    def check_layout(self, ranks: int, nodes: int, canonical_nodes: int | None = None) -> None:
        """Refuse, with one line, a global batch these ranks cannot split evenly, and a node count over which
        streaming cannot spread its canonical nodes (one must divide the other for the sample order to hold);
        `canonical_nodes` is a checkpoint's value when it differs from the config's."""
        self.accumulation_steps(ranks)
        per_node, k = ranks // nodes, self.context_parallel
        if per_node % k:
            raise ConfigError(f"train.context_parallel={k} with {per_node} ranks per node: a context group must lie "
                              f"within a node, so K must divide the ranks per node")
        # streaming partitions over the data-parallel ranks: with K > 1 it counts ranks / K of them, spread
        # over as many whole nodes of `per_node` ranks as they fill (one when they fill none)
        seen = nodes if k == 1 else ((ranks // k) // per_node if (ranks // k) % per_node == 0 else 1)
        canonical = canonical_nodes or self.num_canonical_nodes
        if seen % canonical and canonical % seen:
            whose = " (the checkpoint's)" if canonical_nodes else ""
            counted = "" if k == 1 else f" ({seen} as streaming counts them with train.context_parallel={k})"
            raise ConfigError(f"train.num_canonical_nodes={canonical}{whose} and {nodes} nodes{counted}: one must "
                              f"divide the other for the data order to stay the same; run on a node count that does")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed's ZeRO sharding and offload."""

    zero_stage: int = 1
    """ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer states and the update on the CPU (ZeRO-Offload)."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters of at most this many elements whole on every rank; 0 partitions every parameter."""
    communication_dtype: str = "fp32"
    """Dtype of the gradient reductions: fp32 (exact to fp32 at any rank count) | bf16 (half the traffic, for
    bf16 runs; each hop of the reduction rounds to 8 bits of mantissa, see the README's precision section)."""

    def validate(self) -> None:
        _need(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _need(self.communication_dtype in ("fp32", "bf16"), "deepspeed.communication_dtype",
              self.communication_dtype, "one of fp32, bf16")
        _need(self.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
              self.param_persistence_threshold, "must be >= 0")


@dataclass
class EvalConfig:
    """Defaults of `ssmforge eval-ppl` for this run."""

    dataset: str = "wikitext-103"
    """eval-ppl's dataset: wikitext-103 | wikitext-2 | synthetic-heldout (unseen documents of the run's synthetic
    source, scored against their entropy floor) | a local file or glob."""
    max_length: int | None = None
    """Window in tokens; null: data.seq_len."""
    stride: int | None = None
    """Tokens scored per window; null: non-overlapping windows."""
    batch_size: int = 8
    """Windows per forward pass in eval-ppl."""

    def validate(self) -> None:
        _need(self.max_length is None or self.max_length >= 1, "eval.max_length", self.max_length, "must be >= 1")
        _need(self.stride is None or self.stride >= 1, "eval.stride", self.stride, "must be >= 1")
        _need(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


@dataclass
class GlueConfig:
    """Defaults of `ssmforge finetune-glue` for this run."""

    tasks: list[str] = field(default_factory=lambda: list(GLUE_TASKS))
    """GLUE tasks that finetune-glue runs when no --task is given."""
    data_dir: str | None = None
    """Local GLUE TSV folder; null: read from the hub."""
    max_length: int = 128
    """Tokens per example; the longer sentence of a pair is cut first."""
    lr: float = 3e-5
    """Peak learning rate of the fine-tune."""
    batch_size: int = 32
    """Examples per optimizer step over all ranks."""
    epochs: int = 3
    """Passes over each task's training set; the best dev epoch is kept."""
    warmup_ratio: float = 0.06
    """Share of the fine-tune's steps spent in linear warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay of the fine-tune."""
    seed: int = 42
    """Seed of the head's initialisation and the data order."""

    def validate(self) -> None:
        for task in self.tasks:
            _need(task in GLUE_TASKS, "glue.tasks", task, f"each one of {', '.join(GLUE_TASKS)}")
        for key in ("max_length", "batch_size", "epochs"):
            _need(getattr(self, key) >= 1, f"glue.{key}", getattr(self, key), "must be a positive integer")
        _need(self.lr > 0, "glue.lr", self.lr, "must be > 0")
        _need(0 <= self.warmup_ratio < 1, "glue.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _need(self.weight_decay >= 0, "glue.weight_decay", self.weight_decay, "must be >= 0")


HARNESS_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
"""The Mamba paper's zero-shot suite (Gu & Dao 2023, Table 3), as lm-evaluation-harness names its tasks."""


@dataclass
class HarnessConfig:
    """Defaults of `ssmforge eval-harness` (lm-evaluation-harness) for this run."""

    tasks: list[str] = field(default_factory=lambda: list(HARNESS_TASKS))
    """lm-evaluation-harness tasks; the default is the Mamba paper's zero-shot suite."""
    num_fewshot: int = 0
    """Examples put before each question (0: zero-shot, as the Mamba paper)."""
    batch_size: int = 16
    """Requests per forward pass."""
    limit: int | None = None
    """Documents per task (a quick look); null: all of them."""
    max_length: int | None = None
    """The context the harness's windows and truncation use; null: data.seq_len."""
    data_dir: str | None = None
    """Folder of the tasks' data written by `ssmforge eval-harness --save-data` (offline clusters); null: the hub."""
    include_path: str | None = None
    """Folder of extra task YAMLs (lm-evaluation-harness's --include_path); null: none."""

    def validate(self) -> None:
        _need(bool(self.tasks), "harness.tasks", self.tasks, "a non-empty list of lm-evaluation-harness tasks")
        _need(self.num_fewshot >= 0, "harness.num_fewshot", self.num_fewshot, "must be >= 0")
        _need(self.batch_size >= 1, "harness.batch_size", self.batch_size, "must be >= 1")
        _need(self.limit is None or self.limit >= 1, "harness.limit", self.limit, "must be >= 1 or null")
        _need(self.max_length is None or self.max_length >= 1, "harness.max_length", self.max_length, "must be >= 1")


@dataclass
class SlurmConfig:
    """The job `ssmforge submit` writes (its command-line flags override these)."""

    partition: str | None = None
    """SLURM partition (--partition); null: the cluster's default."""
    account: str | None = None
    """SLURM account to charge (--account); null: the user's default."""
    qos: str | None = None
    """SLURM quality of service (--qos); null: the default."""
    time: str = "24:00:00"
    """Time limit of each job, HH:MM:SS or D-HH:MM:SS; the run requeues itself at the limit."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 8
    """GPUs per node, one rank each; 0: a CPU job (no GPU request)."""
    tasks_per_node: int | None = None
    """Ranks per node of a CPU job; null: one per GPU (1 without GPUs)."""
    cpus_per_task: int | None = None
    """CPUs per rank (OMP threads and loader workers share them); null: the partition's CPUs per node (sinfo)
    divided by the ranks per node."""
    mem: str | None = None
    """Memory per node (--mem, e.g. 480G); null: the whole node's (--mem=0) for GPU jobs, the partition's
    default for CPU jobs."""
    gpu: str | None = None
    """The GPU model of the nodes (e.g. H100, A100 80GB): `ssmforge submit` plans the run on it first and
    refuses a config that cannot fit; null: no plan check (unless --gpu is given)."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GiB, for GPUs whose memory the planner's table lacks; null: from slurm.gpu."""
    bind_gpus: bool = True
    """Bind one GPU to each rank (srun --gpus-per-task=1); false: every rank sees the node's GPUs and takes
    the one of its local rank (for sites whose per-task device limits would block NVLink between ranks)."""
    signal_seconds_before_end: int = 120
    """SLURM sends USR1 this many seconds before the limit: the run checkpoints and requeues."""
    max_requeues: int = 20
    """Requeues after which a job gives up instead of restarting."""
    max_failures_without_progress: int = 3
    """A failed training step (a lost rank or node, a crash) is requeued and resumes from the latest
    checkpoint, unless it failed this many times in a row from the same checkpoint: a crash loop, which ends
    the job with a line saying so. A usage or config error (exit code 2) is never requeued."""

    def validate(self) -> None:
        _need(self.nodes >= 1, "slurm.nodes", self.nodes, "must be a positive integer")
        _need(self.cpus_per_task is None or self.cpus_per_task >= 1, "slurm.cpus_per_task", self.cpus_per_task,
              "must be a positive integer or null")
        _need(self.mem is None or re.fullmatch(r"\d+[KMGT]?", str(self.mem)) is not None, "slurm.mem", self.mem,
              "a size such as 480G or 0 (the whole node), or null")
        _need(self.gpus_per_node >= 0, "slurm.gpus_per_node", self.gpus_per_node, "must be >= 0 (0: a CPU job)")
        _need(self.tasks_per_node is None or self.tasks_per_node >= 1, "slurm.tasks_per_node", self.tasks_per_node,
              "must be a positive integer or null")
        _need(self.gpus_per_node == 0 or self.tasks_per_node in (None, self.gpus_per_node), "slurm.tasks_per_node",
              self.tasks_per_node, f"must equal gpus_per_node ({self.gpus_per_node}): one task per GPU")
        _need(self.signal_seconds_before_end >= 0, "slurm.signal_seconds_before_end",
              self.signal_seconds_before_end, "must be >= 0")
        _need(self.max_requeues >= 0, "slurm.max_requeues", self.max_requeues, "must be >= 0")
        _need(self.max_failures_without_progress >= 1, "slurm.max_failures_without_progress",
              self.max_failures_without_progress, "must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging (offline runs sync later with `wandb sync`)."""

    mode: str = "offline"
    """online | offline (sync later with `wandb sync`) | disabled."""
    project: str = "ssmforge"
    """wandb project name."""
    entity: str | None = None
    """wandb team or user; null: the logged-in user's default."""
    run_name: str | None = None
    """wandb run name; null: wandb picks one."""

    def validate(self) -> None:
        _need(self.mode in ("online", "offline", "disabled"), "wandb.mode", self.mode,
              "one of online, offline, disabled")


STAGES = ("prepare", "pretrain", "export", "eval_ppl", "eval_harness", "finetune_glue")


@dataclass
class StagesConfig:
    """The pipeline that `ssmforge run` executes and `ssmforge submit` submits. Each stage's settings are its
    own sections: data and tokenizer (prepare), train and deepspeed (pretrain), eval (eval_ppl), harness
    (eval_harness), glue (finetune_glue)."""

    run: list[str] = field(default_factory=lambda: ["prepare", "pretrain", "export", "eval_ppl"])
    """Stages to run, in pipeline order: any of prepare, pretrain, export, eval_ppl, eval_harness, finetune_glue."""
    export_dir: str = "${run_dir}/export"
    """The model folder the export stage writes and the evaluation stages read."""

    def validate(self) -> None:
        _need(bool(self.run), "stages.run", self.run, f"a non-empty list of {', '.join(STAGES)}")
        for stage in self.run:
            _need(stage in STAGES, "stages.run", stage, f"each one of {', '.join(STAGES)}")
        _need(len(set(self.run)) == len(self.run), "stages.run", self.run, "each stage at most once")
        order = [STAGES.index(stage) for stage in self.run]
        _need(order == sorted(order), "stages.run", self.run, f"in pipeline order ({', '.join(STAGES)})")
        _need(bool(self.export_dir), "stages.export_dir", self.export_dir, "must be a non-empty path")


@dataclass
class RunConfig:
    """Everything one run reads: every stage takes this config and writes into run_dir."""

    run_dir: str = MISSING
    """The run folder: config.yaml, metrics.jsonl, checkpoints/, data/, eval/, logs/ (required)."""
    seed: int = 1234
    """Seed of the model initialisation, data order and every other random choice."""
    variables: dict[str, Any] = field(default_factory=dict)
    """Shared values that other keys interpolate as ${variables.name}."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: stack shape and one section per mixer (see model.*)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Sources, shards and the loader."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer to train or load."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation: steps, batch, schedule, precision, checkpoints."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed's ZeRO settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """eval-ppl's defaults for this run."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """eval-harness's defaults for this run."""
    glue: GlueConfig = field(default_factory=GlueConfig)
    """finetune-glue's defaults for this run."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """What `ssmforge run` and `ssmforge submit` execute."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The SLURM job that `ssmforge submit` writes."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""

    def validate(self) -> "RunConfig":
        _need(bool(self.run_dir), "run_dir", self.run_dir, "must be a non-empty path")
        self.model.validate("model")
        for section in (self.data, self.tokenizer, self.train, self.deepspeed, self.eval, self.harness, self.glue,
                        self.stages, self.slurm, self.wandb):
            section.validate()
        k = self.train.context_parallel
        _need(k == 1 or (self.data.seq_len % k == 0 and self.data.seq_len // k >= 16), "train.context_parallel", k,
              f"must divide data.seq_len={self.data.seq_len} into chunks of at least 16 tokens")
        _need(k == 1 or not self.train.compile, "train.compile", self.train.compile,
              "must be false with train.context_parallel > 1 (the state exchange is not traced by torch.compile)")
        if "hyena" in self.model.layer_kinds:
            _need(self.data.seq_len <= self.model.hyena.l_max, "model.hyena.l_max", self.model.hyena.l_max,
                  f"must be at least data.seq_len={self.data.seq_len} (Hyena's filters are defined up to l_max)")
        if "h3" in self.model.layer_kinds and k > 1:
            _need(self.data.seq_len // k >= self.model.h3.d_state - 1, "model.h3.d_state", self.model.h3.d_state,
                  f"must be at most data.seq_len / train.context_parallel + 1 = {self.data.seq_len // k + 1} (the "
                  f"shift filter's history comes from the previous rank's chunk)")
        return self


def _describe(error: OmegaConfBaseException) -> str:
    """omegaconf's multi-line message -> one line naming the key (and the new name of a renamed model key)."""
    key = getattr(error, "full_key", None)
    hint = renamed_model_key_message(key[len("model."):]) if key and key.startswith("model.") else None
    if hint:
        return hint
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


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                frozen: bool = False) -> RunConfig:
    """Read a YAML run config (or only the defaults when path is None), apply `key=value` overrides,
    resolve interpolations and validate. Raises ConfigError with the file and key on any problem.
    `frozen`: the file is a run folder's own config.yaml, which may predate the per-mixer model sections;
    its flat model keys are converted (a user's config with them is refused with the new key's name)."""
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
        if frozen and isinstance((data or {}).get("model"), dict):
            data["model"] = upgrade_flat_model_dict(data["model"])
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


def load_config_for_jobs(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """load_config with run_dir made absolute, and every interpolation of it (data.shard_dir: ${run_dir}/data)
    following: for configs frozen for processes that may start elsewhere (stages, SLURM jobs)."""
    config = load_config(path, overrides)
    return load_config(path, [*overrides, f"run_dir={Path(config.run_dir).resolve()}"])


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, to freeze into the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(config)))


@dataclass(frozen=True)
class Setting:
    """One row of `ssmforge config show`."""

    key: str  # dotted, list items by index: data.sources.0.kind
    value: Any
    type: str  # as annotated: "int", "str | None", ...
    default: Any  # the dataclass default (MISSING for a required key)
    doc: str  # the docstring under the field


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the line after `name: type = default`),
    read from its source: the one place a key is documented, for `config show` and the docs."""
    import ast
    import inspect
    import textwrap

    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING


def describe(section: Any, prefix: str = "") -> list[Setting | tuple[str, str]]:
    """Every key of a config section, depth first, with its value, type, default and docstring; a
    (key, class docstring) pair opens each nested section and each item of a list of sections."""
    rows: list[Setting | tuple[str, str]] = []
    docs = field_docs(type(section))
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        items = value if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]) else None
        if dataclasses.is_dataclass(value):
            rows.append((key, docs.get(f.name, "")))
            rows += describe(value, f"{key}.")
        elif items is not None:
            rows.append((key, docs.get(f.name, "")))
            for i, item in enumerate(items):
                rows.append((f"{key}.{i}", (type(item).__doc__ or "").strip().splitlines()[0]))
                rows += describe(item, f"{key}.{i}.")
        else:
            rows.append(Setting(key, value, str(f.type), _default(f), docs.get(f.name, "")))
    return rows


def _show(value: Any) -> str:
    if value is MISSING:
        return "(required)"
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def format_settings(rows: list[Setting | tuple[str, str]]) -> str:
    """`key = value` lines, each with its type, its default and its meaning."""
    settings = [r for r in rows if isinstance(r, Setting)]
    width = min(max(len(f"{s.key} = {_show(s.value)}") for s in settings) + 2, 48)  # a long path overflows
    lines = []
    for row in rows:
        if not isinstance(row, Setting):
            lines.append(f"\n# {row[0]}: {row[1]}" if row[1] else f"\n# {row[0]}")
            continue
        left = f"{row.key} = {_show(row.value)}"
        lines.append(f"{left.ljust(width - 2)}  # {row.type}, default {_show(row.default)}. {row.doc}")
    return "\n".join(lines).lstrip("\n") + "\n"
