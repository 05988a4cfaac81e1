"""`ssmforge plan`: whether a training config fits its GPUs and how long it will take, before it is submitted.

Memory per rank is the sum of two kinds of terms:
- the model states (parameters, gradients, AdamW moments and ZeRO's fp32 master partition, DeepSpeed's
  gradient buckets and ZeRO-3's gathered parameters) by ZeRO stage and offload: counts of the model's real
  parameters times their bytes, as DeepSpeed allocates them with the sizes `engine.deepspeed_config` sets;
- the activations of one micro-batch and the optimizer's temporaries, obtained by tracing one real
  training step (forward, loss, backward, AdamW step) of the configured model on fake tensors: torch's
  FakeTensorMode gives every tensor its shape and dtype without allocating it, and its MemTracker counts
  the bytes alive at every moment, the tensors each kernel keeps for backward included (the kernels are
  torch custom ops with fake implementations). A 1.4B model plans on a laptop.
Time: FLOPs per token (3x the forward's, from the model itself) over the cluster's peak at a stated MFU.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from ssmforge.errors import ConfigError

from .engine import deepspeed_buckets

log = logging.getLogger(__name__)

USABLE_FRACTION = 0.9
"""Of a GPU's memory a plan may fill: the CUDA context, NCCL's buffers and the allocator's fragmentation
take the rest."""

# (name words, GiB): first match wins, so variants come before the generic name
GPU_MEMORY_GIB = [
    ("H100 NVL", 94), ("H200 NVL", 141), ("GH200", 96), ("H200", 141), ("H100", 80),
    ("A100 80GB", 80), ("A100 SXM4 80GB", 80), ("A100 40GB", 40), ("A100 SXM4 40GB", 40), ("A100 PCIE 40GB", 40),
    ("A10G", 24), ("A10", 24), ("L40S", 48), ("L4", 24), ("V100 32GB", 32), ("V100 16GB", 16),
    ("RTX 4090", 24), ("RTX 3090", 24),
]


@dataclass
class Target:
    """Where the config will run: the GPUs (or this CPU), their memory and their peak FLOP/s."""

    ranks: int
    device: str  # "cuda" or "cpu": which kernels and autocast the trace uses
    name: str
    memory_bytes: int | None  # per rank; None: not known (only the figures, no verdict)
    peak_flops: float
    peak_source: str
    dtype: torch.dtype = torch.float32  # the run's autocast dtype


@dataclass
class StepMemory:
    """Bytes per rank. `activations` and `optimizer_temporaries` come from the trace."""

    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    optimizer_temporaries: int
    host_optimizer: int  # on the CPU with deepspeed.offload_optimizer

    @property
    def peak(self) -> int:
        """The larger of the two moments a step passes through: the end of the forward (everything
        resident, every activation alive) and the optimizer step (no activations; its temporaries)."""
        resident = self.parameters + self.gradients + self.optimizer + self.buffers
        return resident + max(self.activations, self.optimizer_temporaries)


@dataclass
class Plan:
    target: Target
    parameters: int
    memory: StepMemory
    flops_per_token: float
    tokens: int
    mfu: float
    micro_batch: int
    largest_micro_batch: int | None = None  # as configured, None when none fits
    largest_micro_batch_checkpointed: int | None = None  # with activation checkpointing

    @property
    def fits(self) -> bool | None:
        if self.target.memory_bytes is None:
            return None
        return self.memory.peak <= USABLE_FRACTION * self.target.memory_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.target.ranks * self.target.peak_flops * self.mfu / self.flops_per_token

    @property
    def hours(self) -> float:
        return self.tokens / self.tokens_per_s / 3600


def gpu_memory_gib(name: str) -> int | None:
    words = name.upper().replace("-", " ").split()
    for pattern, gib in GPU_MEMORY_GIB:
        tokens = pattern.split()
        if any(words[i:i + len(tokens)] == tokens for i in range(len(words) - len(tokens) + 1)):
            return gib
    return None


def gpu_target(ranks: int, name: str | None, memory_gb: float | None, dtype: torch.dtype) -> Target:
    """The target of `--gpus N --gpu NAME | --gpu-memory-gb M`: memory from the table (or M), peak FLOP/s from
    the datasheet table of pretrain.metrics (a GPU without an entry needs its name to be known)."""
    from .metrics import datasheet_peak_flops

    if name is None and memory_gb is None:
        raise ConfigError("--gpu NAME or --gpu-memory-gb M is needed to say whether the plan fits")
    peak = datasheet_peak_flops(name or "H100", dtype)
    if peak is None:
        raise ConfigError(f"--gpu {name!r} is not in the datasheet table of peak FLOP/s (one of: "
                          f"{', '.join(p for p, _ in GPU_MEMORY_GIB)})")
    source = peak[1] if name else f"{peak[1]}; no --gpu given: H100 figures"
    if memory_gb is None:
        gib = gpu_memory_gib(name)
        if gib is None:
            raise ConfigError(f"--gpu {name!r}: its memory is not in the table; add --gpu-memory-gb (e.g. "
                              f"'A100 80GB' or --gpu-memory-gb 80)")
        memory_gb = gib
    return Target(ranks, "cuda", name or "GPU", int(memory_gb * 2**30), peak[0], source, dtype)


def model_on_target(model_config, target: Target):
    """The model config as it runs on the target: model.kernel_backend auto resolves there to the GPU's Triton
    kernels. A plan builds its models on fake CPU tensors, whose device would otherwise pick the CPU's paths
    (and their memory and FLOPs, which differ: the LRU's scan)."""
    if target.device == "cuda" and model_config.kernel_backend == "auto":
        return dataclasses.replace(model_config, kernel_backend="triton")
    return model_config


def _trace(config, micro_batch: int, checkpointing: bool, target: Target) -> tuple[int, int, int]:
    """(parameter bytes, activation peak, optimizer-step temporaries) of one training step of the configured
    model, traced on fake tensors. Activations: the most bytes alive beyond parameters and gradients during
    forward + backward. Temporaries: the most alive during the AdamW step beyond parameters, gradients and
    the moments it creates. A GPU target traces the GPU's kernels (Triton's fake implementations) under
    the run's autocast dtype; the fake tensors themselves stay on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from ssmforge.models import LanguageModel
    from ssmforge.models.context_parallel import ContextParallel

    from .engine import DroppableAdamW, autocast, param_groups

    seq_len = config.data.seq_len
    with FakeTensorMode():
        model = LanguageModel(model_on_target(config.model, target))
        model.checkpoint_blocks = checkpointing
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        tokens = torch.zeros(micro_batch, seq_len + 1, dtype=torch.long)
        # document resets take the kernels' reset paths (and an explicit block-diagonal mask for attention)
        seq_idx = (torch.zeros(micro_batch, seq_len, dtype=torch.int32)
                   if config.data.document_boundaries == "reset" else None)
        # with context parallelism, one rank's chunk of the rows and the exchange of the group's last rank
        k = config.train.context_parallel
        context = ContextParallel.stand_in(k) if k > 1 else None
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            with autocast(torch.device("cpu"), target.dtype):
                loss = model(tokens[:, :-1], targets=tokens[:, 1:], seq_idx=seq_idx, context=context)
            loss.backward()
        activations = _peak_beyond_model(tracker)
        train = config.train
        optimizer = DroppableAdamW(param_groups(model, train.weight_decay, train.lr), lr=train.lr)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            optimizer.step()
        moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        temporaries = _peak_total(tracker) - 2 * params - moments
    return params, max(activations, 0), max(temporaries, 0)


def _peak_total(tracker) -> int:
    return sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


def _peak_beyond_model(tracker) -> int:
    """Bytes alive at the traced peak other than parameters and gradients (counted by model_states)."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    return sum(snapshot["Total"] - snapshot.get(_MemRefType.PARAM, 0) - snapshot.get(_MemRefType.GRAD, 0)
               for snapshot in tracker.get_tracker_snapshot("peak").values())


