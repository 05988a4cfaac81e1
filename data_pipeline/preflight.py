"""Fail before working: what `ssmforge prepare` and `ssmforge pretrain` check right after the config loads.

Every input and output the command will touch and that can be looked at without doing the work is checked here,
before torch, DeepSpeed, streaming, datasets or SentencePiece load, before a tokenizer is trained, and before
anything is written (no run folder, no `.lock`, no shard folder): the files and globs of `kind: local` sources
(each glob matches, each file is a readable, non-empty file of a known type), `tokenizer.path`, a SentencePiece
model that the parts of a prepare share, the vocabulary a tokenizer will have against the model's, the shard folder
(readable, holding this config's manifest or ready to be written) and the folders the command writes (`run_dir`,
`data.shard_dir`, `data.cache_dir` where shards are remote), which must be writable folders or creatable.

An error is one line naming the config key and its value, e.g. `data.sources.0.paths: /data/*.txt: no such file
(or the glob matches nothing)`. Only reads are made (globs, stat, access, the manifest), so every rank of a job
checks alike and stops alike. Not checked: whether a hub dataset or a remote shard folder is reachable (that needs
the network, and their readers report it), and what only reading the data shows (invalid UTF-8, bad JSON, a
missing text field): those fail while preparing, which then leaves no half-written shards (pack.undone_on_error).
Inputs that the command does not need are not checked: once the shard folder holds this config's shards, neither
the sources nor the tokenizer file need to be there any more.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ssmforge.errors import ConfigError, DataError

from .manifest import MANIFEST_FILE, is_remote, read_manifest
from .pack import (SPLITS, _check_destination, check_vocab, data_fingerprint, no_trained_tokenizer, prepare_in_job,
                   shards_ready, trained_tokenizer)
from .shards import INDEX_FILE
from .sources import expand_paths
from .tokenizer import ByteTokenizer

COMMANDS = ("prepare", "pretrain")
STEPS = (None, "part", "merge", "tokenizer")  # a prepare in one job, a part of --parts, --merge, --train-tokenizer


def preflight(config, command: str, step: str | None = None, prepare_command: str = "ssmforge prepare CONFIG") -> None:
    """Check what `command` (prepare or pretrain; for prepare, `step` says which kind, see STEPS) will read and write,
    raising DataError or ConfigError with one line naming the key; see the module doc. `prepare_command` is the
    command a training job whose data is too large to prepare itself tells the user to run."""
    if command not in COMMANDS or step not in STEPS or (step and command != "prepare"):
        raise ValueError(f"preflight: unknown command {command!r} {step!r}")
    data = config.data
    if command == "pretrain":
        writable_folder("run_dir", config.run_dir, ConfigError)
        if is_remote(data.shard_dir):  # its manifest is read over the network; the shards are cached locally
            writable_folder("data.cache_dir", data.cache_dir)
            return
        exists = _readable_shard_folder(data.shard_dir)
        if exists and shards_ready(config, prepare_command):  # refuses another config's shards
            read_manifest(data.shard_dir).check_model_vocab(config.model.vocab_size)
            _decompressible_shards(data.shard_dir)
            return
        writable_folder("data.shard_dir", data.shard_dir)  # rank 0 prepares the small data of this job
        if exists:
            _check_destination(data.shard_dir, Path(data.shard_dir), data_fingerprint(config))  # refuses others' files
        prepare_in_job(config, prepare_command, _inputs(config))  # or refuses data too large to prepare here
        return
    if step == "tokenizer" and (config.tokenizer.kind == "byte" or config.tokenizer.path):
        return  # nothing to train
    if is_remote(data.shard_dir):
        if step == "part":
            return  # prepare_part refuses a remote shard folder itself, before writing anything
        writable_folder("data.cache_dir", data.cache_dir)  # shards are staged there on their way to the remote
    else:
        # refuses another config's data, or others' files; returns this config's manifest: nothing to do
        if _readable_shard_folder(data.shard_dir) and _check_destination(
                data.shard_dir, Path(data.shard_dir), data_fingerprint(config)) is not None:
            return
        writable_folder("data.shard_dir", data.shard_dir)
    if step == "merge":  # the parts are read from the shard folder; the tokenizer file is copied beside them
        _tokenizer_file(config)
        return
    if step == "part" and config.tokenizer.kind == "sentencepiece" and not config.tokenizer.path:
        if trained_tokenizer(config, Path(data.shard_dir)) is None:
            raise no_trained_tokenizer(Path(data.shard_dir))
    _inputs(config)


def local_source_bytes(config) -> int:
    """Check every file of the `kind: local` sources (see check_file) and return their total size. Each glob is
    expanded once (sources.expand_paths: it must match, with known file types) and each file is looked at once
    (one stat and one access call, the stat giving the size that a training job's size limit needs too)."""
    total = 0
    for i, source in enumerate(config.data.sources):
        if source.kind != "local":
            continue
        key = f"data.sources.{i}.paths"
        try:
            files = expand_paths(list(source.paths))
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
        total += sum(check_file(f"{key}: {path}", path) for path in files)
    return total


def check_file(where: str, path: str | Path) -> int:
    """The size of `path`, a readable, non-empty regular file; else DataError starting with `where`."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except OSError as e:
        raise DataError(f"{where}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{where}: not a file")
    if info.st_size == 0:
        raise DataError(f"{where}: file is empty")
    if not os.access(path, os.R_OK):
        raise DataError(f"{where}: not readable (permission denied)")
    return info.st_size


def writable_folder(key: str, path: str, error: type = DataError) -> None:
    """`path` is a folder this process can write into, or can be created: its nearest existing parent is one."""
    folder = existing = Path(path)
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    problem = ("is not a folder" if not existing.is_dir() else
               "is not writable (permission denied)" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise error(f"{key}={path} {problem}" if existing == folder else
                    f"{key}={path} cannot be created: {existing} {problem}")


def _inputs(config) -> int:
    """What preparing reads: the local sources (their total size is returned) and the tokenizer file, and the
    vocabulary the tokenizer will have against the model's."""
    local_bytes = local_source_bytes(config)
    _tokenizer_file(config)
    tok = config.tokenizer
    if tok.kind == "byte":
        check_vocab(ByteTokenizer().vocab_size, config)
    elif tok.kind == "sentencepiece" and not tok.path and tok.vocab_size > config.model.padded_vocab_size:
        raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} is larger than model.vocab_size="
                          f"{config.model.vocab_size}: the SentencePiece model trained here has exactly "
                          f"tokenizer.vocab_size ids; set model.vocab_size={tok.vocab_size} or a smaller "
                          f"tokenizer.vocab_size")
    return local_bytes


