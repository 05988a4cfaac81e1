"""The Mamba paper's synthetic tasks (Gu & Dao 2023, section 4.1) at laptop scale, for every registered family.

Selective copying: a region of noise tokens holds a few data tokens at random positions; after it come
as many marker tokens, and at each marker the model must output the next data token, in order. Where
the data sit varies, so a fixed (time-invariant) convolution cannot pick them out: the task needs a
content-dependent, *selective* mixer.

Induction heads: a random sequence holds one special token followed by a key; the sequence ends with the
special token again, and the model must output the key. Trained at one length, tested at 4x, 16x, 64x.

The paper's finding: the selective SSMs (Mamba, Mamba-2) solve both and extrapolate; a non-selective
convolutional SSM (S4, here GSS/DSS) does not solve selective copying; attention solves both at the
training length but does not extrapolate far. Each family is a 2-layer models.LanguageModel trained
with a plain AdamW loop on fresh batches; families not registered in this installation are skipped
(and said so). Writes benchmarks/results/synthetic.json with the machine described.

    python benchmarks/synthetic.py                     # every registered family, a few minutes each on 2 cores
    python benchmarks/synthetic.py --families mamba gss --steps 300   # a quicker look
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from benchmarks.run_checkpoint import RunCheckpoint

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100  # target of positions that are not scored

# Selective copying: token 0 is noise, 1..n_data are data, n_data + 1 is the marker.
NOISE = 0
# Induction heads: tokens 0..vocab-1 are ordinary, `vocab` is the special token.


def selective_copying_batch(batch: int, region: int, n_memorize: int, n_data: int,
                            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (batch, region + n_memorize): noise with n_memorize data tokens (values 1..n_data) at random
    distinct positions of the region, then n_memorize markers (n_data + 1). targets: IGNORE except at
    the markers, where the i-th marker's target is the i-th data token of the region."""
    marker = n_data + 1
    ids = torch.full((batch, region + n_memorize), NOISE, dtype=torch.long)
    ids[:, region:] = marker
    positions = torch.rand(batch, region, generator=generator).argsort(-1)[:, :n_memorize].sort(-1).values
    data = torch.randint(1, n_data + 1, (batch, n_memorize), generator=generator)
    ids.scatter_(1, positions, data)
    targets = torch.full_like(ids, IGNORE)
    targets[:, region:] = data
    return ids, targets


