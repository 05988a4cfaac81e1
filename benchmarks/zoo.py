"""The Mamba-360 survey's comparison of sequence-mixer families, at laptop scale, at a matched parameter count.

Every registered family among mamba, mamba2, gss, s4, s4d, dss, h3, hyena, lru, liquid_s4 and transformer is a
2-layer models.LanguageModel whose width d_model (a multiple of 8 that the family's sections accept) is chosen
so that its parameters outside the embedding / LM head are within 10% of one target (default: Mamba's at
d_model 64); a family whose closest width misses that is refused, one not registered in this installation or
whose module raises NotImplementedError when built is skipped, each said so in the output and the JSON. Small
per-family section overrides for this scale are in OVERRIDES below; the transformer's MLP width is fitted to the
target as well (its count moves ~35% per d_model step of 8, so d_model alone never lands within 10%).

Tasks, each trained with benchmarks/synthetic.py's AdamW loop (warm-up, cosine decay, clipping) on fresh
batches, after a learning-rate sweep (`--lrs`, `--sweep-steps` each, best by validation loss at the scored
positions, every point recorded) at the chosen rate for `--steps`: one rate for every parameter (the per-parameter
rates, `ssm_lr`, `filter_lr` and `ssm_lr_factor`, are settings of `ssmforge pretrain`, not applied here). With `--sweep-steps` equal to `--steps` every
rate trains the whole budget and the best run is the result: short probes cannot rank rates on tasks that are
learnt in a sudden transition after a plateau (selective copying, induction heads).

  lm          language modelling on an order-k Markov chain over a small vocabulary (MarkovSource: sparse
              Dirichlet rows mixed with a little uniform mass, so the chain is ergodic), sequences started from
              its stationary distribution; the entropy floor is the chain's entropy rate, computed exactly from
              the stationary distribution, and chance is the entropy of its unigram marginal (a model that
              ignores the context). Reported: validation loss in nats beside the floor.
  copying     selective copying (benchmarks/synthetic.selective_copying_batch): accuracy at the markers;
              chance 1 / (number of data values). Also stored: the order-blind accuracy (the best guess from
              the data values' counts alone, which a model that only sums token embeddings can approach).
  induction   induction heads (benchmarks/synthetic.induction_heads_batch) trained at 64 tokens, tested at 64,
              256, 1024 and 4096: accuracy at the last position; chance 1 / vocabulary.
  speed       training tokens/s (forward + backward) and peak memory (the CUDA allocator's peak, or the growth
              of the process's resident high-water mark, measured in a process of its own) at one length.

A result that is not above chance by more than 2 standard errors (the binomial standard error of a guesser at
chance, over the scored positions; for the LM the standard error of the per-sequence mean loss) is labelled
"chance" in every table, figure and JSON row (`at_chance: true`, `value: null`); the counts stay in the row. A
run is `converged` when its mean training loss over the last 10% of steps moved by less than `--converge-tol`
relative to the previous 10% (the denominator floored at 0.05 nats). Under the cosine schedule the loss also
falls as the rate anneals, so a merged report adds a second test (`budget_checks`): a row that replaced a run of
the same family, task and lr at half its steps or fewer, and scored the same within 2 standard errors of the
difference, is converged too (more training did not change the result). Rows that pass neither are marked: "‡"
when every score is within SATURATED_WITHIN of 1.000 (more training can raise it by at most that), "†" otherwise.

The printed table sets the Mamba paper's published numbers (PUBLISHED) beside ours. Writes
benchmarks/results/zoo.json (machine, command line, every row, rewritten as each row completes, so a long run
can be stopped) and benchmarks/results/zoo.png. `--merge A.json B.json ...` joins runs into one report (a later
file's row replaces an earlier one's; runs with another parameter target, other task settings or other model
overrides are refused), so a task can be rerun at a larger budget or a stopped run completed without training the
rest again. `--table DIR` runs TABLE_RUNS, the per-task budgets of the published table, and merges them: one
command, resumable part by part.

    python benchmarks/zoo.py                                  # every family: roughly an hour on 2 cores (an
                                                              # estimate from synthetic.py's step times)
    python benchmarks/zoo.py --families mamba transformer --steps 300 --tasks copying induction
    python benchmarks/zoo.py --smoke                          # seconds: tiny sizes, a check of the machinery
    python benchmarks/zoo.py --tasks copying --steps 4000 --sweep-steps 4000 --lrs 1e-3 3e-3 --out copying.json
    python benchmarks/zoo.py --merge benchmarks/results/zoo.json copying.json   # copying's rows replaced
    python benchmarks/zoo.py --families gss --tasks induction --override gss.ssm_dim=64   # another model setting
    python benchmarks/zoo.py --table runs/zoo      # every run behind the README's table (TABLE_RUNS), merged
    python benchmarks/zoo.py --families gss --tasks copying --steps 384000 --sweep-steps 384000 --lrs 1e-2 \
        --checkpoint-dir runs/saved                   # saved every 1,000 steps: run again, it resumes exactly
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_checkpoint import CheckpointMismatch, RunCheckpoint  # noqa: E402
from benchmarks.synthetic import IGNORE, induction_heads_batch, selective_copying_batch, train  # noqa: E402

FAMILIES = ("mamba", "mamba2", "gss", "s4", "s4d", "dss", "h3", "hyena", "lru", "liquid_s4", "transformer")
TASKS = ("lm", "copying", "induction", "speed")
N_LAYER = 2
TOLERANCE = 0.10  # matched parameter counts: within 10% of the target
# an accuracy within this of 1.000 is marked saturated (‡) rather than unconverged (†): more training can raise
# it by at most this much
SATURATED_WITHIN = 0.01

# Resolved when a model is built: the length the task trains at, the longest length any task runs at, and a
# width fitted to the parameter target (at most one FIT key per family; FIT_RATIO: its default ratio to d_model).
TRAIN_LENGTH = "<training length>"
LONGEST = "<longest length>"
FIT = "<fitted to the parameter target>"

# Per-family section overrides where the papers' defaults are too large for a ~50k-parameter, 2-layer model
# (the sections' other keys keep their defaults). The transformer's MLP keeps its default width (8/3 d_model).
OVERRIDES: dict[str, dict[str, dict]] = {
    "mamba": {"mamba": dict(d_state=16)},
    "mamba2": {"mamba2": dict(d_state=16, headdim=16, chunk_size=64)},
    "gss": {"gss": dict(d_state=16)},
    "s4": {"s4": dict(d_state=16)},
    "s4d": {"s4d": dict(d_state=16)},
    "dss": {"dss": dict(d_state=16, softmax_length=TRAIN_LENGTH)},
    "h3": {"h3": dict(d_state=16)},
    "hyena": {"hyena": dict(l_max=LONGEST)},  # the implicit filters are defined up to l_max
    "lru": {"lru": dict(d_state=64)},  # default 256: B and C alone would outweigh the whole budget
    "liquid_s4": {"liquid_s4": dict(d_state=16)},
    # d_model in steps of 8 moves a 2-layer transformer's count by ~35% per step at this scale (d_model^2 terms
    # only), so no width lands within 10%: its MLP width is fitted too (a multiple of 8 between 1 and 4 d_model,
    # the width/d_model ratio closest to the default 8/3 among the d_model that match)
    "transformer": {"attention": dict(heads=4), "mlp": dict(hidden=FIT)},
}
FIT_RATIO = {"transformer": 8 / 3}

# The Mamba paper's synthetic-task results, quoted beside ours (their scale: 2-layer models of d_model 64,
# selective copying at length 4096 with 16 data tokens, induction heads trained at 256 and tested to 2^20).
PUBLISHED = {
    "citation": ("A. Gu and T. Dao, \"Mamba: Linear-Time Sequence Modeling with Selective State Spaces\", "
                 "arXiv:2312.00752 (2023), Table 1 (selective copying) and Table 2 (induction heads); the "
                 "comparison as surveyed in B. N. Patro and V. S. Agneeswaran, \"Mamba-360: Survey of State "
                 "Space Models as Transformer Alternatives for Long Sequence Modelling\", arXiv:2404.16112 (2024)"),
    "selective_copying": {  # accuracy
        "s4": "18.3%",  # S4 layer, no gate
        "h3": "57.0%",  # H3 architecture, S4 layer
        "hyena": "30.1%",  # H3 architecture, Hyena layer
        "mamba": "97.0-99.8%",  # the S6 layer in any of the architectures (Mamba's own: 99.8%)
    },
    "induction_heads_train_length": 256,
    "induction_heads": {
        "transformer": "attention (MHA-Abs/RoPE/xPos) solves it at the training length, fails beyond ~2x",
        "h3": "fails beyond the training length",
        "hyena": "fails beyond the training length",
        "mamba": "solves it to 1M tokens (2^20, 4000x the training length)",
    },
}

# The runs behind the README's table and benchmarks/results/zoo.json, in order (a later part's row replaces an
# earlier one's): `--table DIR` trains each into DIR and merges them. Families still short of the task after the
# first budget (copying below 1.000, induction at chance or its loss still moving) get longer runs; benchmarks/zoo.md
# says why each.
TABLE_RUNS = {
    "lm": ["--tasks", "lm", "--steps", "1000", "--lrs", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"],
    "copying": ["--tasks", "copying", "--steps", "4000", "--sweep-steps", "4000", "--lrs", "1e-3", "3e-3"],
    # the same sweep widened where its best rate sat on the grid's edge (--merge joins them): 1e-2 for the nine
    # families that chose 3e-3, 3e-2 for the six that then chose 1e-2, 1e-1 for the two that then chose 3e-2,
    # 3e-4 for the two that chose 1e-3. The longer runs below were chosen by the two-rate sweep, before it was
    # widened, except GSS's last two
    "copying-1e-2": ["--families", "mamba", "mamba2", "gss", "s4", "s4d", "dss", "h3", "hyena", "liquid_s4",
                     "--tasks", "copying", "--steps", "4000", "--sweep-steps", "4000", "--lrs", "1e-2"],
    "copying-3e-2": ["--families", "gss", "s4", "s4d", "dss", "h3", "liquid_s4", "--tasks", "copying", "--steps",
                     "4000", "--sweep-steps", "4000", "--lrs", "3e-2"],
    "copying-1e-1": ["--families", "dss", "liquid_s4", "--tasks", "copying", "--steps", "4000", "--sweep-steps",
                     "4000", "--lrs", "1e-1"],
    "copying-3e-4": ["--families", "lru", "transformer", "--tasks", "copying", "--steps", "4000", "--sweep-steps",
                     "4000", "--lrs", "3e-4"],
    # 12,000 steps at the rate the 4,000-step sweep chose, for every family still short of 1.000 there; Mamba-2's
    # 3e-3 went NaN over 12,000 steps (the CPU kernels' SiLU overflow, fixed since), so it ran 8,000 at 1e-3
    "copying-12k": ["--families", "gss", "s4", "s4d", "dss", "h3", "hyena", "liquid_s4", "--tasks", "copying",
                    "--steps", "12000", "--sweep-steps", "12000", "--lrs", "3e-3"],
    "copying-12k-1e-3": ["--families", "lru", "transformer", "--tasks", "copying", "--steps", "12000",
                         "--sweep-steps", "12000", "--lrs", "1e-3"],
    "copying-8k-mamba2": ["--families", "mamba2", "--tasks", "copying", "--steps", "8000", "--sweep-steps", "8000",
                          "--lrs", "1e-3"],
    # 24,000 steps at the same rates for the 12,000-step rows whose loss still moved: each is checked against its
    # 12,000-step run (budget_checks)
    "copying-24k": ["--families", "gss", "s4", "s4d", "dss", "hyena", "liquid_s4", "--tasks", "copying",
                    "--steps", "24000", "--sweep-steps", "24000", "--lrs", "3e-3"],
    "copying-24k-lru": ["--families", "lru", "--tasks", "copying", "--steps", "24000", "--sweep-steps", "24000",
                        "--lrs", "1e-3"],
    "copying-24k-h3": ["--families", "h3", "--tasks", "copying", "--steps", "24000", "--sweep-steps", "24000",
                       "--lrs", "3e-3"],
    # GSS and LRU, the furthest from 1.000 at 24,000 steps, once more doubled
    "copying-48k-gss": ["--families", "gss", "--tasks", "copying", "--steps", "48000", "--sweep-steps", "48000",
                        "--lrs", "3e-3"],
    "copying-48k-lru": ["--families", "lru", "--tasks", "copying", "--steps", "48000", "--sweep-steps", "48000",
                        "--lrs", "1e-3"],
    # H3 and GSS, still more than 0.01 short of 1.000, doubled once more
    "copying-48k-h3": ["--families", "h3", "--tasks", "copying", "--steps", "48000", "--sweep-steps", "48000",
                       "--lrs", "3e-3"],
    "copying-96k-gss": ["--families", "gss", "--tasks", "copying", "--steps", "96000", "--sweep-steps", "96000",
                        "--lrs", "3e-3"],
    # H3, still more than 0.01 short at 48,000 steps
    "copying-96k-h3": ["--families", "h3", "--tasks", "copying", "--steps", "96000", "--sweep-steps", "96000",
                       "--lrs", "3e-3"],
    # the saturated rows (‡), S4, S4D and DSS at 24,000 steps and LRU at 48,000, doubled once more
    "copying-48k": ["--families", "s4", "s4d", "dss", "--tasks", "copying", "--steps", "48000", "--sweep-steps",
                    "48000", "--lrs", "3e-3"],
    "copying-96k-lru": ["--families", "lru", "--tasks", "copying", "--steps", "96000", "--sweep-steps", "96000",
                        "--lrs", "1e-3"],
    # Liquid-S4 (‡ at 24,000) and S4D (‡ at 48,000), doubled once more
    "copying-48k-liquid": ["--families", "liquid_s4", "--tasks", "copying", "--steps", "48000", "--sweep-steps",
                           "48000", "--lrs", "3e-3"],
    "copying-96k-s4d": ["--families", "s4d", "--tasks", "copying", "--steps", "96000", "--sweep-steps", "96000",
                        "--lrs", "3e-3"],
    # GSS, still more than 0.01 short at 96,000 steps, at the rate its widened sweep prefers: 96,000 steps (joining
    # the 96,000-step sweep, the half-budget check of the next) and 192,000
    "copying-96k-gss-1e-2": ["--families", "gss", "--tasks", "copying", "--steps", "96000", "--sweep-steps",
                             "96000", "--lrs", "1e-2"],
    "copying-192k-gss-1e-2": ["--families", "gss", "--tasks", "copying", "--steps", "192000", "--sweep-steps",
                              "192000", "--lrs", "1e-2"],
    # DSS and Liquid-S4 at 3e-2, the rate their widened 4,000-step sweep prefers, joining the 24,000-step sweeps
    # (it wins DSS's, loses Liquid-S4's), and DSS at 48,000, joining that sweep (3e-3 keeps the row)
    "copying-24k-3e-2": ["--families", "dss", "liquid_s4", "--tasks", "copying", "--steps", "24000", "--sweep-steps",
                         "24000", "--lrs", "3e-2"],
    "copying-48k-dss-3e-2": ["--families", "dss", "--tasks", "copying", "--steps", "48000", "--sweep-steps",
                             "48000", "--lrs", "3e-2"],
    # DSS (‡ at 48,000 steps at 3e-3, its loss still moving 2.09%), doubled once more at the rate that keeps its row
    "copying-96k-dss": ["--families", "dss", "--tasks", "copying", "--steps", "96000", "--sweep-steps", "96000",
                        "--lrs", "3e-3"],
    # GSS (still more than 0.01 short at 192,000 steps at 1e-2, its loss moving 7.2%), doubled once more
    "copying-384k-gss-1e-2": ["--families", "gss", "--tasks", "copying", "--steps", "384000", "--sweep-steps",
                              "384000", "--lrs", "1e-2"],
    # Liquid-S4 (‡ at 48,000 steps, its loss moving 2.02%), doubled once more
    "copying-96k-liquid": ["--families", "liquid_s4", "--tasks", "copying", "--steps", "96000", "--sweep-steps",
                           "96000", "--lrs", "3e-3"],
    # induction scored on 512 sequences at every length (2 standard errors of chance: 0.021)
    "induction": ["--tasks", "induction", "--steps", "2000", "--sweep-steps", "2000", "--lrs", "1e-3", "3e-3",
                  "--eval-min-samples", "512"],
    "induction-6k": ["--families", "s4d", "dss", "gss", "--tasks", "induction", "--steps", "6000", "--sweep-steps",
                     "6000", "--lrs", "1e-3", "--eval-min-samples", "512"],
    "induction-12k": ["--families", "lru", "--tasks", "induction", "--steps", "12000", "--sweep-steps", "12000",
                      "--lrs", "1e-3", "--eval-min-samples", "512"],
    "induction-6k-transformer": ["--families", "transformer", "--tasks", "induction", "--steps", "6000",
                                 "--sweep-steps", "6000", "--lrs", "1e-3", "3e-3", "--eval-min-samples", "512"],
    "speed": ["--tasks", "speed"],  # timings: alone on the machine
}

SMOKE = dict(steps=3, sweep_steps=1, batch=4, lm_length=24, copy_region=12, copy_tokens=4, induction_len=16,
             test_lengths=[16, 64, 256], eval_samples=16, eval_min_samples=8, speed_length=64, speed_batch=2,
             speed_steps=1, log_every=0, threads=1)


# ---------------------------------------------------------------------------------------------------------------
# The language-modelling source and its entropy floor


class MarkovSource:
    """An order-`order` Markov chain over `vocab` tokens given by its table (vocab^order contexts, vocab): row s is
    P(next | context s), context index s = sum_i x_{t-order+i} vocab^(order-1-i) (the oldest token first)."""

    def __init__(self, table: np.ndarray, order: int):
        table = np.asarray(table, dtype=np.float64)
        self.order, self.vocab = order, table.shape[1]
        if table.shape != (self.vocab ** order, self.vocab) or not np.allclose(table.sum(1), 1):
            raise ValueError(f"table {table.shape}: expected ({self.vocab}^{order}, {self.vocab}) rows summing to 1")
        self.table = table
        self.cum = np.cumsum(table, 1)
        self.stationary = self._stationary()
        rows = np.where(table > 0, -table * np.log(np.where(table > 0, table, 1)), 0.0).sum(1)
        self.entropy_rate = float(self.stationary @ rows)  # nats per token: the floor of any model's loss
        marginal = self.stationary @ table
        self.unigram_entropy = float(-(marginal[marginal > 0] * np.log(marginal[marginal > 0])).sum())

    @classmethod
    def random(cls, vocab: int, order: int, branching: int, uniform: float, seed: int) -> "MarkovSource":
        """`branching` successors per context with Dirichlet(1) weights, mixed with `uniform` of uniform mass
        (every transition possible: one stationary distribution, which the sequences start from)."""
        rng = np.random.default_rng(seed)
        table = np.full((vocab ** order, vocab), uniform / vocab)
        for row in table:
            row[rng.choice(vocab, branching, replace=False)] += (1 - uniform) * rng.dirichlet(np.ones(branching))
        return cls(table, order)

    def _stationary(self, tol: float = 1e-15, max_iter: int = 1_000_000) -> np.ndarray:
        """The stationary distribution over contexts, by power iteration (to float precision)."""
        n, v = self.table.shape
        pi = np.full(n, 1.0 / n)
        for _ in range(max_iter):
            new = self._advance(pi)
            if np.abs(new - pi).sum() < tol:
                return new / new.sum()
            pi = new
        raise RuntimeError("the Markov chain's stationary distribution did not converge")

    def _advance(self, pi: np.ndarray) -> np.ndarray:
        """Context distribution one step later: (a, rest) -> (rest, c) with probability P[(a, rest), c]."""
        v = self.vocab
        joint = (pi[:, None] * self.table).reshape(v, -1, v)
        return joint.sum(0).reshape(-1)

    def sample(self, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n sequences of `length` tokens started from the stationary distribution, and the exact -ln P of
        every token given those before it (the first `order` tokens, the initial context: nan)."""
        k, v = self.order, self.vocab
        state = rng.choice(len(self.stationary), n, p=self.stationary)
        ids = np.empty((n, length), dtype=np.int64)
        nats = np.full((n, length), np.nan)
        for i in range(k):  # decode the initial context, oldest token first
            ids[:, i] = (state // v ** (k - 1 - i)) % v
        for t in range(k, length):
            u = rng.random(n)
            token = np.minimum((u[:, None] > self.cum[state]).sum(1), v - 1)
            ids[:, t] = token
            nats[:, t] = -np.log(self.table[state, token])
            state = (state * v) % (v ** k) + token
        return ids, nats

    def batch(self, n: int, length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """ids (n, length) and next-token targets, IGNORE where the target is part of the initial context (its
        loss is not the entropy rate's); and the exact -ln P of every scored target (nan elsewhere)."""
        seq, nats = self.sample(n, length + 1, rng)
        ids, targets = torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(seq[:, 1:].copy())
        targets[:, : self.order - 1] = IGNORE
        return ids, targets, nats[:, 1:]


def lm_source(args) -> MarkovSource:
    return MarkovSource.random(args.lm_vocab, args.lm_order, args.lm_branching, args.lm_uniform, args.lm_seed)


# ---------------------------------------------------------------------------------------------------------------
# Chance labelling


def accuracy_score(hits: int, n: int, chance: float) -> dict:
    """A measured accuracy of `hits` out of `n`, labelled at chance when it is not above chance by more than two
    standard errors of a guesser at chance (binomial, sqrt(p (1 - p) / n)): then `value` is None."""
    se = math.sqrt(chance * (1 - chance) / n) if n else float("inf")
    accuracy = hits / n if n else 0.0
    at_chance = bool(accuracy <= chance + 2 * se)
    return dict(value=None if at_chance else accuracy, at_chance=at_chance, chance=chance, se=se, hits=int(hits),
                n=int(n))


def loss_score(sequence_losses: np.ndarray, tokens: int, chance: float) -> dict:
    """A validation loss (nats per token) from per-sequence mean losses: at chance when it is not below the
    chance loss by more than two standard errors of the mean over sequences; then `value` is None."""
    sequence_losses = np.asarray(sequence_losses, dtype=np.float64)
    n = len(sequence_losses)
    mean = float(sequence_losses.mean()) if n else float("nan")
    se = float(sequence_losses.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    at_chance = bool(not math.isfinite(mean) or mean >= chance - 2 * se)
    return dict(value=None if at_chance else mean, at_chance=at_chance, chance=chance, se=se if math.isfinite(se)
                else None, n=n, tokens=int(tokens), measured_nats=mean if math.isfinite(mean) else None)


def order_blind_accuracy(tokens: int, values: int) -> float:
    """Selective copying's best accuracy without the positions: knowing only which data values occur how often
    (what a model that merely counts tokens can know), every marker's target is one of them with probability
    count / tokens, so the best guess is the most frequent value: E[max count] / tokens, exactly (the
    distribution of the largest multinomial count, by exponential generating functions)."""
    expected_max = 0.0
    for m in range(tokens):  # E[max] = sum_{m >= 0} P(max > m); P(max <= m) = k! [x^k] (sum_{j<=m} x^j/j!)^n / n^k
        poly = np.array([1 / math.factorial(j) for j in range(m + 1)])
        power = np.array([1.0])
        for _ in range(values):
            power = np.convolve(power, poly)[: tokens + 1]
        at_most = math.factorial(tokens) * power[tokens] / values ** tokens if len(power) > tokens else 0.0
        expected_max += 1 - at_most
    return expected_max / tokens


def cell(score: dict | None, fmt: str = "{:.3f}") -> str:
    """A table cell: "chance" for a result at chance, never its number."""
    if score is None:
        return "-"
    return "chance" if score["at_chance"] else fmt.format(score["value"])


# ---------------------------------------------------------------------------------------------------------------
# Models at a matched parameter count


def with_user_overrides(overrides: dict, settings: list[str]) -> dict:
    """`overrides` with each --override SECTION.KEY=VALUE set in every family that has SECTION; ValueError naming
    the setting when it is malformed or no family has that section."""
    merged = copy.deepcopy(overrides)
    for setting in settings:
        name, sep, text = setting.partition("=")
        section, dot, key = name.partition(".")
        if not (sep and dot and section and key):
            raise ValueError(f"--override {setting!r} is not SECTION.KEY=VALUE")
        owners = [family for family, sections in merged.items() if section in sections]
        if not owners:
            known = sorted({s for sections in merged.values() for s in sections})
            raise ValueError(f"--override {setting!r}: no family has a section {section!r} (one of {', '.join(known)})")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        for family in owners:
            merged[family][section][key] = value
    return merged


def resolve(value, train_length: int, longest: int, fit: int | None):
    if value == FIT and fit is None:
        raise ValueError("a FIT override needs its fitted value")
    return {TRAIN_LENGTH: train_length, LONGEST: longest, FIT: fit}.get(value, value) if isinstance(value, str) \
        else value


def fit_key(family: str, overrides: dict = OVERRIDES) -> str | None:
    """`section.key` of the family's FIT override, or None."""
    keys = [f"{s}.{k}" for s, o in overrides.get(family, {}).items() for k, v in o.items() if v == FIT]
    return keys[0] if keys else None


def model_config(family: str, d_model: int, vocab: int, train_length: int, longest: int,
                 fit: int | None = None, overrides: dict = OVERRIDES) -> dict:
    """The ModelConfig (as a dict for ModelConfig.from_dict) of `family` at d_model, with its `overrides` (OVERRIDES
    and any --override; `fit`: the value of its FIT key, if it has one)."""
    sections = {name: {k: resolve(v, train_length, longest, fit) for k, v in keys.items()}
                for name, keys in overrides.get(family, {}).items()}
    return dict(family=family, d_model=d_model, n_layer=N_LAYER, vocab_size=vocab, rescale_out_proj=True, **sections)


def build(config: dict):
    from ssmforge.models import LanguageModel, ModelConfig

    return LanguageModel(ModelConfig.from_dict(copy.deepcopy(config)))


def non_embedding_parameters(model) -> int:
    """Parameters outside the embedding and the LM head (tied or not)."""
    skip = {id(model.embedding.weight), id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def availability(family: str) -> str | None:
    """Why `family` cannot run in this installation, or None."""
    from ssmforge.models import FAMILIES as REGISTERED, SYMBOLS

    unit = REGISTERED.get(family)
    if unit is None:
        return "not a registered family in this installation"
    missing = sorted(set(unit) - set(SYMBOLS))
    return f"mixer symbol(s) {missing} not registered in this installation" if missing else None


def default_target(args) -> int:
    """Mamba's parameters outside the embedding / LM head at d_model 64, n_layer 2 (with its overrides)."""
    return non_embedding_parameters(build(model_config("mamba", 64, 16, args.lm_length, longest_length(args),
                                                       overrides=args.overrides)))


def match_parameters(family: str, target: int, args, max_d_model: int = 2048) -> dict:
    """The d_model (a multiple of 8 the family's sections accept) whose parameter count outside the embedding /
    LM head is closest to `target` (for a family with a FIT key, that key fitted at each d_model, then the d_model
    whose fitted width is closest to FIT_RATIO among those within 10%). status: "ok" when within 10%, "refused"
    when none is, "skipped" when the family cannot be built (NotImplementedError, or no width is valid).
    Every width tried is in `search` as [d_model, count] or [d_model, count, fitted value]."""
    from ssmforge.models import ConfigError

    longest, key = longest_length(args), fit_key(family, args.overrides)

    def count(d_model: int, fit: int | None = None) -> int:
        return non_embedding_parameters(build(model_config(family, d_model, 16, args.lm_length, longest, fit,
                                                           args.overrides)))

    search, first_error = [], None
    for d_model in range(8, max_d_model + 1, 8):
        try:
            if key is None:
                n = count(d_model)
                search.append([d_model, n])
            else:  # the count is linear in the fitted width: two builds give it, a third checks the fit
                low, high = 8 * max(1, round(d_model / 8)), 8 * max(2, round(4 * d_model / 8))
                n_low, n_high = count(d_model, low), count(d_model, high)
                per = (n_high - n_low) / (high - low)
                fit = min(high, max(low, 8 * round((low + (target - n_low) / per) / 8)))
                n = count(d_model, fit)
                search.append([d_model, n, fit])
                n = n_low  # for the stop below: the smallest count at this d_model
        except ConfigError as e:
            first_error = first_error or str(e)
            continue
        except NotImplementedError as e:
            return dict(status="skipped", reason=f"NotImplementedError at construction: {e}")
        if n > 1.5 * target:
            break
    if not search:
        return dict(status="skipped", reason=f"no d_model up to {max_d_model} is valid ({first_error})")
    off = lambda point: abs(point[1] / target - 1)  # noqa: E731
    best = min(search, key=off)
    if key is not None:
        matched = [point for point in search if off(point) <= TOLERANCE]
        if matched:
            best = min(matched, key=lambda point: abs(math.log(point[2] / point[0] / FIT_RATIO[family])))
    d_model, n = best[:2]
    fit = best[2] if key is not None else None
    config = model_config(family, d_model, 16, args.lm_length, longest, fit, args.overrides)
    info = dict(d_model=d_model, n_layer=N_LAYER, parameters=n, target=target, ratio=n / target, fit=fit,
                fit_key=key, search=search, sections={k: v for k, v in config.items() if isinstance(v, dict)})
    if off(best) > TOLERANCE:
        info.update(status="refused", reason=f"closest d_model {d_model} has {n:,} parameters, "
                    f"{n / target:.2f}x the target {target:,} (more than {TOLERANCE:.0%} off)")
    else:
        info["status"] = "ok"
    return info


def longest_length(args) -> int:
    return max([args.lm_length, args.copy_region + args.copy_tokens, args.induction_len, args.speed_length,
                *args.test_lengths])


# ---------------------------------------------------------------------------------------------------------------
# Training and scoring


def evaluate(model, ids: torch.Tensor, targets: torch.Tensor, batch: int) -> dict:
    """Per-sequence sums of the loss and of the hits at the scored positions, and their counts."""
    vocab = model.config.vocab_size
    nll, hits, counts = [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            logits = model(ids[start:start + batch])[..., :vocab].float()
            t = targets[start:start + batch]
            mask = t != IGNORE
            losses = F.cross_entropy(logits.transpose(1, 2), t.clamp(min=0), reduction="none") * mask
            nll.append(losses.sum(1).double().cpu())
            hits.append(((logits.argmax(-1) == t) & mask).sum(1).cpu())
            counts.append(mask.sum(1).cpu())
    model.train()
    nll, hits, counts = torch.cat(nll).numpy(), torch.cat(hits).numpy(), torch.cat(counts).numpy()
    return dict(nll=nll, hits=hits, counts=counts, loss=float(nll.sum() / max(1, counts.sum())))


def convergence(losses: list[float], tol: float) -> dict:
    """Mean training loss over the last 10% of steps against the previous 10%."""
    window = max(1, len(losses) // 10)
    if len(losses) < 2 * window or len(losses) < 2:
        return dict(converged=None, reason="too few steps")
    last, previous = np.mean(losses[-window:]), np.mean(losses[-2 * window:-window])
    if not (math.isfinite(last) and math.isfinite(previous)):
        return dict(converged=False, last=None, previous=None, relative_change=None, threshold=tol, window=window)
    change = abs(last - previous) / max(abs(previous), 0.05)
    return dict(converged=bool(change < tol), last=float(last), previous=float(previous),
                relative_change=float(change), threshold=tol, window=window)


def loss_curve(losses: list[float]) -> dict:
    every = max(1, len(losses) // 100)
    means = [float(np.mean(losses[i:i + every])) for i in range(0, len(losses), every)]
    return dict(every=every, mean_loss=[m if math.isfinite(m) else None for m in means])


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def diverged_at(losses: list[float]) -> int | None:
    """The step (from 1) whose loss was not finite, where synthetic.train stopped the run; None if none was."""
    return len(losses) if losses and not math.isfinite(losses[-1]) else None


def train_run(family: str, info: dict, task, lr: float, steps: int, args, device) -> tuple:
    """A fresh model (the same init for every lr) trained for `steps` at `lr` on the task's stream: (model, losses,
    training seconds, the steps it resumed from). With --checkpoint-dir the run saves itself there and a rerun of
    the same command continues it from its last save (run_checkpoint)."""
    torch.manual_seed(args.seed)
    config = model_config(family, info["d_model"], task.vocab, task.train_length, longest_length(args),
                          info["fit"], args.overrides)
    model = build(config).to(device)
    stream = task.stream(args.seed + 1)
    checkpoint = None
    if args.checkpoint_dir:
        identity = dict(family=family, task=task.summary(), lr=lr, steps=steps, seed=args.seed, batch=args.batch,
                        model=config)
        checkpoint = RunCheckpoint(Path(args.checkpoint_dir) / f"{family}-{task.name}-lr{lr:g}-{steps}steps.pt",
                                   identity, args.checkpoint_every)
    start = time.perf_counter()
    losses = train(model, lambda: tuple(t.to(device) for t in next(stream)), steps, lr, args.log_every,
                   f"{family} {task.name} lr {lr:g}", checkpoint)
    if checkpoint:
        return model, losses, checkpoint.seconds, checkpoint.resumed_at
    return model, losses, time.perf_counter() - start, []


def resumed(resumed_at: list[int]) -> dict:
    """A run's record of the steps it was resumed from (run_checkpoint), absent for a run trained in one go."""
    return dict(resumed_at_steps=resumed_at) if resumed_at else {}


def sweep_loss(point: dict) -> float:
    """A sweep point's validation loss, a diverged run's (None) ranking last."""
    return point["val_loss"] if point["val_loss"] is not None else math.inf


def run_task(family: str, info: dict, task, args, device) -> dict:
    """The lr sweep, then the main run at the best lr; the row. With --sweep-steps equal to --steps the sweep is
    the full budget: every lr trains as long as the main run, and the best one's model is the row's (no rerun).
    Short probes mislead on tasks learnt in a sudden transition after a plateau (copying, induction): every rate
    still sits on the plateau when the probe stops."""
    val_ids, val_targets = (t.to(device) for t in task.sweep_validation(args))
    full_budget = args.sweep_steps == args.steps
    sweep, kept = [], None  # kept: the best full-budget run so far (the others' models are dropped)
    for lr in args.lrs:
        model, losses, seconds, resumed_at = train_run(family, info, task, lr, args.sweep_steps, args, device)
        ev = evaluate(model, val_ids, val_targets, args.batch)
        point = dict(lr=lr, steps=args.sweep_steps, val_loss=finite(ev["loss"]),
                     val_accuracy=float(ev["hits"].sum() / max(1, ev["counts"].sum())),
                     final_train_loss=finite(float(np.mean(losses[-max(1, len(losses) // 10):]))),
                     converged=convergence(losses, args.converge_tol)["converged"], seconds=seconds,
                     diverged_at_step=diverged_at(losses), **resumed(resumed_at))
        if full_budget and (not sweep or sweep_loss(point) < min(map(sweep_loss, sweep))):
            kept = model, losses, seconds, resumed_at
        sweep.append(point)
        print(f"  {family} {task.name} sweep lr {lr:g}: val loss {ev['loss']:.4f}", flush=True)
    lr = min(sweep, key=sweep_loss)["lr"]  # the first of equal losses, as kept
    if full_budget:
        model, losses, seconds, resumed_at = kept
        selected_by = "validation loss at the scored positions after the full budget (the sweep is the main run)"
    else:
        model, losses, seconds, resumed_at = train_run(family, info, task, lr, args.steps, args, device)
        selected_by = "validation loss at the scored positions after the sweep's steps"
    row = dict(family=family, task=task.name, d_model=info["d_model"], n_layer=N_LAYER,
               parameters=info["parameters"], parameter_ratio=info["ratio"], lr=lr,
               lr_selected_by=selected_by, sweep=sweep,
               steps=args.steps, train_seconds=seconds, train_length=task.train_length,
               final_train_loss=finite(float(np.mean(losses[-max(1, len(losses) // 10):]))),
               loss_curve=loss_curve(losses), convergence=convergence(losses, args.converge_tol),
               diverged_at_step=diverged_at(losses), **resumed(resumed_at))
    row["converged"] = row["convergence"]["converged"]
    row.update(task.result(model, args, device))
    return row


class LMTask:
    name = "lm"

    def __init__(self, args):
        self.source = lm_source(args)
        self.vocab, self.train_length, self.args = args.lm_vocab, args.lm_length, args

    def stream(self, seed: int):
        rng = np.random.default_rng(seed)
        while True:
            ids, targets, _ = self.source.batch(self.args.batch, self.args.lm_length, rng)
            yield ids, targets

    def sweep_validation(self, args):
        rng = np.random.default_rng(10_000 + args.seed)
        ids, targets, _ = self.source.batch(args.eval_samples, args.lm_length, rng)
        return ids, targets

    def chance(self) -> float:
        return self.source.unigram_entropy

    def summary(self) -> dict:
        s = self.source
        return dict(chance=s.unigram_entropy, chance_is="entropy of the unigram marginal (nats): a model that "
                    "ignores the context", entropy_floor=s.entropy_rate, uniform=math.log(s.vocab),
                    source=dict(kind="order-k Markov chain", order=s.order, vocab=s.vocab,
                                branching=self.args.lm_branching, uniform_mass=self.args.lm_uniform,
                                seed=self.args.lm_seed, start="stationary distribution"))

    def result(self, model, args, device) -> dict:
        rng = np.random.default_rng(20_000 + args.seed)  # held out: training uses seed + 1, the sweep 10_000 + seed
        ids, targets, nats = self.source.batch(args.eval_samples, args.lm_length, rng)
        ev = evaluate(model, ids.to(device), targets.to(device), args.batch)
        scored = targets.numpy() != IGNORE
        floor_on_validation = float(nats[scored].mean())
        score = loss_score(ev["nll"] / ev["counts"], int(ev["counts"].sum()), self.source.unigram_entropy)
        return dict(loss=score, entropy_floor=self.source.entropy_rate, floor_on_validation=floor_on_validation,
                    chance=self.source.unigram_entropy,
                    gap_to_floor=None if score["value"] is None else score["value"] - self.source.entropy_rate)


class CopyingTask:
    name = "copying"

    def __init__(self, args):
        self.args = args
        self.vocab = args.copy_data + 2
        self.train_length = args.copy_region + args.copy_tokens

    def batch(self, n: int, generator: torch.Generator):
        a = self.args
        return selective_copying_batch(n, a.copy_region, a.copy_tokens, a.copy_data, generator)

    def stream(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(self.args.batch, g)

    def sweep_validation(self, args):
        return self.batch(args.eval_samples, torch.Generator().manual_seed(10_000 + args.seed))

    def chance(self) -> float:
        return 1 / self.args.copy_data

    def summary(self) -> dict:
        a = self.args
        return dict(chance=self.chance(), chance_is="1 / data values", region=a.copy_region, tokens=a.copy_tokens,
                    data_values=a.copy_data, order_blind=order_blind_accuracy(a.copy_tokens, a.copy_data),
                    order_blind_is="the best accuracy from the data values' counts alone, without their positions "
                    "(the most frequent value at every marker): reachable without selectivity")

    def result(self, model, args, device) -> dict:
        ids, targets = self.batch(args.eval_samples, torch.Generator().manual_seed(20_000 + args.seed))
        ev = evaluate(model, ids.to(device), targets.to(device), args.batch)
        return dict(accuracy=accuracy_score(int(ev["hits"].sum()), int(ev["counts"].sum()), self.chance()),
                    chance=self.chance())


class InductionTask:
    name = "induction"

    def __init__(self, args):
        self.args = args
        self.vocab = args.induction_vocab + 1
        self.train_length = args.induction_len

    def stream(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield induction_heads_batch(self.args.batch, self.args.induction_len, self.args.induction_vocab, g)

    def sweep_validation(self, args):
        return induction_heads_batch(args.eval_samples, args.induction_len, args.induction_vocab,
                                     torch.Generator().manual_seed(10_000 + args.seed))

    def chance(self) -> float:
        return 1 / self.args.induction_vocab

    def summary(self) -> dict:
        a = self.args
        return dict(chance=self.chance(), chance_is="1 / vocabulary", train_length=a.induction_len,
                    test_lengths=a.test_lengths, vocab=a.induction_vocab)

    def result(self, model, args, device) -> dict:
        by_length = {}
        g = torch.Generator().manual_seed(20_000 + args.seed)
        for length in args.test_lengths:
            factor = max(1, length // args.induction_len)
            samples = max(args.eval_min_samples, args.eval_samples // factor)
            ids, targets = induction_heads_batch(samples, length, args.induction_vocab, g)
            ev = evaluate(model, ids.to(device), targets.to(device), max(1, args.batch // factor))
            by_length[str(length)] = accuracy_score(int(ev["hits"].sum()), int(ev["counts"].sum()), self.chance())
        return dict(by_length=by_length, chance=self.chance())


TASK_CLASSES = {"lm": LMTask, "copying": CopyingTask, "induction": InductionTask}


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory


def measure_speed(spec: dict) -> dict:
    """Training tokens/s (forward with the LM loss + backward, timed after one warm-up step) and the peak memory
    of the timed steps above the level before them, for the model spec["config"] on spec["device"]."""
    from benchmarks.memory import peak_memory

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build(spec["config"]).to(device)
    batch, length = spec["batch"], spec["length"]
    ids = torch.randint(0, spec["config"]["vocab_size"], (batch, length + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        model(x, targets=y).backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    with peak_memory(device) as peak:
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync()
        seconds = time.perf_counter() - start
    return dict(tokens_per_s=batch * length * spec["steps"] / seconds, seconds_per_step=seconds / spec["steps"],
                peak_memory_mib=peak.bytes / 2**20,
                memory_source="CUDA allocator peak" if device.type == "cuda" else "resident high-water growth")


def run_speed(family: str, info: dict, args, device) -> dict:
    config = model_config(family, info["d_model"], args.lm_vocab, args.speed_length, longest_length(args),
                          info["fit"], args.overrides)
    spec = dict(config=config, device=str(device), batch=args.speed_batch, length=args.speed_length,
                steps=args.speed_steps, threads=torch.get_num_threads())
    isolated = device.type == "cpu" and not args.smoke
    if isolated:  # a process of its own, large blocks returned to the system when freed (benchmarks/memory.py)
        from benchmarks.memory import MALLOC_ENV

        proc = subprocess.run([sys.executable, __file__, "--speed-one", json.dumps(spec)], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, **MALLOC_ENV}, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{family} speed: {proc.stderr.strip().splitlines()[-1:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        measured = measure_speed(spec)
    return dict(family=family, task="speed", d_model=info["d_model"], n_layer=N_LAYER, parameters=info["parameters"],
                parameter_ratio=info["ratio"], length=args.speed_length, batch=args.speed_batch,
                steps=args.speed_steps, isolated_process=isolated, **measured)


# ---------------------------------------------------------------------------------------------------------------
# Report: JSON, table, figure


class Report:
    """The JSON report, rewritten (atomically) whenever a row or a family's status is added."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.data = dict(header, families={}, skipped={}, rows=[], complete=False)
        self.write()

    def family(self, family: str, info: dict) -> None:
        self.data["families"][family] = info
        if info["status"] != "ok":
            self.data["skipped"][family] = info["reason"]
        self.write()

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


def write_json(path: Path, data: dict) -> None:
    """Atomically: a stopped run leaves the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)


def rows_by(data: dict) -> dict:
    return {(r["family"], r["task"]): r for r in data["rows"]}


class MergeRefused(ValueError):
    """Runs that do not measure the same thing: one line naming the file and the setting."""


def merge(paths: list[Path]) -> dict:
    """Several runs of this benchmark (each a JSON it wrote) as one report, so a comparison can be measured in parts (a
    task at a longer budget, more rates, the families a stopped run missed). A later file's row replaces an earlier
    one's for the same family and task, except that a full-budget sweep over other rates at the same steps joins it
    (the better run is kept, its sweep lists both rates' points, the other run's row goes under superseded marked
    `lost_sweep`), and one at fewer steps than the row joins the replaced row of those steps it widens, leaving
    the longer budget's row in place. Refused unless every run has the same parameter target and model overrides
    and, for each task two runs share, the same task settings (data, lengths, chance): rows side by side must
    measure the same thing. Each run's command and settings are kept under "runs" (a merged report's runs carry
    over), each replaced row under "superseded" (with the index of the run, or of a merged report's last run, that
    replaced it); the table states each task's steps and sweep."""
    runs = [(Path(p), read_report(Path(p))) for p in paths]
    first_path, first = runs[0]
    data = {key: first[key] for key in ("machine", "target_parameters", "target_is", "overrides", "published")}
    data.update(runs=[], tasks={}, failed={}, families={}, skipped={}, rows=[], superseded=[])
    rows = {}
    for path, run in runs:
        if run["target_parameters"] != first["target_parameters"]:
            raise MergeRefused(f"{path}: target_parameters {run['target_parameters']:,} differs from "
                               f"{first_path}'s {first['target_parameters']:,}")
        changed = sorted(f for f in set(run["overrides"]) | set(first["overrides"])
                         if run["overrides"].get(f) != first["overrides"].get(f))
        if changed:
            raise MergeRefused(f"{path}: the model overrides of {', '.join(changed)} differ from {first_path}'s")
        for task, summary in run["tasks"].items():
            if data["tasks"].setdefault(task, summary) != summary:
                raise MergeRefused(f"{path}: the {task} task's settings {summary} differ from an earlier run's "
                                   f"{data['tasks'][task]}")
        if "runs" in run:  # a merged report: its runs, and the rows they replaced, carry over
            offset = len(data["runs"])
            data["runs"].extend(run["runs"])
            data["superseded"].extend(dict(r, superseded_by=r["superseded_by"] + offset) for r in run["superseded"])
        else:
            commands = run["command"] if isinstance(run["command"], list) else [run["command"]]
            data["runs"].append(dict(commands=commands, settings=run["settings"], complete=run["complete"],
                                     rows=[f"{r['family']}/{r['task']}" for r in run["rows"]]))
        for family, info in run["families"].items():
            if info["status"] == "ok" or family not in data["families"]:
                data["families"][family] = info
        for r in run["rows"]:
            key, by = (r["family"], r["task"]), len(data["runs"]) - 1
            if key not in rows:
                rows[key] = r
            elif extends_sweep(rows[key], r):  # more rates of the row's sweep: the better run is the row
                rows[key], lost = joined_sweep(rows[key], r)
                data["superseded"].append(dict(lost, superseded_by=by))
            elif (i := widened_superseded(data["superseded"], rows[key], r)) is not None:
                # more rates of a sweep a longer budget has replaced since: that row stays, the sweep is widened
                kept, lost = joined_sweep(data["superseded"][i], r)
                data["superseded"][i] = dict(kept, superseded_by=data["superseded"][i]["superseded_by"])
                data["superseded"].append(dict(lost, superseded_by=by))
            else:  # kept, so what a longer budget replaced stays on record
                data["superseded"].append(dict(rows[key], superseded_by=by))
                rows[key] = r
        data["failed"].update(run.get("failed", {}))
    data["skipped"] = {f: i["reason"] for f, i in data["families"].items() if i["status"] != "ok"}
    order = {name: i for i, name in enumerate(FAMILIES)}
    families = sorted(data["families"], key=lambda f: order.get(f, len(order)))
    data["rows"] = sorted(rows.values(), key=lambda r: (order.get(r["family"], len(order)), TASKS.index(r["task"])))
    for family in list(data["failed"]):
        if all((family, t) in rows for t in data["tasks"]):  # a later run measured what an earlier one lost
            del data["failed"][family]
    data["settings"] = dict(first["settings"], families=families, tasks=[t for t in TASKS if t in data["tasks"]])
    data["budget_checks"] = budget_checks(data)
    # complete: every family measured on every task (a run stopped early may be completed by a later one)
    data["complete"] = all((f, t) in rows for f in families if data["families"][f]["status"] == "ok"
                           for t in data["tasks"])
    return data


def full_budget_sweep(row: dict) -> bool:
    return bool(row.get("sweep")) and all(p["steps"] == row["steps"] for p in row["sweep"])


def extends_sweep(earlier: dict, later: dict) -> bool:
    """Whether a later row is more rates of the same full-budget sweep (the same steps, none of its rates swept
    before), so a grid whose best rate sits on its edge can be widened without training its rates again."""
    rates = {p["lr"] for p in earlier.get("sweep", ())}
    return (full_budget_sweep(earlier) and full_budget_sweep(later) and earlier["steps"] == later["steps"]
            and not rates & {p["lr"] for p in later["sweep"]})


def widened_superseded(superseded: list[dict], row: dict, later: dict) -> int | None:
    """The index of the superseded row whose sweep a later, shorter one widens (the last of its family and task
    at its steps, see extends_sweep) while `row`, a longer budget, is the table's; None if there is none."""
    same = [i for i, s in enumerate(superseded) if not s.get("lost_sweep")
            and (s["family"], s["task"], s["steps"]) == (later["family"], later["task"], later["steps"])]
    if later["steps"] < row["steps"] and same and extends_sweep(superseded[same[-1]], later):
        return same[-1]
    return None


def wider_sweeps(data: dict) -> list[tuple[dict, dict]]:
    """(row, superseded row) for each row at a rate other than the best of a sweep of its family and task widened
    (joined_sweep) after the row had replaced it: the longer budget ran at another rate (the narrower sweep's
    choice, or one picked for it). Not when the row's own sweep tried that rate: its longer budget settled it."""
    return [(row, s) for row in data["rows"] for s in data.get("superseded", ())
            if (s["family"], s["task"]) == (row["family"], row["task"]) and s.get("sweep_widened")
            and not s.get("lost_sweep") and s["lr"] != row.get("lr")
            and s["lr"] not in {p["lr"] for p in row.get("sweep", ())}]


def joined_sweep(earlier: dict, later: dict) -> tuple[dict, dict]:
    """(kept, lost): the row of the two sweeps' best rate by validation loss (the earlier of equal losses) carrying
    both sweeps' points in order of rate, as run_task keeps a sweep, and the other run's row, marked `lost_sweep`:
    merge keeps it under superseded, where a longer run at its rate finds its half-budget check (budget_checks)."""
    best = lambda row: min(map(sweep_loss, row["sweep"]))  # noqa: E731
    kept, lost = (later, earlier) if best(later) < best(earlier) else (earlier, later)
    points = sorted(earlier["sweep"] + later["sweep"], key=lambda p: p["lr"])
    return dict(kept, sweep=points, sweep_widened=True), dict(lost, lost_sweep=True)


def estimates(row: dict) -> dict:
    """A trained row's scores as (estimate, standard error of that run's measurement), by name: the accuracy's
    binomial error at the measured rate, the LM loss's error of the mean over sequences."""
    if row["task"] == "lm":
        s = row["loss"]
        return {"loss": (s["measured_nats"], s["se"])}
    scores = {"accuracy": row["accuracy"]} if row["task"] == "copying" else \
        {f"@{n}": s for n, s in row["by_length"].items()}
    return {name: (s["hits"] / s["n"], math.sqrt(s["hits"] / s["n"] * (1 - s["hits"] / s["n"]) / s["n"]))
            for name, s in scores.items() if s["n"]}


def budget_checks(data: dict) -> dict:
    """For each row that replaced a run of the same family, task and lr at half its steps or fewer: did the longer
    budget change the result? `same_result`: every score within 2 standard errors of the difference of the two
    (independent) measurements. Keyed "family/task"; the shorter run compared is the longest such one."""
    checks = {}
    for row in data["rows"]:
        if row["task"] not in TASK_CLASSES or row.get("diverged_at_step"):
            continue
        shorter = [s for s in data["superseded"] if (s["family"], s["task"], s.get("lr")) ==
                   (row["family"], row["task"], row["lr"]) and 2 * s["steps"] <= row["steps"]
                   and not s.get("diverged_at_step")]
        if not shorter:
            continue
        before_row = max(shorter, key=lambda s: s["steps"])
        before, after = estimates(before_row), estimates(row)
        scores = {}
        for name in [n for n in after if n in before]:
            (b, b_se), (a, a_se) = before[name], after[name]
            if b_se is None or a_se is None:
                continue
            limit = 2 * math.hypot(b_se, a_se)
            scores[name] = dict(before=b, after=a, change=a - b, limit=limit, same=bool(abs(a - b) <= limit))
        if scores:
            checks[f"{row['family']}/{row['task']}"] = dict(
                steps_before=before_row["steps"], steps=row["steps"], lr=row["lr"], scores=scores,
                same_result=all(s["same"] for s in scores.values()))
    return checks


def converged(data: dict, row: dict) -> bool | None:
    """The table's verdict: the training loss flat over the last 10% of steps, or a longer budget that did not
    change the result (budget_checks)."""
    check = data.get("budget_checks", {}).get(f"{row['family']}/{row['task']}")
    return True if check and check["same_result"] else row.get("converged")


def saturated(row: dict) -> bool:
    """An accuracy row whose every score is within SATURATED_WITHIN of 1.000: however much its loss still moves,
    more training can raise none of its scores by more than that, so its place in the table is not an artefact
    of its budget beyond that margin."""
    if row["task"] == "lm":
        return False
    scores = estimates(row)
    return bool(scores) and all(value >= 1 - SATURATED_WITHIN for value, _ in scores.values())


def budget_mark(data: dict, row: dict) -> str:
    """The table's mark after a row's number: none when converged (or unknown), "‡" when not converged but
    saturated, "†" otherwise."""
    if converged(data, row) in (True, None):
        return ""
    return "‡" if saturated(row) else "†"


def read_report(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeRefused(f"{path}: cannot be read as a zoo.py report ({e})") from None
    missing = [k for k in ("target_parameters", "overrides", "tasks", "families", "rows", "settings", "complete")
               if k not in data] + ([] if "command" in data or "runs" in data else ["command"])
    if missing:
        raise MergeRefused(f"{path}: not a zoo.py report (no {', '.join(missing)})")
    return data


def budgets(data: dict) -> list[str]:
    """Each task's training budget and lr sweep, from its rows: one phrase per distinct protocol."""
    phrases = []
    for task in TASKS:
        groups: dict[str, list[str]] = {}
        for r in data["rows"]:
            if r["task"] != task or "sweep" not in r:
                continue
            lrs = "/".join(f"{p['lr']:g}" for p in r["sweep"])
            probe = r["sweep"][0]["steps"] if r["sweep"] else r["steps"]
            how = (f"{r['steps']:,} steps for each lr of {lrs}, the best kept" if probe == r["steps"] else
                   f"{r['steps']:,} steps at the best of {lrs} after {probe:,}-step probes")
            groups.setdefault(how, []).append(r["family"])
        for how, families in groups.items():
            whom = "" if len(groups) == 1 else f" ({', '.join(families)})"
            phrases.append(f"{task}{whom}: {how}")
    return phrases


def table(data: dict) -> str:
    """The markdown table: ours beside the Mamba paper's, one row per family asked for."""
    rows, settings, tasks = rows_by(data), data["settings"], data["tasks"]
    lengths = [str(n) for n in settings["test_lengths"]]
    lm = tasks.get("lm")
    head = ["family", "d_model", "params (ratio)"]
    if lm:
        head.append(f"LM loss nats (floor {lm['entropy_floor']:.3f}, chance {lm['chance']:.3f})")
    if "copying" in tasks:
        head += [f"sel. copying (chance {tasks['copying']['chance']:.3f}, order-blind "
                 f"{tasks['copying']['order_blind']:.3f})", "paper: sel. copying"]
    if "induction" in tasks:
        head += [f"ind@{n}" for n in lengths]
        head.append(f"paper: induction (trained at {PUBLISHED['induction_heads_train_length']})")
    if "speed" in tasks:
        head += [f"tokens/s @{settings['speed_length']}", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mark = lambda r, text: " ".join(filter(None, (text, budget_mark(data, r))))  # noqa: E731
    for family in settings["families"]:
        info = data["families"].get(family)
        if info is None:
            continue
        ok = info["status"] == "ok"
        cells = [family, str(info.get("d_model", "-")) if ok else "-",
                 f"{info['parameters']:,} ({info['ratio']:.2f})" if ok else info["status"]]
        if lm:
            r = rows.get((family, "lm"))
            cells.append(mark(r, cell(r["loss"])) if r else "-")
        if "copying" in tasks:
            r = rows.get((family, "copying"))
            cells += [mark(r, cell(r["accuracy"])) if r else "-", PUBLISHED["selective_copying"].get(family, "-")]
        if "induction" in tasks:
            r = rows.get((family, "induction"))
            cells += [mark(r, cell(r["by_length"].get(n))) if r else "-" for n in lengths]
            cells.append(PUBLISHED["induction_heads"].get(family, "-"))
        if "speed" in tasks:
            r = rows.get((family, "speed"))
            cells += [f"{r['tokens_per_s']:,.0f}", f"{max(0.0, r['peak_memory_mib']):.0f}"] if r else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Parameters outside the embedding / LM head; target {data['target_parameters']:,} "
             f"(ratio = ours / target, within {TOLERANCE:.0%}). \"chance\": not above chance by more than 2 standard "
             f"errors. †: not converged (training loss still moving by >= {settings['converge_tol']:.0%} over the "
             "last 10% of steps, and no run at half the budget or less that scored the same within 2 standard "
             f"errors). ‡: not converged by either test, but every score within {SATURATED_WITHIN:g} of 1.000, "
             "so more training can raise it by at most that.",
             "Ours: " + (f"induction trained at {settings['induction_len']} tokens; " if "induction" in tasks else "")
             + "; ".join(budgets(data)) + f". Paper: {PUBLISHED['citation']}."]
    checks = data.get("budget_checks", {})
    if checks:
        notes.append("Longer budgets, same lr: " + "; ".join(
            f"{key} " + ", ".join(f"{name} {s['before']:.3f} -> {s['after']:.3f}" for name, s in c["scores"].items())
            + f" ({c['steps_before']:,} -> {c['steps']:,} steps, {'same' if c['same_result'] else 'changed'})"
            for key, c in checks.items()) + ".")
    lrs = [f"{r['family']}/{r['task']} {r['lr']:g}" for r in data["rows"] if "lr" in r]
    if lrs:
        notes.append("Learning rates: " + ", ".join(lrs) + ".")
    rates = lambda row: "/".join(f"{p['lr']:g}" for p in row["sweep"])  # noqa: E731
    wider = [f"{r['family']}/{r['task']} {s['lr']:g} of {rates(s)} at {s['steps']:,} steps (the row ran at "
             f"{r['lr']:g})" for r, s in wider_sweeps(data)]
    if wider:
        notes.append("Sweeps widened after their longer runs prefer another rate: " + "; ".join(wider) + ".")
    for family, reason in data["skipped"].items():
        notes.append(f"{family}: {data['families'][family]['status']}: {reason}")
    for family, reason in data.get("failed", {}).items():
        notes.append(f"{family}: failed: {reason}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(data: dict, path: Path) -> bool:
    """Three panels: LM loss per family against the floor; accuracy per family on the tasks; induction accuracy
    against the test length. A result at chance is drawn as a hollow marker on the chance line, never as a value."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    rows, tasks = rows_by(data), data["tasks"]
    families = [f for f in data["settings"]["families"] if data["families"].get(f, {}).get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    x = np.arange(len(families))

    def bars(ax, scores, offset, width, color):
        for i, s in enumerate(scores):
            if s is None:
                continue
            if s["at_chance"]:
                ax.plot(x[i] + offset, s["chance"], marker="o", mfc="none", color=color, ls="none")
            else:
                ax.bar(x[i] + offset, s["value"], width, color=color)

    ax = axes[0]
    if "lm" in tasks:
        bars(ax, [rows.get((f, "lm"), {}).get("loss") for f in families], 0, 0.6, "C0")
        ax.plot([], [], marker="s", color="C0", ls="none", label="validation loss")
        ax.set_ylim(0, tasks["lm"]["chance"] * 1.1)
        ax.axhline(tasks["lm"]["entropy_floor"], color="k", ls="--", label="entropy floor")
        ax.axhline(tasks["lm"]["chance"], color="gray", ls=":", label="chance (unigram)")
        ax.legend(fontsize=7)
    ax.set_title("language modelling (nats/token)")
    ax = axes[1]
    for j, (task, key, color) in enumerate((("copying", "accuracy", "C1"), ("induction", None, "C2"))):
        if task not in tasks:
            continue
        train_len = str(data["settings"]["induction_len"])
        scores = [(rows.get((f, task)) or {}).get(key) if key else
                  (rows.get((f, task)) or {}).get("by_length", {}).get(train_len) for f in families]
        name = "selective copying" if task == "copying" else f"induction @{train_len}"
        bars(ax, scores, (j - 0.5) * 0.4, 0.4, color)
        ax.axhline(tasks[task]["chance"], color=color, ls=":", lw=1)
        ax.plot([], [], marker="s", color=color, ls="none", label=name)
    if "copying" in tasks:
        ax.axhline(tasks["copying"]["order_blind"], color="C1", ls="--", lw=1, label="sel. copying: order-blind")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy (hollow: at chance; dotted: chance)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    for a in axes[:2]:
        a.set_xticks(x, families, rotation=45, ha="right", fontsize=8)
    ax = axes[2]
    if "induction" in tasks:
        lengths = data["settings"]["test_lengths"]
        for i, f in enumerate(families):
            r = rows.get((f, "induction"))
            if not r:
                continue
            color = plt.cm.tab20(i % 20)
            ys = [np.nan if r["by_length"][str(n)]["at_chance"] else r["by_length"][str(n)]["value"] for n in lengths]
            ax.plot(lengths, ys, marker="o", color=color, label=f)
            chance_x = [n for n in lengths if r["by_length"][str(n)]["at_chance"]]
            ax.plot(chance_x, [tasks["induction"]["chance"]] * len(chance_x), marker="o", mfc="none", ls="none",
                    color=color)
        ax.axhline(tasks["induction"]["chance"], color="gray", ls=":", label="chance")
        ax.axvline(data["settings"]["induction_len"], color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    ax.set_title(f"induction heads vs test length (trained at {data['settings']['induction_len']})")
    ax.set_xlabel("test length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of the main run per task")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps per lr of the sweep (default steps / 4; equal to --steps: the sweep is the main run)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--params", type=int, default=None,
                   help="target parameters outside the embedding / LM head (default: Mamba's at d_model 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lm-length", type=int, default=128)
    p.add_argument("--lm-vocab", type=int, default=32)
    p.add_argument("--lm-order", type=int, default=2)
    p.add_argument("--lm-branching", type=int, default=4, help="successors per context with Dirichlet weights")
    p.add_argument("--lm-uniform", type=float, default=0.02, help="uniform mass mixed into every row")
    p.add_argument("--lm-seed", type=int, default=0, help="seed of the chain's table (the language)")
    p.add_argument("--copy-region", type=int, default=64)
    p.add_argument("--copy-tokens", type=int, default=8)
    p.add_argument("--copy-data", type=int, default=8)
    p.add_argument("--induction-len", type=int, default=64)
    p.add_argument("--induction-vocab", type=int, default=16)
    p.add_argument("--test-lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--eval-samples", type=int, default=512, help="validation sequences (fewer at long lengths)")
    p.add_argument("--eval-min-samples", type=int, default=64, help="the fewest induction samples at any length")
    p.add_argument("--speed-length", type=int, default=1024)
    p.add_argument("--speed-batch", type=int, default=4)
    p.add_argument("--speed-steps", type=int, default=5)
    p.add_argument("--converge-tol", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="save each training run there every --checkpoint-every steps; the same command run again "
                        "resumes each from its last save, exactly (--table DIR: DIR/checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="STEPS")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: finishes in seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo.json"))
    p.add_argument("--table", metavar="DIR",
                   help="train every run of TABLE_RUNS into DIR (a part whose JSON there is complete is not trained "
                        "again: a stopped reproduction resumes), then merge them into --out; the other flags given "
                        "apply to every part, a part's own flags win")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="write one report of these runs' JSON files (a later file's row replaces an earlier one's "
                        "for the same family and task) and train nothing")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a model setting on top of OVERRIDES for every family with that section, e.g. gss.ssm_dim=64 "
                        "(repeatable; VALUE read as JSON, else a string)")
    p.add_argument("--speed-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.overrides = with_user_overrides(OVERRIDES, args.override)
    except ValueError as e:
        p.error(str(e))
    if args.smoke:  # smaller defaults; flags given explicitly still win
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.sweep_steps is None:
        args.sweep_steps = max(1, args.steps // 4)
    if args.checkpoint_every < 1:
        p.error(f"--checkpoint-every {args.checkpoint_every}: must be a positive number of steps")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.speed_one:  # the isolated speed measurement of run_speed
        print(json.dumps(measure_speed(json.loads(args.speed_one))))
        return {}
    out = Path(args.out)
    if args.merge:
        return finish(merge([Path(p) for p in args.merge]), out)
    if args.table:
        return reproduce_table(Path(args.table), without(without(argv, "--table"), "--out"), out)
    torch.set_num_threads(args.threads)
    from benchmarks.machine import describe

    device = torch.device(args.device)
    target = args.params or default_target(args)
    tasks = {name: TASK_CLASSES[name](args) for name in args.tasks if name in TASK_CLASSES}
    summaries = {name: task.summary() for name, task in tasks.items()}
    if "speed" in args.tasks:
        summaries["speed"] = dict(length=args.speed_length, batch=args.speed_batch, steps=args.speed_steps)
    # where a run saves itself changes none of its results: not a setting, not in the recorded command
    local = ("out", "speed_one", "overrides", "table", "checkpoint_dir", "checkpoint_every")
    settings = {k: v for k, v in vars(args).items() if k not in local}
    command = ["python", "benchmarks/zoo.py", *without(without(without(argv, "--out"), "--checkpoint-dir"),
                                                       "--checkpoint-every")]
    report = Report(out, dict(machine=describe(), command=shlex.join(command),
                              settings=settings, target_parameters=target,
                              target_is="explicit (--params)" if args.params else
                              "Mamba's parameters outside the embedding / LM head at d_model 64, n_layer 2",
                              overrides=args.overrides,
                              published=PUBLISHED, tasks=summaries, failed={}))
    if "lm" in tasks:
        s = tasks["lm"].source
        print(f"LM source: order-{s.order} chain over {s.vocab} tokens, entropy floor {s.entropy_rate:.4f} nats, "
              f"chance (unigram) {s.unigram_entropy:.4f}, uniform {math.log(s.vocab):.4f}")
    print(f"target: {target:,} parameters outside the embedding / LM head", flush=True)
    for family in args.families:
        reason = availability(family)
        info = dict(status="skipped", reason=reason) if reason else match_parameters(family, target, args)
        report.family(family, info)
        if info["status"] != "ok":
            print(f"{info['status']} {family}: {info['reason']}", flush=True)
            continue
        print(f"{family}: d_model {info['d_model']}, {info['parameters']:,} parameters ({info['ratio']:.3f} of the "
              "target)", flush=True)
        try:
            for name in args.tasks:
                row = run_speed(family, info, args, device) if name == "speed" else \
                    run_task(family, info, tasks[name], args, device)
                report.row(row)
                print(f"  {family} {name}: {summary_line(row)}", flush=True)
        except CheckpointMismatch:  # the user's folder, not the family: stop and say so
            raise
        except Exception as e:  # one family's failure does not lose the others' rows
            report.data["failed"][family] = f"{type(e).__name__}: {e}"
            report.write()
            print(f"FAILED {family}: {type(e).__name__}: {e}", flush=True)
    report.data["complete"] = True
    return finish(report.data, out)


def finish(data: dict, out: Path) -> dict:
    """The table into the report, the report written, the table printed, the figure drawn beside the report."""
    data["table"] = table(data)
    write_json(out, data)
    print("\n" + data["table"])
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if plot(data, png) else ""))
    return data


def reproduce_table(folder: Path, passed: list[str], out: Path) -> dict:
    """Each part of TABLE_RUNS trained into folder/PART.json unless that file is a complete report already, then
    all of them merged into `out`. `passed`: flags for every part (before the part's own, which win)."""
    paths = []
    if not any(a == "--checkpoint-dir" or a.startswith("--checkpoint-dir=") for a in passed):
        passed = [*passed, "--checkpoint-dir", str(folder / "checkpoints")]
    for name, part in TABLE_RUNS.items():
        path = folder / f"{name}.json"
        if path.exists() and read_report(path)["complete"]:
            print(f"table part {name}: {path} is complete, not trained again", flush=True)
        else:
            print(f"table part {name}: python benchmarks/zoo.py {shlex.join([*passed, *part])}", flush=True)
            main([*passed, *part, "--out", str(path)])
        paths.append(path)
    return finish(merge(paths), out)


def without(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and its value (given as `flag VALUE` or `flag=VALUE`)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith(flag + "="):
            skip = False
            continue
        skip = arg == flag
        if not skip:
            kept.append(arg)
    return kept



def summary_line(row: dict) -> str:
    conv = {True: "converged", False: "NOT converged", None: "convergence unknown"}[row.get("converged")]
    if row.get("diverged_at_step"):
        conv = f"DIVERGED at step {row['diverged_at_step']}"
    if row["task"] == "lm":
        s = row["loss"]
        return (f"loss {cell(s, '{:.4f}')} (measured {s['measured_nats']:.4f}, floor {row['entropy_floor']:.4f}, "
                f"chance {s['chance']:.4f}), lr {row['lr']:g}, {conv}")
    if row["task"] == "copying":
        return f"accuracy {cell(row['accuracy'])}, lr {row['lr']:g}, {conv}"
    if row["task"] == "induction":
        return ", ".join(f"@{n} {cell(s)}" for n, s in row["by_length"].items()) + f", lr {row['lr']:g}, {conv}"
    return f"{row['tokens_per_s']:,.0f} tokens/s, peak +{max(0.0, row['peak_memory_mib']):.0f} MiB"


if __name__ == "__main__":
    try:
        sys.exit(1 if main().get("failed") else 0)
    except (MergeRefused, CheckpointMismatch) as e:  # the user's files: said in one line
        print(f"zoo.py: {e}", file=sys.stderr)
        sys.exit(2)
