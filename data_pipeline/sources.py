"""Document sources: the Hugging Face hub (through `datasets`), local files, and the embedded synthetic
corpus, mixed by weight into one deterministic stream of documents.

Every source yields plain strings. Local files are read here rather than through `datasets` so that
each problem (empty file, invalid UTF-8, a missing text field) is reported with the file and line.
"""
from __future__ import annotations

import glob
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ssmforge.errors import DataError

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".txt")


@dataclass
class SkipCounter:
    """Documents dropped on purpose (invalid UTF-8 with `invalid_utf8: skip`), recorded in the manifest."""

    invalid_utf8: int = 0
    files: list[str] = field(default_factory=list)


def _decode(raw: bytes, where: str, policy: str, skipped: SkipCounter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "skip":
            skipped.invalid_utf8 += 1
            if where not in skipped.files:
                skipped.files.append(where)
            return None
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start} (set data.invalid_utf8=skip to drop such "
                        f"documents)") from None


def expand_paths(patterns: list[str], formats: tuple[str, ...] | None = LOCAL_FORMATS) -> list[Path]:
    """Globs -> sorted existing files; a pattern matching nothing is an error, not an empty source.
    Files must end in one of `formats` (None: any)."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"{pattern}: no such file (or the glob matches nothing)")
        for match in matches:
            path = Path(match)
            if formats is not None and path.suffix not in formats:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {formats}")
            files.append(path)
    return files


def _read_jsonl(path: Path, text_field: str, policy: str, skipped: SkipCounter) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, f"{path}:{lineno}", policy, skipped)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{lineno}: no text field {text_field!r} (set the source's text_field)")
            if not isinstance(record[text_field], str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(record[text_field]).__name__}, "
                                f"not text")
            yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _read_txt(path: Path, policy: str, skipped: SkipCounter) -> Iterator[str]:
    """A .txt file is one document."""
    text = _decode(path.read_bytes(), str(path), policy, skipped)
    if text is not None:
        yield text


def local_documents(patterns: list[str], text_field: str, policy: str, skipped: SkipCounter) -> Iterator[str]:
    for path in expand_paths(patterns):
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        if path.suffix in (".jsonl", ".json"):
            docs = _read_jsonl(path, text_field, policy, skipped)
        elif path.suffix == ".parquet":
            docs = _read_parquet(path, text_field)
        else:
            docs = _read_txt(path, policy, skipped)
        count = 0
        for doc in docs:
            count += 1
            yield doc
        if count == 0 and not skipped.files:
            raise DataError(f"{path}: holds no documents")


def hub_documents(name: str, subset: str | None, split: str, text_field: str, streaming: bool) -> Iterator[str]:
    """A Hugging Face hub dataset, read with `datasets` (streaming by default: the Pile never lands on disk)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as e:  # network, missing dataset, bad split: datasets raises many types
        raise DataError(f"hub dataset {name!r} ({subset or 'default'}, split {split!r}) could not be loaded: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for row in dataset:
        if text_field not in row:
            raise DataError(f"hub dataset {name!r}: no text field {text_field!r} (fields: {sorted(row)})")
        yield row[text_field]


def synthetic_documents(seed: int, count: int | None) -> Iterator[tuple[str, float]]:
    """(text, -ln P(text)) from the embedded synthetic corpus: `count` documents, or without end when None."""
    from .synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(seed=seed)
    for i in range(count) if count is not None else itertools.count():
        doc = corpus.document(i)
        yield doc.text, doc.surprisal_nats


HELDOUT_DOCUMENTS = 200


def heldout_synthetic_documents(sources, seed: int, count: int = HELDOUT_DOCUMENTS) -> list[tuple[str, float]]:
    """(text, -ln P(text)) of `count` documents of the run's synthetic source that training never saw: those
    after its first max_documents (mixed_documents gives source i the seed seed + i)."""
    from ssmforge.errors import ConfigError

    from .synthetic import SyntheticCorpus

    for i, source in enumerate(sources):
        if source.kind != "synthetic":
            continue
        if source.max_documents is None:
            raise ConfigError(f"eval.dataset=synthetic-heldout needs data.sources.{i}.max_documents: the documents "
                              f"after the ones training read are the held-out ones")
        corpus = SyntheticCorpus(seed=seed + i)
        docs = (corpus.document(source.max_documents + j) for j in range(count))
        return [(doc.text, doc.surprisal_nats) for doc in docs]
    raise ConfigError("eval.dataset=synthetic-heldout: the run has no synthetic source (data.sources)")


def source_documents(source, seed: int, policy: str, skipped: SkipCounter) -> Iterator[tuple[str, float | None]]:
    """(text, surprisal in nats where the source knows it, else None), capped at max_documents. The token budget
    (max_tokens) needs the tokenizer's counts and is applied by TokenBudget where they are known."""
    if source.kind == "synthetic":
        docs = synthetic_documents(seed, source.max_documents)
    else:
        if source.kind == "local":
            texts = local_documents(list(source.paths), source.text_field, policy, skipped)
        else:
            texts = hub_documents(source.name, source.subset, source.split, source.text_field, source.streaming)
        docs = ((text, None) for text in texts)
    for i, doc in enumerate(docs):
        if source.max_documents is not None and i >= source.max_documents:
            return
        yield doc


def mixed_documents(sources, seed: int, policy: str,
                    skipped: SkipCounter) -> Iterator[tuple[int, str, float | None]]:
    """(source index, text, surprisal or None): each next document comes from source i with probability weight_i / sum of
    weights, until the first source runs out (as datasets' interleave_datasets does by default), so
    the mixture keeps its proportions. The manifest records how many documents each source gave. A source
    whose token budget is spent has run out too: TokenBudget cuts this stream where that happens."""
    streams = [source_documents(s, seed + i, policy, skipped) for i, s in enumerate(sources)]
    weights = [s.weight for s in sources]
    if len(streams) == 1:  # nothing to mix
        yield from ((0, *doc) for doc in streams[0])
        return
    rng = random.Random(seed)
    indices = range(len(streams))
    while True:
        i = rng.choices(indices, weights=weights)[0]
        try:
            yield (i, *next(streams[i]))
        except StopIteration:
            return


class TokenBudget:
    """The sources' token budgets (max_tokens) applied to the mixed stream once its documents are tokenized.

    A document's tokens are its ids plus the EOS that follows it. A source with a budget gives documents while
    the tokens it has given are below the budget: the document that reaches or passes it is the last one, whole
    (no document is cut), so the source gives between max_tokens and max_tokens + that document's length - 1.
    It has then run out, and the mixture stops where it would next draw from it, as it does for a source
    that runs out of documents (with one source: right after that document). `admit` is called for each
    document in stream order and says whether it belongs to the data; once it says no, the stream has ended.
    """

    def __init__(self, sources):
        self.limits = [s.max_tokens for s in sources]
        self.documents = [0] * len(sources)
        self.tokens = [0] * len(sources)
        self.spent = [False] * len(sources)
        self.ended = False

    def admit(self, source: int, tokens: int) -> bool:
        if self.ended or self.spent[source]:
            self.ended = True
            return False
        self.documents[source] += 1
        self.tokens[source] += tokens
        limit = self.limits[source]
        if limit is not None and self.tokens[source] >= limit:
            self.spent[source] = True
            self.ended = len(self.limits) == 1
        return True

    def admit_batch(self, sources: list[int], lengths) -> int:
        """How many documents of a batch (their sources and token counts, in order) belong to the data."""
        if not any(limit is not None for limit in self.limits) and not self.ended:
            for source, length in zip(sources, lengths):  # no budget: count only
                self.documents[source] += 1
                self.tokens[source] += int(length)
            return len(sources)
        for i, (source, length) in enumerate(zip(sources, lengths)):
            if not self.admit(source, int(length)):
                return i
        return len(sources)
