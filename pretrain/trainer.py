"""The pretraining loop. The distributed machinery lives behind small functions in launch, engine,
checkpoint, signals and metrics; what is left here reads top to bottom."""
from __future__ import annotations

import gc
import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ssmforge.data_pipeline.loader import build_loader, open_manifest
from ssmforge.data_pipeline.pack import prepare, prepare_in_job
from ssmforge.errors import CheckpointError, ConfigError, DataError, LostRankError, SsmforgeError, TrainingError
from ssmforge.kernels import deterministic, set_deterministic
from ssmforge.kernels.documents import document_index
from ssmforge.kernels.backends import describe_backends
from ssmforge.models import LanguageModel
from ssmforge.models.layers import kernel_backend

from . import checkpoint
from .elastic import check_resume, ready_to_resume
from .config import to_yaml
from .engine import (autocast, build_engine, drop_next_step, parameter_count, partitioned_construction,
                     resolve_precision, unclipped_grad_norm)
from .collectives import any_rank, context_group, sum_over_ranks
from .launch import World, device_for, init_distributed, shutdown, world_from_env
from .metrics import MetricsLogger, Throughput, peak_flops
from .runlock import RunLock
from .peers import bounded, describe_lost_ranks, lost_peer
from .signals import REQUEUE_EXIT_CODE, StopRequest, mark_requeue

log = logging.getLogger(__name__)



def ensure_prepared(config, world: World):
    """Every rank reads the manifest of the prepared shards. Missing shards of small data (the embedded synthetic
    corpus, a few local files: data_pipeline.pack.prepare_in_job) are prepared here by rank 0 while the others
    wait; for anything larger every rank stops at once with one line: preparing is `ssmforge prepare`, run first."""
    error = None
    if prepare_in_job(config) and world.is_main:  # every rank decides alike, from the config and the folder
        try:
            prepare(config)
        except SsmforgeError as e:
            error = e
    if any_rank(error is not None, device_for(world)):  # also the barrier the others wait at
        raise error or DataError(f"rank 0 could not prepare {config.data.shard_dir} (its error says why)")
    manifest = open_manifest(config.data.shard_dir, config.data.cache_dir)
    manifest.check_model_vocab(config.model.vocab_size)
    manifest.check_tokenizer(config.tokenizer.kind, config.tokenizer.path,
                             f"{config.data.shard_dir.rstrip('/')}/manifest.json")
    if manifest.seq_len != config.data.seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} but the shards in {config.data.shard_dir} were "
                          f"prepared with seq_len {manifest.seq_len}")
    return manifest


def endless(loader):
    """Batches across epochs; streaming starts each epoch's shuffle from the seed and the epoch number."""
    while True:
        yield from loader


def lm_loss(engine, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype, reduction="mean",
            reset_at: int | None = None, context=None):
    """Next-token cross-entropy of tokens (batch, seq_len + 1), computed in fp32 without full logits. With
    reset_at (the EOS id, data.document_boundaries=reset), each EOS starts a document the model sees alone.
    With a context group (train.context_parallel), the loss of this rank's chunk of the rows."""
    tokens = tokens.to(device, non_blocking=True)
    inputs = tokens[:, :-1]
    seq_idx = None if reset_at is None else document_index(inputs, reset_at)
    with autocast(device, dtype):
        return engine(inputs, targets=tokens[:, 1:], reduction=reduction, seq_idx=seq_idx, context=context)