def model_states(config, parameter_sizes: list[int], ranks: int, device: str) -> dict[str, int]:
    """Bytes per rank of the fp32 model states as DeepSpeed holds them at config.deepspeed.zero_stage:
    parameters and gradients whole below ZeRO-3 / ZeRO-2, partitioned above (ZeRO-3 keeps parameters of at
    most param_persistence_threshold elements whole); AdamW's two moments plus, at ZeRO >= 1, the fp32
    master copy of the rank's partition; the gradient buckets and ZeRO-3's gathered parameters."""
    ds = config.deepspeed
    stage, total = ds.zero_stage, sum(parameter_sizes)
    if stage == 3:
        persistent = sum(n for n in parameter_sizes if n <= ds.param_persistence_threshold)
        parameters = persistent + math.ceil((total - persistent) / ranks)
    else:
        parameters = total
    gradients = total if stage < 2 else math.ceil(total / ranks)
    optimizer = 2 * total if stage == 0 else 3 * math.ceil(total / ranks)
    buckets = deepspeed_buckets(total)
    if stage == 0:
        buffers = total  # the flattened copy the data-parallel all-reduce sends (ZeRO-0 reduces all at once)
    elif stage in (1, 2):
        buffers = buckets["reduce_bucket_size"]
    else:  # two gradient buckets (overlapped communication) and the parameters gathered for compute
        buffers = 2 * buckets["reduce_bucket_size"] + min(total, buckets["stage3_max_live_parameters"])
    host = 0
    if ds.offload_optimizer:
        host, optimizer = optimizer, 0
    return {name: 4 * count for name, count in dict(parameters=parameters, gradients=gradients, optimizer=optimizer,
                                                     buffers=buffers, host_optimizer=host).items()}