def _tokenizer_file(config) -> None:
    tok = config.tokenizer
    if tok.kind != "byte" and tok.path:
        check_file(f"tokenizer.path={tok.path}", tok.path)


def _readable_shard_folder(shard_dir: str) -> bool:
    """Whether the local shard folder exists; DataError when it is not a folder, or it or its manifest cannot be
    read."""
    folder = Path(shard_dir)
    if not os.path.lexists(folder):
        return False
    if not folder.is_dir():
        raise DataError(f"data.shard_dir={shard_dir} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"data.shard_dir={shard_dir} is not readable (permission denied)")
    manifest = folder / MANIFEST_FILE
    if manifest.exists() and not os.access(manifest, os.R_OK):
        raise DataError(f"data.shard_dir={shard_dir}: {manifest} is not readable (permission denied)")
    return True


def _decompressible_shards(shard_dir: str) -> None:
    """Training reads each split through its index and, as streaming does for local shards, writes the
    decompressed copy of a shard beside it on first use: each index must be readable, and each folder holding a
    shard not yet decompressed must be writable."""
    for split in SPLITS:
        index = Path(shard_dir) / split / INDEX_FILE
        try:
            shards = json.loads(index.read_text())["shards"]
        except FileNotFoundError:
            raise DataError(f"data.shard_dir={shard_dir}: {index} is missing; prepare the data again") from None
        except PermissionError:
            raise DataError(f"data.shard_dir={shard_dir}: {index} is not readable (permission denied)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"data.shard_dir={shard_dir}: {index} is not a valid MDS index ({e})") from None
        raw = [index.parent / shard["raw_data"]["basename"] for shard in shards
               if shard.get("zip_data") and shard.get("raw_data")]
        folders = {path.parent for path in raw if not path.exists()}
        for folder in sorted(folders):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise DataError(f"data.shard_dir={shard_dir}: {folder} is not writable (permission denied), and "
                                f"training writes each shard's decompressed copy there")
