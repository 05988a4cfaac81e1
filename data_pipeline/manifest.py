"""The manifest written beside the shards: what the data is, where it came from, and what it needs.

Its `fingerprint` hashes every config value that changes the shards, so `prepare` can tell "already
done" from "a different dataset in the same folder", and a training run can refuse shards made with
another tokenizer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ssmforge.errors import ConfigError, DataError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# The token that precedes every document in the packed training stream, recorded as the tokenizer record's
# "document_prefix": "eos" (pack.py joins documents with EOS, so each one follows an EOS) or "bos". Evaluation
# conditions each document on the same token. Manifests written before the field existed were packed with EOS.
DOCUMENT_PREFIXES = ("eos", "bos")
DEFAULT_DOCUMENT_PREFIX = "eos"


@dataclass
class SplitStats:
    samples: int = 0
    tokens: int = 0  # tokens written into samples
    documents: int = 0
    dropped_tail_tokens: int = 0  # the last incomplete sample, shorter than seq_len + 1
    surprisal_nats: float | None = None  # sum of -ln P(document) when every source knows it (synthetic)

    @property
    def entropy_floor_nats_per_token(self) -> float | None:
        """Best achievable mean loss per token under the generating source (synthetic data only); an
        estimate within about 1/seq_len, since the first token of each sample is context only."""
        from .synthetic import entropy_floor_nats_per_token

        total = self.tokens + self.dropped_tail_tokens
        if self.surprisal_nats is None or total == 0:
            return None
        return entropy_floor_nats_per_token(self.surprisal_nats, total)


@dataclass
class Manifest:
    fingerprint: str
    seq_len: int
    token_dtype: str
    tokenizer: dict  # kind, file (inside the shard folder, or None), sha256, vocab_size, special ids
    sources: list[dict]  # each source's config plus the documents and tokens (EOS included) it gave
    seed: int
    splits: dict[str, SplitStats] = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    # a prepare in parts: {"count": N, "joint": {split: {"order": parts, "held_tokens": per part}}}, the parts'
    # ends packed into <split>/joint/ in that order; empty for data prepared in one job
    parts: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for name, split in self.splits.items():
            data["splits"][name]["entropy_floor_nats_per_token"] = split.entropy_floor_nats_per_token
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise DataError(f"{where}: manifest version {data.get('version')!r}; this ssmforge reads "
                                f"version {FORMAT_VERSION}")
            splits = {}
            for name, stats in data.pop("splits").items():
                stats.pop("entropy_floor_nats_per_token", None)
                splits[name] = SplitStats(**stats)
            return cls(splits=splits, **data)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: not a valid ssmforge manifest ({type(e).__name__}: {e})") from None

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_name(MANIFEST_FILE + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    def check_model_vocab(self, vocab_size: int, where: str = "model.vocab_size") -> None:
        """A model must have an embedding row for every token id the shards can hold."""
        need = self.tokenizer["vocab_size"]
        if vocab_size < need:
            raise ConfigError(f"{where}={vocab_size} is smaller than the tokenizer of these shards "
                              f"({self.tokenizer['kind']}, {need} ids, sha256 {self.tokenizer['sha256'][:12]}); "
                              f"set {where}={need}")


    def check_tokenizer(self, kind: str, path: str | None, where: str) -> None:
        """The run's tokenizer (tokenizer.kind and, for an existing file, its sha256) must be the one the
        shards were made with: ids of another tokenizer would train on garbage without any error."""
        from .tokenizer import file_sha256

        ours = self.tokenizer
        if kind != ours["kind"]:
            raise DataError(f"{where}: the shards were made with a {ours['kind']!r} tokenizer, but tokenizer.kind="
                            f"{kind!r}; prepare the data again for this tokenizer or use the matching one")
        theirs = file_sha256(path) if path and Path(path).is_file() else ours["sha256"]
        if theirs != ours["sha256"]:
            raise DataError(f"{where}: the shards were made with another tokenizer (sha256 {ours['sha256'][:12]}) "
                            f"than tokenizer.path={path} (sha256 {theirs[:12]})")


def document_prefix(tokenizer_record: dict | None, where: str = "manifest") -> str:
    """The token ("eos" or "bos") that starts a document in training, from a manifest's tokenizer record
    (None or a record without the field: "eos", what packing has always done)."""
    value = (tokenizer_record or {}).get("document_prefix") or DEFAULT_DOCUMENT_PREFIX
    if value not in DOCUMENT_PREFIXES:
        raise DataError(f"{where}: tokenizer.document_prefix={value!r} is invalid; need one of {DOCUMENT_PREFIXES}")
    return value


def read_manifest(directory: str | Path) -> Manifest | None:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        return None
    return Manifest.from_json(path.read_text(), str(path))


def fingerprint(values: dict) -> str:
    """sha256 of a JSON-able dict with sorted keys."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def find_manifest(shard_dir: str, download_dir: str | Path) -> Manifest | None:
    """The manifest of a local or remote shard folder (a remote one is downloaded into download_dir),
    or None when there is none yet."""
    if not is_remote(shard_dir):
        return read_manifest(shard_dir)
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    return _remote_manifest(shard_dir, Path(download_dir))


def _remote_manifest(out: str, local: Path) -> Manifest | None:
    """Download out/manifest.json into local; None when the remote holds none yet."""
    from streaming.base.storage import CloudDownloader

    target = local / f".{MANIFEST_FILE}.remote"
    target.unlink(missing_ok=True)  # the downloader keeps an existing file
    try:
        CloudDownloader.direct_download(f"{out.rstrip('/')}/{MANIFEST_FILE}", str(target), timeout=60)
    except Exception as e:  # unreachable endpoint, credentials, unsupported scheme, or simply no manifest yet
        if _is_missing_object(e):
            return None
        raise DataError(f"{out}: remote is not reachable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return Manifest.from_json(target.read_text(), f"{out}/{MANIFEST_FILE}")


def _is_missing_object(error: Exception) -> bool:
    """A remote that answered "no such object" (boto's ClientError 404, or FileNotFoundError)."""
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return isinstance(error, FileNotFoundError) or code in ("404", "NoSuchKey")
