"""Throughput of `prepare` end to end (read, tokenize in parallel, pack, zstd, write MDS) on a text
corpus of 100 MB or more, with a profile of its stages, each timed alone on one core.

    python benchmarks/data.py [--megabytes 120] [--tokenizers byte,sentencepiece]

The SentencePiece tokenizer is trained first, as `ssmforge prepare CONFIG --train-tokenizer` does (timed on its
own); `prepare` then reuses it. Prints a table and writes benchmarks/results/data.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402

PROFILE_BYTES = 20_000_000  # text profiled stage by stage


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


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def profile(tokenizer, path: Path, seq_len: int) -> dict:
    """Seconds per million tokens of each stage of prepare, each run alone on one core over the first
    PROFILE_BYTES of text: what the pool and the main process share out."""
    import numpy as np

    from ssmforge.data_pipeline.pack import BATCH_DOCUMENTS, _join
    from ssmforge.data_pipeline.shards import ShardWriter, write_shard
    from ssmforge.data_pipeline.sources import SkipCounter, local_documents

    def read():
        texts, size = [], 0
        for text in local_documents([str(path)], "text", "fail", SkipCounter()):
            texts.append(text)
            size += len(text)
            if size >= PROFILE_BYTES:
                break
        return texts

    texts, t_read = timed(read)
    batches = [texts[i:i + BATCH_DOCUMENTS] for i in range(0, len(texts), BATCH_DOCUMENTS)]
    ids, t_tokenize = timed(lambda: [tokenizer.encode_batch(b) for b in batches])
    dtype = np.dtype(np.uint16)
    streams, t_join = timed(lambda: [_join(b, tokenizer.eos_id, dtype) for b in ids])
    tokens = sum(len(s) for s in streams)
    width = seq_len + 1
    samples, t_cut = timed(lambda: np.concatenate(streams)[:tokens // width * width].reshape(-1, width))
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(tmp, dtype, width)
        raws, t_encode = timed(lambda: [writer.encode(samples[i:i + writer.per_shard])
                                        for i in range(0, len(samples), writer.per_shard)])
        _, t_compress = timed(lambda: [write_shard(raw, tmp, f"shard.{i:05}.mds") for i, raw in enumerate(raws)])
    per_m = 1e6 / tokens
    return {"tokens": tokens, "read_and_parse_jsonl": t_read * per_m, "tokenize": t_tokenize * per_m,
            "eos_join": t_join * per_m, "cut_samples": t_cut * per_m, "encode_shards": t_encode * per_m,
            "zstd_xxh64_write": t_compress * per_m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--tokenizers", default="byte,sentencepiece")
    args = parser.parse_args()

    from ssmforge.data_pipeline.pack import cores, prepare, prepare_tokenizer
    from ssmforge.data_pipeline.tokenizer import ByteTokenizer, load_tokenizer
    from ssmforge.pretrain.config import load_config

    work = Path(tempfile.mkdtemp(prefix="ssmforge-bench-data-"))
    corpus = work / "corpus.jsonl"
    t0 = time.perf_counter()
    chars, docs = write_corpus(corpus, args.megabytes)
    print(f"corpus: {chars / 1e6:.0f} MB of text, {docs} documents ({time.perf_counter() - t0:.0f}s to generate); "
          f"{cores()} cores")
    rows = []
    for kind in args.tokenizers.split(","):
        overrides = [f"run_dir={work / kind}", f"data.sources=[{{kind: local, paths: [{corpus}]}}]",
                     "data.seq_len=2048", "model.vocab_size=8192", f"tokenizer.kind={kind}",
                     "tokenizer.vocab_size=2048", "tokenizer.train_documents=5000"]
        config = load_config(None, overrides)
        _, train_seconds = timed(prepare_tokenizer, config)
        manifest, elapsed = timed(prepare, config)
        tokens = sum(s.tokens + s.dropped_tail_tokens for s in manifest.splits.values())
        tokenizer = ByteTokenizer() if kind == "byte" else load_tokenizer(
            kind, Path(config.data.shard_dir) / manifest.tokenizer["file"])
        stages = profile(tokenizer, corpus, config.data.seq_len)
        row = {"tokenizer": kind, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
               "tokenizer_training_seconds": train_seconds,
               "tokens_per_s_with_training": tokens / (elapsed + train_seconds),
               "single_thread_tokenizer_tokens_per_s": 1e6 / stages["tokenize"], "text_mb": chars / 1e6,
               "text_mb_per_s": chars / 1e6 / elapsed, "profile_seconds_per_million_tokens": stages}
        if kind == "sentencepiece":  # the model alone, without our cache of words
            texts = [json.loads(line)["text"] for line, _ in zip(open(corpus), range(20000))]
            ids, seconds = timed(tokenizer.sp.encode, texts)
            row["single_thread_sentencepiece_encode_tokens_per_s"] = sum(map(len, ids)) / seconds
        rows.append(row)
        print(f"{kind}: {tokens / elapsed / 1e6:.2f}M tokens/s end to end"
              + (f" ({row['tokens_per_s_with_training'] / 1e6:.2f}M with the {train_seconds:.1f}s of tokenizer "
                 f"training)" if train_seconds > 0.5 else "")
              + f"; one core: {row['single_thread_tokenizer_tokens_per_s'] / 1e6:.2f}M tokens/s tokenizing", flush=True)
    print(f"\n{'tokenizer':<14}{'tokens':>14}{'seconds':>10}{'prepare tok/s':>16}{'1-thread tok/s':>16}{'MB/s':>8}")
    for r in rows:
        print(f"{r['tokenizer']:<14}{r['tokens']:>14,}{r['seconds']:>10.1f}{r['tokens_per_s'] / 1e6:>15.2f}M"
              f"{r['single_thread_tokenizer_tokens_per_s'] / 1e6:>15.2f}M{r['text_mb_per_s']:>8.1f}")
    stages = list(rows[0]["profile_seconds_per_million_tokens"])[1:]
    print(f"\none core, seconds per million tokens:\n{'stage':<22}" + "".join(f"{r['tokenizer']:>16}" for r in rows))
    for stage in stages + ["total"]:
        values = [sum(r["profile_seconds_per_million_tokens"][s] for s in stages) if stage == "total"
                  else r["profile_seconds_per_million_tokens"][stage] for r in rows]
        print(f"{stage:<22}" + "".join(f"{v:>16.4f}" for v in values))
    out = ROOT / "benchmarks" / "results" / "data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prepare", "machine": describe(), "workers": cores(), "results": rows},
                              indent=2))
    print(f"\nwrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
