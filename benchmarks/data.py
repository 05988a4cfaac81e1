"""Throughput of `prepare` end to end (read, tokenize in parallel, pack, zstd, write MDS) on a text
corpus of 100 MB or more, against the raw single-thread speed of the same tokenizer on the same text.

    python benchmarks/data.py [--megabytes 120] [--tokenizers byte,sentencepiece]

Prints a table and writes benchmarks/results/data.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402


def write_corpus(path: Path, megabytes: int) -> tuple[int, int]:
    """Synthetic English-like documents as jsonl until the file holds `megabytes` of text."""
    from ssmforge.data_pipeline.synthetic import SyntheticCorpus

    corpus, written, docs = SyntheticCorpus(seed=0), 0, 0
    with open(path, "w") as f:
        while written < megabytes * 1_000_000:
            for doc in corpus.documents(1000, start=docs):
                f.write(json.dumps({"text": doc.text}) + "\n")
                written += len(doc.text)
            docs += 1000
    return written, docs


def single_thread_tokens_per_s(tokenizer, path: Path, limit_bytes: int = 20_000_000) -> float:
    texts, size = [], 0
    with open(path) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= limit_bytes:
                break
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--tokenizers", default="byte,sentencepiece")
    args = parser.parse_args()

    from ssmforge.data_pipeline.pack import prepare
    from ssmforge.data_pipeline.tokenizer import ByteTokenizer, load_tokenizer
    from ssmforge.pretrain.config import load_config

    work = Path(tempfile.mkdtemp(prefix="ssmforge-bench-data-"))
    corpus = work / "corpus.jsonl"
    t0 = time.perf_counter()
    chars, docs = write_corpus(corpus, args.megabytes)
    print(f"corpus: {chars / 1e6:.0f} MB of text, {docs} documents ({time.perf_counter() - t0:.0f}s to generate)")
    rows = []
    for kind in args.tokenizers.split(","):
        overrides = [f"run_dir={work / kind}", f"data.sources=[{{kind: local, paths: [{corpus}]}}]",
                     "data.seq_len=2048", "model.vocab_size=8192", f"tokenizer.kind={kind}",
                     "tokenizer.vocab_size=2048", "tokenizer.train_documents=5000"]
        config = load_config(None, overrides)
        start = time.perf_counter()
        manifest = prepare(config)
        elapsed = time.perf_counter() - start
        tokens = sum(s.tokens + s.dropped_tail_tokens for s in manifest.splits.values())
        tokenizer = ByteTokenizer() if kind == "byte" else load_tokenizer(
            kind, Path(config.data.shard_dir) / manifest.tokenizer["file"])
        raw = single_thread_tokens_per_s(tokenizer, corpus)
        rows.append({"tokenizer": kind, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
                     "single_thread_tokenizer_tokens_per_s": raw, "text_mb": chars / 1e6,
                     "text_mb_per_s": chars / 1e6 / elapsed})
        print(f"{kind}: {tokens / elapsed / 1e6:.2f}M tokens/s end to end, {raw / 1e6:.2f}M tokens/s "
              f"single-thread tokenizer", flush=True)
    print(f"\n{'tokenizer':<14}{'tokens':>14}{'seconds':>10}{'prepare tok/s':>16}{'1-thread tok/s':>16}{'MB/s':>8}")
    for r in rows:
        print(f"{r['tokenizer']:<14}{r['tokens']:>14,}{r['seconds']:>10.1f}{r['tokens_per_s'] / 1e6:>15.2f}M"
              f"{r['single_thread_tokenizer_tokens_per_s'] / 1e6:>15.2f}M{r['text_mb_per_s']:>8.1f}")
    out = ROOT / "benchmarks" / "results" / "data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prepare", "machine": describe(), "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