def step_memory(config, target: Target, micro_batch: int, checkpointing: bool) -> tuple[StepMemory, int]:
    """The per-rank memory of one training step at this micro-batch, and the parameter count."""
    from ssmforge.models import LanguageModel

    with torch.device("meta"):
        sizes = [p.numel() for p in LanguageModel(config.model).parameters()]
    _, activations, temporaries = _trace(config, micro_batch, checkpointing, target)
    states = model_states(config, sizes, target.ranks, target.device)
    if config.deepspeed.zero_stage > 0:  # the AdamW step runs on the rank's partition
        temporaries = math.ceil(temporaries / target.ranks)
    return StepMemory(activations=activations, optimizer_temporaries=temporaries, **states), sum(sizes)


def largest_micro_batch(config, target: Target, checkpointing: bool, candidates: list[int],
                        traced: dict[int, int] | None = None) -> int | None:
    """The largest candidate micro-batch whose traced step fits: what tracing every candidate would answer, for any
    step memory that never shrinks as the micro-batch grows. A trace's time grows with its micro-batch (a minute or
    more at thousands of sequences). Memory is about linear, but not from the first rows (a layer's blocks of work grow
    until they reach their byte cap), so the line through micro-batches 1 and 2 can be off by half either way. The
    search traces two cheap batches, a 32nd and a 16th of where that line crosses the budget, and follows the line
    through them (and then through its last two traces that fit); then it brackets the answer between the
    largest batch known to fit and the smallest known not to, each trace where the line between those two crosses
    the budget (regula falsi with the Illinois rule: an end kept twice in a row counts half, so the guesses cannot
    creep up from one side). The candidate after the answer is traced to confirm it. `traced` holds peaks already
    measured at this setting (micro-batch: bytes; the plan's configured one): never traced again, they narrow the
    bracket."""
    if target.memory_bytes is None or not candidates:
        return None
    budget = USABLE_FRACTION * target.memory_bytes
    candidates = sorted(candidates)
    peaks = dict(traced or {})

    def fits(batch: int) -> bool:
        if batch not in peaks:
            started = time.monotonic()
            peaks[batch] = step_memory(config, target, batch, checkpointing)[0].peak
            log.info("micro-batch %d%s: peak %s of %s MiB usable: %s (traced in %.0f s)", batch,
                     " with activation checkpointing" if checkpointing else "", f"{peaks[batch] / 2**20:,.0f}",
                     f"{budget / 2**20:,.0f}", "fits" if peaks[batch] <= budget else "does not fit",
                     time.monotonic() - started)
        return peaks[batch] <= budget

    def crossing(a: int, b: int) -> float:
        """Where the line through the traces at a < b reaches the budget."""
        rise = peaks[b] - peaks[a]
        return math.inf if rise <= 0 else a + (b - a) * (budget - peaks[a]) / rise

    if not fits(1):
        return None
    anchor, low = 1, 1  # low fits, high (None: not yet seen) does not
    high = min((b for b in peaks if peaks[b] > budget), default=None)
    if fits(2):  # a known peak at 2 is read, not traced
        low = 2
        reach = min(crossing(1, 2), candidates[-1])
        for probe in (int(reach // 32), int(reach // 16)):  # cheap, and far enough from 1 and 2 for a local slope
            if low < probe and (high is None or probe < high):
                if not fits(probe):
                    high = probe
                    break
                anchor, low = low, probe
    else:
        high = 2
    known = [b for b in peaks if low < b and peaks[b] <= budget and (high is None or b < high)]
    if known:  # a peak measured before the search
        anchor, low = low, max(known)
    low_weight, high_weight, kept = 1.0, 1.0, None
    while True:
        first = bisect.bisect_right(candidates, low)  # the candidates still open: first .. last - 1
        last = len(candidates) if high is None else bisect.bisect_left(candidates, high)
        if first >= last:
            break
        if high is None:
            guess = crossing(anchor, low)
        else:
            below, above = (budget - peaks[low]) * low_weight, (peaks[high] - budget) * high_weight
            guess = low + (high - low) * below / (below + above)
        batch = candidates[min(max(bisect.bisect_right(candidates, guess) - 1, first), last - 1)]
        if fits(batch):
            if high is None:  # the next line starts here: a steep start (blocks still growing) is left behind
                anchor = low
            low, low_weight = batch, 1.0
            if high is not None:
                high_weight, kept = (high_weight / 2 if kept == "high" else high_weight), "high"
        else:
            high, high_weight = batch, 1.0
            low_weight, kept = (low_weight / 2 if kept == "low" else low_weight), "low"
    index = bisect.bisect_right(candidates, low) - 1
    return candidates[index] if index >= 0 else None


def micro_batch_candidates(config, ranks: int, limit: int = 4096) -> list[int]:
    """Micro-batches the run could use: the divisors of the global batch per rank, or any up to `limit`."""
    train = config.train
    if train.global_batch_size is None:
        return list(range(1, limit + 1))
    ranks = train.data_parallel_ranks(ranks)
    per_rank = train.global_batch_size // ranks if train.global_batch_size % ranks == 0 else 0
    return [b for b in range(1, per_rank + 1) if per_rank % b == 0]


def make_plan(config, target: Target, mfu: float, search: bool = True) -> Plan:
    """The plan of `config` on `target`; with `search`, the largest micro-batches that fit too."""
    from ssmforge.models import LanguageModel

    train = config.train
    memory, parameters = step_memory(config, target, train.micro_batch_size, train.activation_checkpointing)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # fake CPU tensors: a kernel's default backend (and FLOPs) follows the device
        model = LanguageModel(model_on_target(config.model, target))
    seq_len = config.data.seq_len
    plan = Plan(target=target, parameters=parameters, memory=memory,
                flops_per_token=3 * model.forward_flops_per_token(seq_len),
                tokens=train.max_steps * train.sequences_per_step(target.ranks) * seq_len, mfu=mfu,
                micro_batch=train.micro_batch_size)
    if search and target.memory_bytes is not None:
        candidates = micro_batch_candidates(config, target.ranks)
        plan.largest_micro_batch = largest_micro_batch(config, target, train.activation_checkpointing, candidates,
                                                       traced={train.micro_batch_size: memory.peak})
        # a config that already checkpoints has just been searched with checkpointing
        plan.largest_micro_batch_checkpointed = (plan.largest_micro_batch if train.activation_checkpointing
                                                 else largest_micro_batch(config, target, True, candidates))
    return plan


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def describe(plan: Plan, config) -> list[str]:
    """The plan as the lines `ssmforge plan` prints."""
    t, m, train = plan.target, plan.memory, config.train
    accumulation = train.accumulation_steps(t.ranks)
    lines = [
        f"target: {t.ranks} x {t.name}" + (f", {t.memory_bytes / 2**30:.0f} GiB each" if t.memory_bytes else "")
        + f"; peak {t.peak_flops / 1e12:.0f} TFLOP/s ({t.peak_source})",
        f"model: {config.model.family}, {plan.parameters / 1e6:.1f}M parameters; seq_len {config.data.seq_len}, "
        f"micro-batch {plan.micro_batch} x accumulation {accumulation} x {train.data_parallel_ranks(t.ranks)} ranks"
        + (f" x {train.context_parallel} context-parallel (each rank holds {config.data.seq_len // train.context_parallel}"
           f" tokens of every sequence)" if train.context_parallel > 1 else ""),
        f"per rank (ZeRO-{config.deepspeed.zero_stage}"
        f"{', optimizer offloaded' if config.deepspeed.offload_optimizer else ''}"
        f"{', activation checkpointing' if train.activation_checkpointing else ''}):",
        f"  parameters          {_gib(m.parameters)}",
        f"  gradients           {_gib(m.gradients)}",
        f"  optimizer states    {_gib(m.optimizer)}" + (f"   (+{_gib(m.host_optimizer).strip()} on the host)"
                                                         if m.host_optimizer else ""),
        f"  DeepSpeed buffers   {_gib(m.buffers)}",
        f"  activations         {_gib(m.activations)}   (one micro-batch, traced on fake tensors)",
        f"  optimizer step      {_gib(m.optimizer_temporaries)}   (AdamW's temporaries, traced)",
        f"  peak                {_gib(m.peak)}",
        f"compute: {plan.flops_per_token / 1e9:.3g} GFLOP per token (3 x forward); at {plan.mfu:.0%} MFU "
        f"{plan.tokens_per_s:,.0f} tokens/s; {plan.tokens:,} tokens ({train.max_steps} steps) in "
        f"{plan.hours:,.1f} h = {plan.hours * t.ranks:,.0f} GPU-hours",
    ]
    if plan.fits is None:
        return lines
    usable = USABLE_FRACTION * t.memory_bytes
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{verdict}: peak {m.peak / 2**30:.2f} GiB of {usable / 2**30:.1f} GiB usable "
                 f"({USABLE_FRACTION:.0%} of {t.memory_bytes / 2**30:.0f}); largest micro-batch that fits: "
                 f"{plan.largest_micro_batch or 'none'}, with activation checkpointing: "
                 f"{plan.largest_micro_batch_checkpointed or 'none'}")
    return lines

