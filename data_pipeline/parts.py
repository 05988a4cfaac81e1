"""A prepare in parts: several jobs (a SLURM array) prepare one dataset, and the last to finish merges them.

The document stream is cut into blocks of BATCH_DOCUMENTS documents (data_pipeline.pack, whose packing every
part runs); part I of N tokenizes, packs and writes blocks I, I + N, I + 2N, ... into `<split>/part-I-of-N/`
and leaves its unwritten end (at least one sample's worth) and a record in `parts/`; `merge_parts` packs those
ends into `<split>/joint/`, drops exactly the tokens a single job would drop (the end of the stream), lists
every shard in one `<split>/index.json` and writes the one manifest. The dataset then holds the documents of a
single job's, each whole but the one a single job cuts too, and the same samples, tokens and dropped tail
per split; only which document lands in which sample differs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ssmforge.errors import ConfigError, DataError

from .manifest import Manifest, SplitStats
from .pack import (PARTS_DIR, SPLITS, TOKENIZER_FILE, _check_destination, _checked_tokenizer, _destination, _finish,
                   _pack, _source_records, _tokenizer_record, data_fingerprint, missing_folders, undone_on_error)
from .shards import INDEX_FILE, ShardWriter, merge_indexes, write_json_atomic

log = logging.getLogger(__name__)

JOINT_DIR = "joint"


def part_name(part: int, parts: int) -> str:
    return f"part-{part:05}-of-{parts:05}"


@dataclasses.dataclass
class PartResult:
    """A part's record (what it wrote), how many parts are done, and the merged manifest once all are."""

    record: dict
    done: int
    manifest: Manifest | None


def check_splittable(config, parts: int, prefix: str = "") -> None:
    """Refuse a prepare in `parts` > 1 parts of a source with a token budget (`prefix` names what asked)."""
    for i, source in enumerate(config.data.sources):
        if source.max_tokens is not None and parts > 1:
            raise ConfigError(f"{prefix}data.sources.{i}.max_tokens={source.max_tokens} cannot be split over parts: "
                              f"where a source's budget ends depends on the token count of every document before "
                              f"it, which no part tokenizes; cap it with max_documents, or prepare in one job (it "
                              f"uses every core)")


def prepare_part(config, part: int, parts: int, workers: int | None = None) -> PartResult:
    """Prepare part `part` of `parts` (see the module doc) and, when every part is done, merge them.

    Idempotent: a finished part does nothing, one that died half-way starts over. Every part reads the whole
    document stream (skipping others' blocks costs reading them, not tokenizing, packing or writing them), so
    the sources must give every part the same stream, and data.shard_dir must be a folder all parts share."""
    if parts < 1 or not 0 <= part < parts:
        raise ConfigError(f"--part {part} --parts {parts}: the part must be in 0..{parts - 1}")
    out, remote, local = _destination(config)
    if remote:
        raise DataError(f"data.shard_dir={out}: a prepare in parts writes into a folder every part shares (a shared "
                        f"filesystem); prepare there and copy the folder to the remote, or prepare in one job")
    check_splittable(config, parts)
    created = [local / split for split in SPLITS if not (local / split).exists()] + missing_folders(local)
    local.mkdir(parents=True, exist_ok=True)
    expected = data_fingerprint(config)
    existing = _check_destination(out, local, expected)
    if existing is not None:
        log.info("%s already holds this dataset; nothing to do", out)
        return PartResult(record={}, done=parts, manifest=existing)
    records = _part_records(local, expected, parts)
    if part in records:
        log.info("%s of %s is done already; nothing to do", part_name(part, parts), out)
        record = records[part]
    else:
        name = part_name(part, parts)  # a part that fails leaves none of its shards (nor folders it made, if empty)
        with undone_on_error([local / split / name for split in SPLITS], created,
                             done=local / PARTS_DIR / f"{name}.json"):
            record = _prepare_part(config, local, expected, part, parts, workers)
        # read again: parts that finished meanwhile count too, or two parts finishing together would each see
        # the other missing and neither would merge (two that both see all done both merge, which is safe)
        records = _part_records(local, expected, parts)
    if len(records) < parts:
        return PartResult(record=record, done=len(records), manifest=None)
    return PartResult(record=record, done=parts, manifest=merge_parts(config))


