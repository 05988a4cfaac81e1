"""The DeepSpeed engine built from the run config: ZeRO stage, offload, accumulation, clipping, AdamW
with the usual no-decay groups, warmup + cosine schedule, and the precision policy.

Precision: parameters stay float32 and the forward runs under torch.autocast (bf16/fp16) on GPUs, the
mixed-precision recipe the Mamba authors trained with. So A_log, D and the dt bias, which the mixers
read with `.float()`, are float32 in every forward whatever the precision. On CPUs `auto` is fp32.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from ssmforge.errors import ConfigError
from ssmforge.models.layers import rate_of

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a run (float32 means no autocast)."""
    bf16_here = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_here else torch.float32
    if precision == "bf16" and not bf16_here:
        raise ConfigError(f"train.precision=bf16 is invalid: {torch.cuda.get_device_name(device)} has no bf16; "
                          f"use fp32 (or auto)")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class DroppableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be dropped, leaving weights and moments as they were (a non-finite loss,
    train.nonfinite_loss=skip). DeepSpeed's ZeRO optimizers call this step on their fp32 partitions, so the
    drop holds at every stage; `overflow` tells DeepSpeed's engine (ZeRO-0) to count the step as skipped and
    leave the LR schedule where it is, as its ZeRO optimizers do for non-finite gradients."""

    drop_next_step = False
    overflow = False

    def step(self, closure=None):
        self.overflow, self.drop_next_step = self.drop_next_step, False
        return None if self.overflow else super().step(closure)


def drop_next_step(engine, drop: bool) -> None:
    """Make the engine's next optimizer step a no-op (or not); DeepSpeed wraps our optimizer, found here."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, DroppableAdamW):
        optimizer = optimizer.optimizer
    optimizer.drop_next_step = drop


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Weight decay on matrices only: off for biases, norms, embeddings, A_log and D (parameters marked
    `_no_weight_decay`, or of fewer than 2 dimensions). Parameters with a rate of their own (models.layers.cap_lr:
    the S4 families' SSM parameters and Hyena's filter FFN at min(lr, cap); scale_lr: LRU's recurrence at
    lr * factor) form groups of their own; the scheduler scales every group's rate by the same factor. The first
    two groups are always the decayed and the undecayed ones."""
    groups: dict[tuple, list] = {(True, None): [], (False, None): []}  # (decayed, own rate): parameters
    seen = set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue  # a tied weight appears once
        seen.add(id(param))
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition is flat: its whole shape counts
        decayed = len(shape) >= 2 and not getattr(param, "_no_weight_decay", False)
        groups.setdefault((decayed, rate_of(param, lr)), []).append(param)
    return [dict(params=params, weight_decay=weight_decay if decayed else 0.0,
                 **({} if group_lr is None else {"lr": group_lr}))
            for (decayed, group_lr), params in groups.items()]


def lr_lambda(train) -> callable:
    """Multiplier of train.lr at optimizer step s: linear warmup over warmup_steps, then cosine decay to
    min_lr_ratio at max_steps."""
    warmup, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


DEEPSPEED_BUCKETS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                     "stage3_max_live_parameters": 1_000_000_000}
"""DeepSpeed's default sizes (elements) of its gradient buckets and ZeRO-3's parameter gathering."""


def deepspeed_buckets(parameters: int) -> dict[str, int]:
    """DEEPSPEED_BUCKETS capped at the model's parameter count: a GPU allocates a bucket whole, and one
    larger than all the gradients only wastes memory (2 GB at the default for a model of any size)."""
    return {key: min(size, parameters) for key, size in DEEPSPEED_BUCKETS.items()}


def deepspeed_config(config, world_size: int, load_universal: bool = False, parameters: int | None = None) -> dict:
    """DeepSpeed's configuration; `load_universal` for an engine that resumes from a checkpoint converted to
    the universal layout (one saved on another rank count, pretrain.elastic); `parameters`, the model's
    parameter count, sizes the buckets (deepspeed_buckets)."""
    train, ds = config.train, config.deepspeed
    zero = {"stage": ds.zero_stage, **(deepspeed_buckets(parameters) if parameters else {})}
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.accumulation_steps(world_size),
        # DeepSpeed's data-parallel world is every rank (ZeRO shards over all of them, also the ranks of a
        # context group, which hold different chunks of the same sequences): its batch counts each rank's rows
        "train_batch_size": train.micro_batch_size * train.accumulation_steps(world_size) * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW also when the optimizer state is offloaded
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        "communication_data_type": ds.communication_dtype,
    }


def register_external_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; mixers that read child modules'
    weights directly list them in `external_parameters()` so they are gathered too."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in model.modules():
        for param in getattr(module, "external_parameters", lambda: [])():
            register_external_parameter(module, param)


def partitioned_construction(config, world_size: int):
    """The context to build the model in. Under ZeRO-3, deepspeed.zero.Init: each module's parameters are
    partitioned over the ranks as soon as the module is built (its constructor has initialised them, see
    models.layers.Projection), so a model larger than one GPU is never whole on any. Elsewhere nothing."""
    if config.deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    # fp32 parameters come from the config (no bf16/fp16 section): an explicit dtype=torch.float32 is dropped
    # on DeepSpeed's CPU accelerator (0.19), which then builds the parameters in bf16
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(config, world_size))


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO-3 holds a part of each on this rank."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def build_engine(model: torch.nn.Module, config, world_size: int, load_universal: bool = False):
    """(engine, optimizer, scheduler) from deepspeed.initialize."""
    import deepspeed

    train = config.train
    model.checkpoint_blocks = train.activation_checkpointing
    if train.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    if config.deepspeed.zero_stage == 3:
        register_external_parameters(model)
    optimizer = DroppableAdamW(param_groups(model, train.weight_decay, train.lr), lr=train.lr,
                               betas=tuple(train.betas), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size, load_universal, parameter_count(model)))
    return engine, optimizer, scheduler


def unclipped_grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm before clipping, for ZeRO-0 (call after the step's last backward, before
    engine.step()), as a device tensor: reading it waits for the device, which the metrics do only when a
    record is due. DeepSpeed reports the norm itself for ZeRO 1-3 through get_global_grad_norm()."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