@torch.no_grad()
def evaluate(engine, loader, device, dtype, max_batches: int, reset_at: int | None = None,
             context=None) -> float | None:
    """Mean validation loss per token over the split (or max_batches per rank), reduced over ranks; reset_at
    and context as for `lm_loss` (each rank of a context group counts its chunk's tokens)."""
    engine.eval()
    total, count = 0.0, 0
    for i, tokens in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        total += lm_loss(engine, tokens, device, dtype, reduction="sum", reset_at=reset_at, context=context).item()
        count += tokens[:, 1:].numel() // (context.size if context else 1)
    engine.train()
    total, count = sum_over_ranks([total, count], device)
    return total / count if count else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config) -> int:
    """Train until train.max_steps (resuming from the latest checkpoint); return the exit code:
    0 when done, REQUEUE_EXIT_CODE after a signalled stop."""
    check_layout_and_resume(config, world_from_env())  # before DeepSpeed starts and anything is written
    world, device = init_distributed(config.train.collective_timeout_s)
    stop = StopRequest()
    lock = RunLock(config.run_dir)
    lost = None
    try:
        try:
            lock_run_dir(lock, world, device)
            return _train(config, world, device, stop)
        except SsmforgeError:  # already one line for the user
            raise
        except Exception as e:  # a failed collective, or whatever the launcher's SIGTERM interrupted after it
            lost = lost_peer(e) if world.distributed else None
            if lost is None:
                raise
        # raised out here, with the failure's frames released: the loader's workers shut down now rather
        # than at exit, where SIGTERM would not end them (data_pipeline.loader)
        gc.collect()
        latest = checkpoint.latest_tag(Path(config.run_dir) / "checkpoints")
        raise LostRankError(f"{describe_lost_ranks(world.rank, world.world_size, lost)}; run the same command "
                            f"again to resume from {latest or 'the start (no checkpoint yet)'}")
    finally:
        lock.release()
        stop.close()
        if lost is None:  # a group with a lost member is not destroyed: the CLI ends the process without teardown
            shutdown()


def lock_run_dir(lock: RunLock, world: World, device: torch.device) -> None:
    """Rank 0 takes the run folder's lock; every rank stops with the same error if it could not."""
    error = None
    if world.is_main:
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if any_rank(error is not None, device):
        raise error or ConfigError(f"run_dir={lock.path.parent} is in use by another job (rank 0 says by whom)")


def check_layout_and_resume(config, world: World) -> None:
    """The refusals that need no process group: a batch layout these ranks cannot hold, and a resume that
    would change the samples of the coming steps (elastic.check_resume)."""
    check_batch_layout(config, world)
    try:
        saved = checkpoint.latest_state(Path(config.run_dir) / "checkpoints")
    except CheckpointError:  # a damaged latest checkpoint: choose_intact names it and picks an older one
        return
    if saved is not None:
        check_resume(config, asdict(saved), world.world_size)