def _part_records(local: Path, expected: str, parts: int | None) -> dict[int, dict]:
    """The records of finished parts, by part; refuse those of another config or another number of parts."""
    records = {}
    for path in sorted((local / PARTS_DIR).glob("part-*.json")):
        record = json.loads(path.read_text())
        if record["fingerprint"] != expected:
            raise DataError(f"{path}: a part prepared from a different config; remove {local / PARTS_DIR} or "
                            f"choose another data.shard_dir")
        if parts is not None and record["parts"] != parts:
            raise DataError(f"{path}: {local} holds parts of a prepare in {record['parts']} parts, not {parts}; "
                            f"use --parts {record['parts']}, or remove {local / PARTS_DIR} and the split folders "
                            f"to start over")
        parts = record["parts"]
        records[record["part"]] = record
    return records


def _prepare_part(config, local: Path, expected: str, part: int, parts: int, workers: int | None) -> dict:
    name = part_name(part, parts)
    tokenizer, tokenizer_path, kind, dtype = _checked_tokenizer(config, local, train=False)
    folders = {split: local / split / name for split in SPLITS}
    for folder in folders.values():  # what a part that died half-way left
        shutil.rmtree(folder, ignore_errors=True)
    packed = _pack(config, kind, tokenizer_path, dtype, folders, part, parts, workers, hold=True)
    (local / PARTS_DIR).mkdir(exist_ok=True)
    for split in SPLITS:
        np.save(local / PARTS_DIR / f"{name}.{split}.npy", packed.held[split])
    record = {
        "fingerprint": expected, "part": part, "parts": parts, "token_dtype": dtype.name,
        "tokenizer": _tokenizer_record(tokenizer, kind, tokenizer_path),
        "splits": {split: {**dataclasses.asdict(packed.stats[split]), "held_tokens": len(packed.held[split]),
                           "held_documents": packed.held_documents[split]} for split in SPLITS},
        "source_documents": packed.source_documents, "source_tokens": packed.source_tokens,
        "skipped": dataclasses.asdict(packed.skipped), "seconds": packed.seconds,
    }
    write_json_atomic(local / PARTS_DIR / f"{name}.json", record)  # last: its presence marks the part done
    tokens = sum(packed.source_tokens)
    log.info("prepared %s: %d documents, %d tokens in %.1fs (%.2fM tokens/s)", name, sum(packed.source_documents),
             tokens, packed.seconds, tokens / max(packed.seconds, 1e-9) / 1e6)
    return record


def merge_parts(config) -> Manifest:
    """Merge the finished parts of a prepare in parts into one dataset and its manifest (see the module doc);
    idempotent, and safe to run from two jobs at once (they write the same files, each through a rename)."""
    out, _, local = _destination(config)
    expected = data_fingerprint(config)
    existing = _check_destination(out, local, expected)
    if existing is not None:
        return existing
    records = _part_records(local, expected, None)
    if not records:
        raise DataError(f"{out}: no finished parts to merge; run `ssmforge prepare CONFIG --parts N --part I` for "
                        f"every part first")
    parts = next(iter(records.values()))["parts"]
    missing = [i for i in range(parts) if i not in records]
    if missing:
        raise DataError(f"{out}: parts {', '.join(map(str, missing))} of {parts} are not done yet; run them "
                        f"(`ssmforge prepare CONFIG --parts {parts} --part I`), the last one merges")
    records = [records[i] for i in range(parts)]
    if len({json.dumps(r["tokenizer"], sort_keys=True) for r in records}) > 1:
        raise DataError(f"{out}: the parts were tokenized with different tokenizer files; prepare them again")
    width, dtype = config.data.seq_len + 1, np.dtype(records[0]["token_dtype"])
    stats, layout = {}, {}
    for split in SPLITS:
        stats[split], layout[split] = _merge_split(local / split, local / PARTS_DIR, split, records, width, dtype)
    if stats["train"].samples == 0:
        raise DataError(f"{out}: the sources gave {sum(sum(r['source_tokens']) for r in records)} tokens, fewer "
                        f"than one training sample of {width}; add data or lower data.seq_len")
    first = records[0]
    manifest = Manifest(
        fingerprint=expected, seq_len=config.data.seq_len, token_dtype=dtype.name, seed=config.seed,
        tokenizer=first["tokenizer"],
        sources=_source_records(config, [sum(r["source_documents"][i] for r in records) for i in
                                         range(len(config.data.sources))],
                                [sum(r["source_tokens"][i] for r in records) for i in range(len(config.data.sources))]),
        splits=stats, skipped=first["skipped"], parts={"count": parts, "joint": layout},
    )
    tokenizer_file = str(local / TOKENIZER_FILE) if first["tokenizer"]["file"] else None
    _finish(manifest, local, out, False, config.tokenizer.path if config.tokenizer.path else tokenizer_file)
    log.info("merged %d parts into %s: train %d samples, val %d samples", parts, out, stats["train"].samples,
             stats["val"].samples)
    return manifest


