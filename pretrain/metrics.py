"""Training metrics: a JSONL log, wandb, a progress bar, end-of-run plots, and MFU / memory figures.

`MetricsLogger` is the trainer's only sink for numbers, and it owns their arithmetic: the logging
interval, the loss averaged over ranks, tokens/s over the interval, MFU and peak memory (`train_step`),
perplexity of a validation loss (`validation`). Every record goes to `run_dir/metrics.jsonl` (one JSON
object per line, the file of record) and, unless disabled, to wandb. The keys the plot knows are `loss`
(train and val records) and `tokens_per_s` (train records); any other key is logged as is. Only rank 0
writes; the other ranks take part in the loss all-reduce and write nothing, so the trainer need not branch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

LOSS_KEY = "loss"
THROUGHPUT_KEY = "tokens_per_s"


@dataclass(frozen=True)
class Throughput:
    """What turns a step count into tokens/s and MFU: the run's shape and the device's peak."""

    log_every: int  # train records every so many optimizer steps (and at total_steps)
    forward_flops_per_token: float  # the model's forward FLOPs per token; training costs 3x that
    peak_flops: float  # dense peak FLOP/s of one device
    world_size: int
    device: torch.device


class MetricsLogger:
    def __init__(self, run_dir: str | Path, wandb_config, run_config_dict: dict, is_rank0: bool,
                 wandb_run_id: str | None = None, total_steps: int | None = None,
                 throughput: Throughput | None = None, start_tokens: int = 0):
        """Open the metrics sinks of one run (rank 0 only; elsewhere only `train_step`'s all-reduce runs).

        wandb_config has `mode` ('online' | 'offline' | 'disabled'), `project`, `entity`, `run_name`.
        `run_dir/metrics.jsonl` is appended to, so a resumed run continues the same file; the first
        `log` drops earlier lines with step >= its step, so the file never holds a step twice.
        wandb writes under `run_dir/wandb` and continues the run `wandb_run_id` when one is given.
        A tqdm bar over `total_steps` is drawn only when stderr is a terminal. `throughput` is needed by
        `train_step` alone; `start_tokens` is the token count the run resumes from.
        """
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.is_rank0 = is_rank0
        self.total_steps = total_steps
        self._resumed_id = wandb_run_id
        self._wandb_run = None
        self._file = None  # opened at the first log, after dropping lines the resumed run will rewrite
        self._bar = None
        self._closed = False
        self.throughput = throughput
        if is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if wandb_config.mode != "disabled":
                self._wandb_run = _start_wandb(self.run_dir, wandb_config, run_config_dict, wandb_run_id)
        # the first interval starts after wandb's start-up, which is no training time
        self._window = (time.perf_counter(), start_tokens)
        self._excluded = {"validation": 0.0, "checkpoint": 0.0}  # seconds since the last train record

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run id to store in checkpoints (the given one when wandb is disabled)."""
        return self._wandb_run.id if self._wandb_run is not None else self._resumed_id

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Record `metrics` at `step`: one JSON line, the same to wandb as `kind/name`, and the bar."""
        if not self.is_rank0 or self._closed:
            return
        values = {name: _plain_number(value) for name, value in metrics.items()}
        if self._file is None:
            _drop_steps_from(self.metrics_path, step)
            self._file = self.metrics_path.open("a", encoding="utf-8")
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed job keeps every step it logged
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{name}": value for name, value in values.items()}, step=step)
        if kind == "train":
            self._advance_bar(step, values)

    def train_step(self, step: int, tokens: int, loss_sum, loss_count: int, lr: float, grad_norm,
                   skipped_steps: int = 0) -> None:
        """Called by every rank after each optimizer step with the sum of its `loss_count` micro-step losses
        (a number or a device tensor, read only when a record is due). At the logging interval (and the last
        step): the mean loss over every rank, lr, grad norm, tokens so far, tokens/s and MFU since the last
        record (time spent validating and checkpointing left out, and reported as validation_s and
        checkpoint_s), peak memory and the steps dropped so far. `grad_norm` is a number, None, or a
        callable giving one (computed only when a record is due)."""
        from .collectives import sum_over_ranks

        t = self.throughput
        if step % t.log_every != 0 and step != self.total_steps:
            return
        loss_sum, loss_count = sum_over_ranks([float(loss_sum), loss_count], t.device)  # every rank
        grad_norm = grad_norm() if callable(grad_norm) else grad_norm
        start_time, start_tokens = self._window
        now = time.perf_counter()
        tokens_per_s = (tokens - start_tokens) / max(now - start_time, 1e-9)
        self._window = (now, tokens)
        excluded, self._excluded = self._excluded, dict.fromkeys(self._excluded, 0.0)
        self.log(step, {
            "loss": loss_sum / loss_count if loss_count else float("nan"), "lr": lr,
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "tokens": tokens, "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s / t.world_size, 3 * t.forward_flops_per_token, t.peak_flops),
            "peak_memory_gb": peak_memory_bytes(t.device) / 2**30, "skipped_steps": skipped_steps,
            **{f"{kind}_s": seconds for kind, seconds in excluded.items()}})

    @contextlib.contextmanager
    def excluded(self, kind: str):
        """Time spent in this block (kind: validation, checkpoint) is not training time: it is left out of
        the next record's tokens/s and MFU and reported in it as `<kind>_s`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self._window = (self._window[0] + spent, self._window[1])
            self._excluded[kind] = self._excluded.get(kind, 0.0) + spent

    def validation(self, step: int, loss: float, entropy_floor: float | None = None) -> None:
        """A validation record: the loss per token, its perplexity, and the data's entropy floor when known."""
        self.log(step, {"loss": loss, "perplexity": math.exp(loss),
                        **({"entropy_floor": entropy_floor} if entropy_floor is not None else {})}, kind="val")

    def close(self) -> Path | None:
        """Finish wandb, close the bar and draw run_dir/plots/training.png; returns its path on rank 0."""
        if not self.is_rank0:
            return None
        if not self._closed:
            self._closed = True
            if self._file is not None:
                self._file.close()
            if self._bar is not None:
                self._bar.close()
            if self._wandb_run is not None:
                self._wandb_run.finish()
        return plot_metrics(self.metrics_path, self.run_dir / "plots" / "training.png")

    def _advance_bar(self, step: int, values: dict[str, Any]) -> None:
        if self._bar is None:
            if not sys.stderr.isatty():
                return
            from tqdm import tqdm

            # starting at the step before the first logged one keeps the rate and ETA right on resume
            self._bar = tqdm(total=self.total_steps, initial=max(step - 1, 0), unit="step", dynamic_ncols=True)
        postfix = {}
        if LOSS_KEY in values:
            postfix["loss"] = f"{values[LOSS_KEY]:.4f}"
        if THROUGHPUT_KEY in values:
            postfix["tok/s"] = f"{values[THROUGHPUT_KEY]:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(step - self._bar.n, 0))


def _start_wandb(run_dir: Path, wandb_config, run_config_dict: dict, run_id: str | None):
    """wandb.init in the configured mode; an online run that cannot start falls back to offline."""
    import wandb

    kwargs = dict(project=wandb_config.project, entity=wandb_config.entity, name=wandb_config.run_name,
                  config=run_config_dict, dir=str(run_dir), id=run_id, resume="allow" if run_id else None)
    try:
        return wandb.init(mode=wandb_config.mode, **kwargs)
    except Exception as error:  # wandb raises many types for network and auth trouble
        if wandb_config.mode != "online":
            raise
        # losing the run to a wandb outage is worse than syncing it later with `wandb sync`
        logger.warning("wandb online init failed (%s); logging offline under %s/wandb", error, run_dir)
        return wandb.init(mode="offline", **kwargs)


def _plain_number(value: Any) -> int | float:
    """Python int/float from ints, floats, numpy scalars and 0-d tensors, so json and wandb accept it."""
    if isinstance(value, bool) or not isinstance(value, int):
        return float(value)
    return value


def _drop_steps_from(path: Path, first_new_step: int) -> None:
    """Rewrite `path` without lines whose step >= first_new_step (and without torn lines from a crash)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", first_new_step) < first_new_step:
            kept.append(line)
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order (torn lines skipped)."""
    records = []
    path = Path(path)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draw train/val loss (top) and tokens/s (bottom) against step from a metrics.jsonl file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    records = read_metrics(metrics_path)

    def series(kind: str, key: str) -> tuple[list, list]:
        points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
        return [s for s, _ in points], [v for _, v in points]

    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis, speed_axis = figure.subplots(2, 1, sharex=True)
    for kind, style in (("train", "-"), ("val", "o-")):
        steps, losses = series(kind, LOSS_KEY)
        if steps:
            loss_axis.plot(steps, losses, style, label=f"{kind} loss", markersize=3)
    loss_axis.set_ylabel("loss")
    if loss_axis.lines:
        loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    steps, speeds = series("train", THROUGHPUT_KEY)
    speed_axis.plot(steps, speeds, color="tab:green")
    speed_axis.set_ylabel("tokens/s")
    speed_axis.set_xlabel("step")
    speed_axis.grid(alpha=0.3)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    return png_path


# Dense (no 2:4 sparsity) peaks in FLOP/s from the vendors' datasheets: (name pattern, bf16/fp16 tensor,
# tf32 tensor, fp32 non-tensor, source). GeForce figures are with fp32 accumulation, as PyTorch uses.
# First match wins, so variants come before the generic name.
_GPU_PEAKS = [
    ("H100 NVL", 835e12, 417e12, 60e12, "NVIDIA H100 NVL datasheet (1671/835 TFLOPS with sparsity)"),
    ("H100 PCIE", 756e12, 378e12, 51e12, "NVIDIA H100 PCIe datasheet (1513/756 TFLOPS with sparsity)"),
    ("H200 NVL", 835e12, 417e12, 60e12, "NVIDIA H200 NVL datasheet (1671/835 TFLOPS with sparsity)"),
    ("H200", 989e12, 495e12, 67e12, "NVIDIA H200 SXM datasheet (1979/989 TFLOPS with sparsity)"),
    ("GH200", 989e12, 495e12, 67e12, "NVIDIA GH200 datasheet (Hopper GPU as H100 SXM)"),
    ("H100", 989e12, 495e12, 67e12, "NVIDIA H100 SXM datasheet (1979/989 TFLOPS with sparsity)"),
    ("A100", 312e12, 156e12, 19.5e12, "NVIDIA A100 datasheet (SXM and PCIe)"),
    ("A10G", 70e12, 35e12, 35e12, "AWS A10G figures as tabulated by Baseten (A10 vs A10G)"),
    ("A10", 125e12, 62.5e12, 31.2e12, "NVIDIA A10 datasheet (250/125 TFLOPS with sparsity)"),
    ("L40S", 362.05e12, 183e12, 91.6e12, "NVIDIA L40S datasheet (733/366 TFLOPS with sparsity)"),
    ("L4", 121e12, 60e12, 30.3e12, "NVIDIA L4 datasheet (242/120 TFLOPS with sparsity)"),
    ("V100S", 130e12, 16.4e12, 16.4e12, "NVIDIA V100S datasheet (fp16 tensor; no bf16/tf32 units)"),
    ("V100 SXM2", 125e12, 15.7e12, 15.7e12, "NVIDIA V100 SXM2 datasheet (fp16 tensor; no bf16/tf32 units)"),
    ("V100", 112e12, 14e12, 14e12, "NVIDIA V100 PCIe datasheet (fp16 tensor; no bf16/tf32 units)"),
    ("RTX 4090", 165.2e12, 82.6e12, 82.6e12, "NVIDIA Ada whitepaper, RTX 4090 (fp32 accumulate)"),
    ("RTX 3090", 71e12, 35.6e12, 35.6e12, "NVIDIA Ampere GA102 whitepaper, RTX 3090 (fp32 accumulate)"),
]
_NO_BF16 = ("V100",)  # Volta runs bf16 matmuls without tensor cores: the fp32 peak applies


def datasheet_peak_flops(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """The table's peak for `name` (as torch.cuda.get_device_name reports it) and dtype, or None."""
    words = name.upper().replace("-", " ").split()
    for pattern, half, tf32, fp32, source in _GPU_PEAKS:
        # whole-word match, so "A10" does not hit "A100" or "A10G" and "L4" does not hit "L40S"
        if not _contains_words(words, pattern.split()):
            continue
        if dtype == torch.float16 or (dtype == torch.bfloat16 and not pattern.startswith(_NO_BF16)):
            return half, f"{source}: {dtype} dense tensor"
        if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            return tf32, f"{source}: tf32 dense tensor (float32 matmul precision allows tf32)"
        return fp32, f"{source}: fp32"
    return None


def _contains_words(words: list[str], tokens: list[str]) -> bool:
    return any(words[i:i + len(tokens)] == tokens for i in range(len(words) - len(tokens) + 1))


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 3.0) -> float:
    """Best FLOP/s of square matmuls on `device` in `dtype`, within about `budget_s` seconds."""
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    best = 0.0
    deadline = time.perf_counter() + budget_s
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pools, kernel selection
        for _ in range(5):
            _synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                return best
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_path() -> Path:
    from ssmforge.kernels.cpu.build import cache_dir

    return cache_dir() / "peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cached_measurement(key: str, device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s for `key`, measuring and storing it on the first request."""
    path = _cache_path()
    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable peak-FLOPs cache %s", path)
    if key in cache:
        return float(cache[key])
    logger.info("measuring peak matmul FLOP/s for %s (cached in %s)", key, path)
    value = measure_matmul_flops(device, dtype)
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may write at once: replace atomically
        temporary.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not write peak-FLOPs cache %s: %s", path, error)
    return value


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Dense peak FLOP/s of `device` for matmuls in `dtype`, and where the figure came from.

    CUDA: a datasheet table keyed by torch.cuda.get_device_name (bf16/fp16 tensor-core peak, tf32 peak
    for float32 when torch's float32 matmul precision allows tf32, else fp32); an unknown GPU is measured.
    CPU: an fp32 matmul benchmark of a few seconds, cached in kernels.cpu.build.cache_dir() (default
    ~/.cache/ssmforge) keyed by CPU model, thread count and torch version; the figure serves every dtype.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        found = datasheet_peak_flops(name, dtype)
        if found is not None:
            return found
        key = f"cuda|{name}|{dtype}|torch={torch.__version__}"
        return _cached_measurement(key, device, dtype), f"measured: {dtype} matmul on unlisted GPU {name!r}"
    threads = torch.get_num_threads()
    key = f"cpu|{_cpu_model()}|threads={threads}|torch={torch.__version__}"
    value = _cached_measurement(key, torch.device("cpu"), torch.float32)
    return value, f"measured: fp32 matmul on {_cpu_model()} with {threads} threads"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation = tokens_per_s * flops_per_token / peak, as a fraction."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: max allocated CUDA memory, or on CPU the process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