def check_batch_layout(config, world: World, canonical_nodes: int | None = None) -> None:
    """TrainConfig.check_layout for these ranks and the nodes they run on."""
    config.train.check_layout(world.world_size, world.world_size // world.local_world_size, canonical_nodes)


def _train(config, world: World, device: torch.device, stop: StopRequest) -> int:
    train_cfg = config.train
    run_dir = Path(config.run_dir)
    config.model.check_device(device.type)
    manifest = ensure_prepared(config, world)
    checkpoints = run_dir / "checkpoints"
    named = checkpoint.latest_name(checkpoints)
    chosen = checkpoint.choose_intact(checkpoints, world.rank, world.world_size)
    if chosen != named:  # fell back to an older checkpoint: check the resume against that one
        check_resume(config, asdict(checkpoint.read_state(checkpoints / chosen)), world.world_size)
    universal = ready_to_resume(checkpoints, manifest.fingerprint, config.data.shard_dir, world, device)
    seed_everything(config.seed)
    with partitioned_construction(config, world.world_size):
        model = LanguageModel(config.model)
    if config.deepspeed.zero_stage != 3:  # ZeRO-3 placed each rank's partitions on its device already
        model = model.to(device)
    engine, _, scheduler = build_engine(model, config, world.world_size, load_universal=universal)
    state = checkpoint.load(engine, checkpoints, world.rank, universal) or checkpoint.TrainerState()
    state.global_batch_size = train_cfg.sequences_per_step(world.world_size)
    state.seed, state.zero_stage, state.data_fingerprint = config.seed, config.deepspeed.zero_stage, manifest.fingerprint
    # the data order is a function of num_canonical_nodes: a resumed run keeps the one its loader state records
    canonical = state.loader.get("num_canonical_nodes", train_cfg.num_canonical_nodes)
    if canonical != train_cfg.num_canonical_nodes:
        log.warning("resuming with the checkpoint's num_canonical_nodes=%d, not train.num_canonical_nodes=%d, "
                    "which would change the data order", canonical, train_cfg.num_canonical_nodes)
        check_batch_layout(config, world, canonical)
        train_cfg.num_canonical_nodes = canonical  # the frozen config records the value the run uses
    state.config_yaml = to_yaml(config)
    if world.is_main:
        (run_dir / "config.yaml").write_text(state.config_yaml)

    shard_dir, cache_dir = config.data.shard_dir, config.data.cache_dir
    vocab = config.model.vocab_size
    # the ranks of a context group read the same rows and each runs the model on its chunk of them
    context = context_group(world.rank, world.world_size, train_cfg.context_parallel)
    replication = train_cfg.context_parallel
    train_loader = build_loader(shard_dir, "train", train_cfg.micro_batch_size, config.seed, cache_dir,
                                config.data.num_workers, vocab_size=vocab, num_canonical_nodes=canonical,
                                replication=replication)
    if state.loader:
        train_loader.load_state_dict(state.loader)
    val_loader = None
    if manifest.splits["val"].samples >= train_cfg.micro_batch_size * train_cfg.data_parallel_ranks(world.world_size):
        val_loader = build_loader(shard_dir, "val", train_cfg.micro_batch_size, config.seed, cache_dir, 0,
                                  shuffle=False, vocab_size=vocab, replication=replication)
    else:
        log.warning("validation split has too few samples for one batch per rank: no validation loss")

    dtype = resolve_precision(train_cfg.precision, device)
    reset_at = manifest.tokenizer["eos_id"] if config.data.document_boundaries == "reset" else None
    peak, peak_source = peak_flops(device, dtype)
    # one optimizer step = `accumulation` micro-batches on every rank = the global batch, whatever the rank count
    accumulation = train_cfg.accumulation_steps(world.world_size)
    tokens_per_step = train_cfg.sequences_per_step(world.world_size) * manifest.seq_len
    throughput = Throughput(train_cfg.log_every, model.forward_flops_per_token(manifest.seq_len),
                            peak, world.world_size, device)
    metrics = MetricsLogger(run_dir, config.wandb, {"config": state.config_yaml}, world.is_main,
                            state.wandb_run_id, train_cfg.max_steps, throughput, start_tokens=state.tokens)
    state.wandb_run_id = metrics.wandb_run_id
    floor = manifest.splits["val"].entropy_floor_nats_per_token
    log.info("training %s: %.2fM parameters, %d steps of %d tokens (%d sequences: micro-batch %d x %d accumulation "
             "x %d ranks%s), %s, ZeRO-%d, peak %.3g FLOP/s (%s)", config.model.family, parameter_count(model) / 1e6,
             train_cfg.max_steps, tokens_per_step, tokens_per_step // manifest.seq_len, train_cfg.micro_batch_size,
             accumulation, train_cfg.data_parallel_ranks(world.world_size),
             f", each sequence split over {context.size} context-parallel ranks" if context else "",
             dtype, config.deepspeed.zero_stage, peak, peak_source)
    set_deterministic(train_cfg.deterministic)
    log.info("kernels: %s%s", describe_backends(device, kernel_backend(config.model)),
             " (deterministic backwards)" if deterministic() else "")

    def save() -> None:
        state.loader = train_loader.state_dict()
        with metrics.excluded("checkpoint"):
            checkpoint.save(engine, checkpoints, state, world.rank, train_cfg.keep_checkpoints)

    def validate() -> float | None:
        if val_loader is None:
            return None
        with metrics.excluded("validation"):
            loss = evaluate(engine, bounded(val_loader, "validation batch", train_cfg.collective_timeout_s), device,
                            dtype, train_cfg.eval_batches, reset_at, context)
        if loss is not None:
            metrics.validation(state.step, loss, floor)
        return loss

    batches = bounded(endless(train_loader), "training batch", train_cfg.collective_timeout_s)
    val_loss = None
    while state.step < train_cfg.max_steps:
        loss_sum = torch.zeros((), device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        grad_norm, drop = None, False
        for micro in range(accumulation):
            loss = lm_loss(engine, next(batches), device, dtype, reset_at=reset_at, context=context)
            loss_sum += loss.detach()
            nonfinite |= ~torch.isfinite(loss.detach())  # on the device: no host sync per micro-step
            engine.backward(loss)  # finite or not, so DeepSpeed's accumulation boundary stays where it is
            if micro == accumulation - 1:
                drop = any_rank(nonfinite, device)  # the step's one host sync, the same answer on every rank
                if drop:
                    check_nonfinite_allowed(train_cfg.nonfinite_loss, state.step + 1, checkpoints)
                drop_next_step(engine, drop)
                grad_norm = None if drop else unclipped_grad_norm(engine)
            engine.step()
        drop_next_step(engine, False)  # when DeepSpeed skipped the step itself, ours was never consumed
        if drop or not engine.was_step_applied():
            state.skipped_steps += 1
            log.warning("non-finite %s at step %d: the step's update is dropped (%d dropped so far)",
                        "loss" if drop else "gradients", state.step + 1, state.skipped_steps)
        state.step += 1
        state.tokens += tokens_per_step
        metrics.train_step(state.step, state.tokens, loss_sum, accumulation, scheduler.get_last_lr()[0],
                           grad_norm if grad_norm is not None else engine.get_global_grad_norm,
                           state.skipped_steps)
        if state.step % train_cfg.eval_every == 0:
            val_loss = validate()
        if stop.agreed(device) or state.step == train_cfg.stop_at_step:
            save()  # ends in a barrier: every rank has saved
            if world.is_main:
                mark_requeue()
            metrics.close()
            log.info("stopped at step %d; exit code %d asks for a requeue", state.step, REQUEUE_EXIT_CODE)
            return REQUEUE_EXIT_CODE
        if state.step % train_cfg.save_every == 0:
            save()

    if state.step % train_cfg.eval_every != 0 or val_loss is None:
        val_loss = validate()
    if checkpoint.latest_tag(checkpoints) != checkpoint.tag_for(state.step):
        save()
    plot = metrics.close()
    if world.is_main:
        report(state, val_loss, floor, plot, checkpoints)
    return 0


def check_nonfinite_allowed(policy: str, step: int, checkpoints: Path) -> None:
    """train.nonfinite_loss=stop: a non-finite loss ends the run, naming the step and the checkpoint to go
    back to; skip lets the trainer drop the step."""
    if policy == "stop":
        last = checkpoint.latest_tag(checkpoints)
        raise TrainingError(f"non-finite loss at step {step}; last good checkpoint: "
                            f"{checkpoints / last if last else 'none'} (train.nonfinite_loss=skip "
                            f"drops such steps instead)")


def report(state, val_loss, floor, plot, checkpoints) -> None:
    line = f"done: step {state.step}, {state.tokens:,} tokens"
    if val_loss is not None:
        line += f"; validation loss {val_loss:.4f} nats/token (perplexity {np.exp(val_loss):.3f})"
        if floor is not None:
            line += (f" vs entropy floor {floor:.4f} (perplexity {np.exp(floor):.3f}): "
                     f"{val_loss - floor:.4f} nats above the best possible")
    print(line)
    print(f"checkpoint: {checkpoints / checkpoint.tag_for(state.step)}" + (f"; plot: {plot}" if plot else ""))