def _merge_split(split_dir: Path, parts_dir: Path, split: str, records: list[dict], width: int,
                 dtype: np.dtype) -> tuple[SplitStats, dict]:
    """One split's parts into one: the tokens a single job would drop (the last total % width of the stream,
    at the end of its last documents, which lie in the parts' held ends) are taken off, the rest of the held
    ends is packed into joint/ (the part holding the document that is cut, last, so that its kept start ends
    the stream as in a single job), and index.json lists every part's shards and joint's."""
    parts = len(records)
    own = [r["splits"][split] for r in records]
    held = [np.load(parts_dir / f"{part_name(i, parts)}.{split}.npy") for i in range(parts)]
    total = sum(s["tokens"] + s["held_tokens"] for s in own)
    drop = total % width
    cut, cut_document_part, dropped = [0] * parts, None, 0
    for index, length, part in sorted(((i, n, p) for p, s in enumerate(own) for i, n in s["held_documents"]),
                                      reverse=True):
        if dropped == drop:
            break
        take = min(length, drop - dropped)
        cut[part] += take
        dropped += take
        if take < length:
            cut_document_part = part
    if dropped != drop:  # cannot happen: every part holds at least one sample's worth, more than `drop`
        raise DataError(f"{split_dir}: the parts' held tokens do not cover the stream's end; prepare them again")
    order = [p for p in range(parts) if p != cut_document_part] + [cut_document_part] * (cut_document_part is not None)
    joint = np.concatenate([held[p][:len(held[p]) - cut[p]] for p in order] or [np.empty(0, dtype)]).astype(dtype)
    assert len(joint) % width == 0, (len(joint), width)
    tmp = split_dir / f".{JOINT_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, dtype, width)
    writer.write(joint.reshape(-1, width))
    joint_samples = writer.finish()
    _replace_folder(tmp, split_dir / JOINT_DIR)
    samples = merge_indexes(split_dir, [part_name(i, parts) for i in range(parts)] + [JOINT_DIR])
    assert samples == sum(s["samples"] for s in own) + joint_samples
    surprisals = [s["surprisal_nats"] for s in own]
    stats = SplitStats(samples=samples, tokens=samples * width, documents=sum(s["documents"] for s in own),
                       dropped_tail_tokens=drop,
                       surprisal_nats=None if None in surprisals else float(sum(surprisals)))
    return stats, {"order": order, "held_tokens": [len(held[p]) - cut[p] for p in order]}


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; where target exists with the same index (another merge of the same parts wrote
    it), keep it and drop `new`."""
    if target.is_dir():
        if (target / INDEX_FILE).is_file() and (target / INDEX_FILE).read_bytes() == (new / INDEX_FILE).read_bytes():
            shutil.rmtree(new, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(new, target)
    except OSError:  # another merge put it there in between: the same content
        shutil.rmtree(new, ignore_errors=True)
