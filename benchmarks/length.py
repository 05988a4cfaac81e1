"""Length extrapolation: train each family at a short length, score documents 128x longer.

Each family (mamba, mamba2, gss, a hybrid, and the transformer with a sliding window of the training
length) is a 2-layer models.LanguageModel trained with benchmarks/synthetic.py's AdamW loop on fresh
documents of `--train-length` tokens, then scored on held-out documents of `--eval-length` tokens
(32768) through eval-ppl's chunked recurrent path (evaluation.perplexity.token_nll: chunks of the
training length, the state carried), so memory stays constant in the length for the SSMs. Reported:
token perplexity per position bucket (0-512, 512-2k, 2k-8k, 8k-32k: where in the document the predicted
token sits), next to the entropy floor of exactly those tokens, and the loss on the recalled values.

The documents (`recall_document`) are token-level, generated here with their exact probabilities:

    EOS STORE k1 v1 ... k8 v8 | filler (8-24 tokens) QUERY k v | filler QUERY k v | ... up to the length

Filler is a sparse Markov chain over 48 tokens (local structure any model learns); the memory block
states 8 key-value pairs at the start; every query names one of those keys, uniformly, so its value is
predictable only by a model that still holds the block, however far back it is: up to the whole
document. Chance on a value is ln 32 = 3.47 nats; a model that remembers pays 0. Training documents are
the same process cut at the training length, so at training time every query is within it.

    python benchmarks/length.py            # the five families, ~12 minutes of one core (mamba: 100 s to train)
    python benchmarks/length.py --quick    # a smoke run at tiny sizes, under a minute

Writes benchmarks/results/length.json, length.png (matplotlib) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
BUCKETS = ((0, 512), (512, 2048), (2048, 8192), (8192, 32768))  # positions of the predicted token

# token ids
N_FILLER, N_KEYS, N_VALUES = 48, 32, 32
KEY0, VALUE0 = N_FILLER, N_FILLER + N_KEYS
STORE, QUERY, EOS = VALUE0 + N_VALUES, VALUE0 + N_VALUES + 1, VALUE0 + N_VALUES + 2
VOCAB = EOS + 1
FAMILIES = ("mamba", "mamba2", "gss", "hybrid", "transformer")


def bucket_name(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(lo)}-{short(hi)}"


class RecallSource:
    """The document process of the module docstring, with the exact log-probability of every token."""

    def __init__(self, n_pairs: int = 8, branching: int = 4, run: tuple[int, int] = (8, 24), language_seed: int = 0):
        self.n_pairs, self.run = n_pairs, run
        rng = np.random.default_rng(language_seed)
        # filler chain: from each filler token (and from the start state, row N_FILLER) `branching` successors
        # with Zipf weights
        self.successors = np.stack([rng.choice(N_FILLER, branching, replace=False) for _ in range(N_FILLER + 1)])
        weights = 1.0 / np.arange(1, branching + 1) ** 1.2
        self.weights = weights / weights.sum()
        self.cum = np.cumsum(self.weights)

    def document(self, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (length,), -ln P of each token given the ones before (the first, EOS, is given: 0), whether
        each token is a recalled value)."""
        ids, nats, recall = [EOS, STORE], [0.0, 0.0], [False, False]
        keys = rng.choice(N_KEYS, self.n_pairs, replace=False)
        values = rng.integers(0, N_VALUES, self.n_pairs)
        for j, (k, v) in enumerate(zip(keys, values)):
            ids += [KEY0 + k, VALUE0 + v]
            nats += [math.log(N_KEYS - j), math.log(N_VALUES)]
            recall += [False, False]
        lo, hi = self.run
        while len(ids) < length:
            run = int(rng.integers(lo, hi + 1))
            state = N_FILLER  # the chain restarts after a query
            for r in range(run):
                # P(the run goes on | r tokens so far): 1 before lo, then 1 - hazard of a uniform run length
                go_on = 1.0 if r < lo else (hi - r) / (hi - r + 1)
                choice = min(int(np.searchsorted(self.cum, rng.random(), side="right")), len(self.cum) - 1)
                token = int(self.successors[state, choice])
                ids.append(token)
                nats.append(-math.log(go_on * self.weights[choice]))
                recall.append(False)
                state = token
            j = int(rng.integers(self.n_pairs))
            ids += [QUERY, KEY0 + int(keys[j]), VALUE0 + int(values[j])]
            nats += [math.log(hi - run + 1), math.log(self.n_pairs), 0.0]  # the run ends here; which key; its value
            recall += [False, False, True]
        return (np.asarray(ids[:length], dtype=np.int64), np.asarray(nats[:length]),
                np.asarray(recall[:length], dtype=bool))

    def batch(self, n: int, length: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch: ids (n, length), targets = the next token (the last position predicts nothing)."""
        docs = torch.from_numpy(np.stack([self.document(length + 1, rng)[0] for _ in range(n)]))
        return docs[:, :-1].contiguous(), docs[:, 1:].contiguous()


def build_model(family: str, args):
    from ssmforge.models import AttentionConfig, GSSConfig, LanguageModel, Mamba2Config, MambaConfig, ModelConfig

    window = args.train_length if family == "transformer" else None  # the hybrid's attention is full
    config = ModelConfig(family=family, d_model=args.d_model, n_layer=2, vocab_size=VOCAB,
                         layer_pattern="M*" if family == "hybrid" else None,
                         mamba=MambaConfig(d_state=16), mamba2=Mamba2Config(d_state=16, headdim=16, chunk_size=64),
                         gss=GSSConfig(d_state=16), attention=AttentionConfig(heads=4, window=window),
                         rescale_out_proj=True)
    return LanguageModel(config)


def score(model, docs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], chunk_length: int, batch: int) -> np.ndarray:
    """-ln P of every token of every document (n, length) under the model (position 0, the EOS, is given:
    0), scored through evaluation.perplexity.token_nll in chunks of chunk_length with the state carried."""
    from ssmforge.evaluation.perplexity import token_nll

    ids = torch.from_numpy(np.stack([d[0] for d in docs]))
    out = np.zeros(ids.shape, dtype=np.float64)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(docs), batch):
            x = ids[b:b + batch]
            nll = token_nll(model, x[:, :-1], x[:, 1:], chunk_length)
            out[b:b + batch, 1:] = nll.double().numpy()
    model.train()
    return out


def bucket_stats(nll: np.ndarray, docs, eval_length: int) -> dict:
    floor = np.stack([d[1] for d in docs])
    recall = np.stack([d[2] for d in docs])
    stats = {}
    for lo, hi in BUCKETS:
        a, b = max(lo, 1), min(hi, eval_length)
        if a >= b:
            stats[bucket_name(lo, hi)] = dict(tokens=0, token_perplexity=None, floor_perplexity=None,
                                              recalls=0, recall_nats=None)
            continue
        part, fl, rc = nll[:, a:b], floor[:, a:b], recall[:, a:b]
        stats[bucket_name(lo, hi)] = dict(
            tokens=int(part.size), token_perplexity=float(math.exp(part.mean())),
            floor_perplexity=float(math.exp(fl.mean())), recalls=int(rc.sum()),
            recall_nats=float(part[rc].mean()) if rc.any() else None)
    return stats


def run_family(family: str, args, source: RecallSource, eval_docs) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.synthetic import train

    torch.manual_seed(args.seed)
    model = build_model(family, args)
    rng = np.random.default_rng(args.seed + 1)
    start = time.perf_counter()
    losses = train(model, lambda: source.batch(args.batch, args.train_length, rng), args.steps, args.lr,
                   args.log_every, family)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    nll = score(model, eval_docs, args.train_length, args.eval_batch)
    eval_seconds = time.perf_counter() - start
    tail = max(1, min(20, len(losses)))
    return dict(parameters=model.num_parameters(), final_train_loss=sum(losses[-tail:]) / tail,
                train_seconds=train_seconds, eval_seconds=eval_seconds,
                buckets=bucket_stats(nll, eval_docs, args.eval_length))


def table(results: dict, floor: dict) -> str:
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    cell = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = ["Token perplexity by position (recalled-value loss in nats in brackets; chance 3.47, memory 0)", "",
             "| family | params | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for family, r in results.items():
        cells = [f"{cell(r['buckets'][n]['token_perplexity'], '{:.3f}')} "
                 f"({cell(r['buckets'][n]['recall_nats'], '{:.2f}')})" for n in names]
        lines.append(f"| {family} | {r['parameters'] / 1e3:.0f}k | " + " | ".join(cells) + " |")
    lines.append("| entropy floor | | " + " | ".join(cell(floor[n], "{:.3f}") for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, floor: dict, path: Path, train_length: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for family, r in results.items():
        ppl = [r["buckets"][n]["token_perplexity"] for n in names]
        rec = [r["buckets"][n]["recall_nats"] for n in names]
        ax1.plot(x, [np.nan if v is None else v for v in ppl], marker="o", label=family)
        ax2.plot(x, [np.nan if v is None else v for v in rec], marker="o", label=family)
    ax1.plot(x, [np.nan if floor[n] is None else floor[n] for n in names], "k--", label="entropy floor")
    ax2.axhline(math.log(N_VALUES), color="gray", linestyle=":", label="chance")
    for ax, title in ((ax1, "token perplexity"), (ax2, "recalled value loss (nats)")):
        ax.set_xticks(x, names)
        ax.set_xlabel(f"position in the document (trained at {train_length})")
        ax.set_title(title)
        ax.set_yscale("log" if ax is ax1 else "linear")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--train-length", type=int, default=256)
    p.add_argument("--eval-length", type=int, default=32768)
    p.add_argument("--eval-docs", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=4, help="documents scored together")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs stated at the start of each document")
    p.add_argument("--filler", type=int, nargs=2, default=[8, 24], metavar=("MIN", "MAX"),
                   help="filler tokens between two queries, uniform in [MIN, MAX]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain little from more)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: train length 64, 30 steps, d_model 32, two documents of 3000 tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "length.json"))
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        quick = dict(train_length=64, eval_length=3000, eval_docs=2, d_model=32, steps=30, batch=8, log_every=0)
        for key, value in quick.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import describe
    from ssmforge.models import FAMILIES as REGISTERED, SYMBOLS

    source = RecallSource(n_pairs=args.pairs, run=tuple(args.filler))
    eval_rng = np.random.default_rng(10_000 + args.seed)  # held out: the training stream uses seed + 1
    eval_docs = [source.document(args.eval_length, eval_rng) for _ in range(args.eval_docs)]
    floor = {name: s["floor_perplexity"] for name, s in
             bucket_stats(np.stack([d[1] for d in eval_docs]), eval_docs, args.eval_length).items()}
    results, skipped = {}, {}
    for family in args.families:
        unit = "M*" if family == "hybrid" else REGISTERED.get(family)
        missing = sorted(set(unit) - set(SYMBOLS)) if unit else None
        if unit is None or missing:
            skipped[family] = "not a family" if unit is None else f"mixer symbol(s) {missing} not registered"
            print(f"skipping {family}: {skipped[family]}")
            continue
        print(f"{family}:", flush=True)
        results[family] = run_family(family, args, source, eval_docs)
        r = results[family]
        print(f"  trained {r['train_seconds']:.0f}s (loss {r['final_train_loss']:.3f}), scored "
              f"{args.eval_docs}x{args.eval_length} tokens in {r['eval_seconds']:.0f}s", flush=True)

    text = table(results, floor)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = dict(machine=describe(), settings=settings, buckets=[bucket_name(lo, hi) for lo, hi in BUCKETS],
                  entropy_floor_perplexity=floor, results=results, skipped=skipped, table=text)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    if plot(results, floor, png, args.train_length):
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