def induction_heads_batch(batch: int, seq_len: int, vocab: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (batch, seq_len): ordinary tokens 0..vocab-1, the special token `vocab` once at a random
    position p <= seq_len - 3 followed by the key ids[p + 1], and again at the last position.
    targets: IGNORE except at the last position, whose target is the key."""
    special = vocab
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    where = torch.randint(0, seq_len - 2, (batch,), generator=generator)
    rows = torch.arange(batch)
    ids[rows, where] = special
    ids[:, -1] = special
    targets = torch.full_like(ids, IGNORE)
    targets[:, -1] = ids[rows, where + 1]
    return ids, targets


def build_model(family: str, args, vocab_size: int):
    from ssmforge.models import AttentionConfig, GSSConfig, LanguageModel, Mamba2Config, MambaConfig, ModelConfig

    config = ModelConfig(family=family, d_model=args.d_model, n_layer=2, vocab_size=vocab_size,
                         mamba=MambaConfig(d_state=16), mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=64),
                         gss=GSSConfig(d_state=16), attention=AttentionConfig(heads=4), rescale_out_proj=True)
    return LanguageModel(config)


def scored_accuracy(model, ids: torch.Tensor, targets: torch.Tensor, batch: int) -> float:
    """Share of scored positions whose argmax prediction (over the real vocabulary) is the target."""
    vocab = model.config.vocab_size
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            logits = model(ids[start:start + batch])[..., :vocab]
            t = targets[start:start + batch]
            mask = t != IGNORE
            correct += (logits.argmax(-1)[mask] == t[mask]).sum().item()
            total += mask.sum().item()
    model.train()
    return correct / total


def train(model, make_batch, steps: int, lr: float, log_every: int, name: str,
          checkpoint: RunCheckpoint | None = None) -> list[float]:
    """AdamW on fresh batches, loss on the scored positions only; linear warmup then cosine decay. A run whose loss
    is no longer a number stops there (its weights are lost; hours of further steps would change nothing): the
    losses returned are then fewer than `steps`, the last one not finite. With a checkpoint the run saves itself
    every `checkpoint.every` steps and at its end, and a run stopped on the way continues from its last save
    exactly as if it had not stopped (run_checkpoint); `checkpoint.seconds` is then its training time over every
    sitting."""
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses = checkpoint.load(model, optim, schedule) if checkpoint else []
    if losses:
        for _ in losses:  # the batches the stopped run consumed, drawn again so the data order is unchanged
            make_batch()
        print(f"  {name}: resumed at step {len(losses)}/{steps} from {checkpoint.path}", flush=True)
    start = time.perf_counter() - (checkpoint.seconds if checkpoint else 0.0)
    diverged = bool(losses) and not math.isfinite(losses[-1])  # a run saved after diverging stays stopped
    model.train()
    for step in range(len(losses), len(losses) if diverged else steps):
        ids, targets = make_batch()
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"  {name} step {step + 1}/{steps}: loss {losses[-1]}: diverged, stopped", flush=True)
            break
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  {name} step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
        if checkpoint and (step + 1) % checkpoint.every == 0 and step + 1 < steps:
            checkpoint.save(model, optim, schedule, losses, time.perf_counter() - start)
    if checkpoint:
        checkpoint.save(model, optim, schedule, losses, time.perf_counter() - start)
    return losses


def run_family(family: str, args) -> dict:
    result = {}
    g = torch.Generator().manual_seed(args.seed)
    if "copying" in args.tasks:
        result["selective_copying"] = run_copying(family, args, g)
    if "induction" in args.tasks:
        result["induction_heads"] = run_induction(family, args, g)
    return result


def run_copying(family: str, args, g: torch.Generator) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(family, args, vocab_size=args.copy_data + 2)
    batch = lambda n: selective_copying_batch(n, args.copy_region, args.copy_tokens, args.copy_data, g)  # noqa: E731
    start = time.perf_counter()
    losses = train(model, lambda: batch(args.batch), args.steps, args.lr, args.log_every, f"{family} copying")
    seconds = time.perf_counter() - start
    ids, targets = batch(args.eval_samples)
    return dict(accuracy=scored_accuracy(model, ids, targets, args.batch), final_loss=sum(losses[-20:]) / 20,
                train_seconds=seconds, parameters=model.num_parameters())


def run_induction(family: str, args, g: torch.Generator) -> dict:
    """Trained at one length, tested at 1x, 4x, 16x and 64x it."""
    torch.manual_seed(args.seed)
    model = build_model(family, args, vocab_size=args.induction_vocab + 1)
    start = time.perf_counter()
    losses = train(model, lambda: induction_heads_batch(args.batch, args.induction_len, args.induction_vocab, g),
                   args.steps, args.lr, args.log_every, f"{family} induction")
    seconds = time.perf_counter() - start
    by_length = {}
    for factor in (1, 4, 16, 64):
        length = factor * args.induction_len
        samples = max(64, args.eval_samples // factor)
        ids, targets = induction_heads_batch(samples, length, args.induction_vocab, g)
        by_length[str(length)] = scored_accuracy(model, ids, targets, max(1, args.batch // factor))
    return dict(accuracy_by_length=by_length, final_loss=sum(losses[-20:]) / 20, train_seconds=seconds,
                parameters=model.num_parameters())


def print_table(results: dict, train_len: int) -> None:
    lengths = [str(f * train_len) for f in (1, 4, 16, 64)]
    print(f"\n{'family':12} {'sel. copying':>12} " + " ".join(f"{'ind@' + n:>9}" for n in lengths) + f" {'seconds':>8}")
    for family, r in results.items():
        copy = r.get("selective_copying", {}).get("accuracy")
        ind = r.get("induction_heads", {}).get("accuracy_by_length", {})
        cells = [f"{copy:12.3f}" if copy is not None else f"{'-':>12}"]
        cells += [f"{ind[n]:9.3f}" if n in ind else f"{'-':>9}" for n in lengths]
        print(f"{family:12} " + " ".join(cells) + f" {r['total_seconds']:8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=["mamba", "mamba2", "gss", "transformer"])
    p.add_argument("--tasks", nargs="*", default=["copying", "induction"], choices=["copying", "induction"])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--copy-region", type=int, default=64, help="selective copying: length of the noisy region")
    p.add_argument("--copy-tokens", type=int, default=8, help="selective copying: data tokens to memorise")
    p.add_argument("--copy-data", type=int, default=8, help="selective copying: distinct data token values")
    p.add_argument("--induction-len", type=int, default=64, help="induction heads: training sequence length")
    p.add_argument("--induction-vocab", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "synthetic.json"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import describe
    from ssmforge.models import FAMILIES, SYMBOLS

    results, skipped = {}, {}
    for family in args.families:
        unit = FAMILIES.get(family)
        missing = sorted(set(unit) - set(SYMBOLS)) if unit else None
        if unit is None or missing:
            skipped[family] = ("not a family" if unit is None else
                               f"mixer symbol(s) {missing} not registered in this installation")
            print(f"skipping {family}: {skipped[family]}")
            continue
        print(f"{family}:", flush=True)
        start = time.perf_counter()
        results[family] = run_family(family, args)
        results[family]["total_seconds"] = time.perf_counter() - start

    print_table(results, args.induction_len)
    report = dict(machine=describe(), settings={k: v for k, v in vars(args).items() if k != "out"},
                  results=results, skipped=skipped)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
