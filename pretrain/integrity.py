"""Checkpoint integrity: a manifest of every file of a checkpoint (size and content hash), written after the
files and before `latest` moves, and verified before a resume.

A checkpoint folder's `integrity.json` lists each file under it (relative path, size, and the xxh3-128
digest of each BLOCK-byte block: blocks hash in parallel, within a file and across files, and each rank of
the run hashes its share). A resume re-reads its share and compares: a flipped bit, a truncated file or a
missing one is named. xxh3 runs at memory speed (about 10 GB/s a core), so verifying is as fast as the
files can be read. The DeepSpeed universal layout that a resume on another rank count writes into the
folder (`universal/`) is derived data, made after the manifest: it is not listed."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from .collectives import gather_objects

INTEGRITY_FILE = "integrity.json"
ALGORITHM = "xxh3_128"
BLOCK = 64 << 20  # bytes per hashed block: the unit of parallel work
EXCLUDED = ("universal",)  # top-level entries that are not part of the checkpoint as saved
THREADS = min(8, os.cpu_count() or 1)  # reads release the GIL, and so does xxhash on large buffers


def checkpoint_files(folder: Path) -> list[str]:
    """The files of the checkpoint, relative to `folder`, sorted; the manifest and derived data left out."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and relative.parts[0] not in EXCLUDED and relative.name != INTEGRITY_FILE \
                and not relative.name.endswith(".tmp"):
            files.append(relative.as_posix())
    return sorted(files)


def _block_count(size: int) -> int:
    return max(1, -(-size // BLOCK))  # an empty file is one (empty) block


def _blocks(sizes: dict[str, int]) -> list[tuple[str, int]]:
    """Every (file, block index), in a fixed order."""
    return [(name, i) for name in sorted(sizes) for i in range(_block_count(sizes[name]))]


def _share(items: list, rank: int, world_size: int) -> list:
    return items[rank::world_size]


def _hash_block(path: Path, index: int, block: int) -> str:
    with open(path, "rb") as f:
        f.seek(index * block)
        return xxhash.xxh3_128_hexdigest(f.read(block))


def hash_blocks(folder: Path, blocks: list[tuple[str, int]], block: int) -> dict[tuple[str, int], str]:
    """The digest of each (file, block index) of `block` bytes, hashed on THREADS threads."""
    with ThreadPoolExecutor(THREADS) as pool:
        digests = pool.map(lambda item: _hash_block(folder / item[0], item[1], block), blocks)
        return dict(zip(blocks, digests))


def write_manifest(folder: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Hash this rank's share of the checkpoint's blocks (rank 0's listing of the files); rank 0 writes the
    manifest, atomically. A collective: every rank calls it, after every rank's files are written. A file
    that cannot be read on any rank raises OSError on every rank (no rank is left waiting)."""
    listing = None
    if rank == 0:
        try:
            listing = {name: (folder / name).stat().st_size for name in checkpoint_files(folder)}
        except OSError as e:
            listing = f"rank 0: {e}"
    sizes = gather_objects(listing, world_size)[0]
    if isinstance(sizes, str):
        raise OSError(f"listing the checkpoint for its integrity manifest failed: {sizes}")
    try:
        mine = hash_blocks(folder, _share(_blocks(sizes), rank, world_size), BLOCK)
    except OSError as e:
        mine = f"rank {rank}: {e}"
    parts = gather_objects(mine, world_size)
    failed = [part for part in parts if isinstance(part, str)]
    if failed:
        raise OSError(f"hashing the checkpoint for its integrity manifest failed: {failed[0]}")
    path = folder / INTEGRITY_FILE
    if rank == 0:
        digests = {block: digest for part in parts for block, digest in part.items()}
        files = {name: {"size": size, "blocks": [digests[(name, i)] for i in range(_block_count(size))]}
                 for name, size in sizes.items()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"algorithm": ALGORITHM, "block_bytes": BLOCK, "files": files}, indent=1))
        os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict | None:
    """The manifest, None for a checkpoint saved before manifests existed; an unreadable one is a problem."""
    path = folder / INTEGRITY_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["algorithm"] != ALGORITHM or not isinstance(manifest["files"], dict):
            raise ValueError(f"algorithm {manifest['algorithm']!r}")
        int(manifest["block_bytes"])
        return manifest
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable integrity manifest ({e})") from None


class CorruptCheckpoint(Exception):
    """A checkpoint file that is missing, truncated or altered; the message names it."""


def find_problem(folder: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """What is wrong with the checkpoint in this rank's share of it (one line naming the file), or None.
    Sizes and presence are checked by every rank (cheap), content hashes by share. Not a collective."""
    try:
        manifest = read_manifest(folder)
    except CorruptCheckpoint as e:
        return str(e)
    if manifest is None:
        return None
    block = int(manifest["block_bytes"])
    files = manifest["files"]
    for name in sorted(files):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (listed in {INTEGRITY_FILE})"
        size = path.stat().st_size
        if size != files[name]["size"]:
            return f"{path}: {size} bytes, {files[name]['size']} when saved (truncated or rewritten)"
    blocks = [(name, i) for name in sorted(files) for i in range(len(files[name]["blocks"]))]
    found = hash_blocks(folder, _share(blocks, rank, world_size), block)  # the block size it was written with
    for (name, i), digest in sorted(found.items()):
        if digest != files[name]["blocks"][i]:
            return (f"{folder / name}: content differs from when it was saved (bytes {i * block} to "
                    f"{min((i + 1) * block, files[name]['size'])}; a flipped bit or an overwrite)")
    return None


def verify(folder: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """find_problem on every rank's share, combined: the first problem any rank found (the same answer on
    every rank), or None. A collective."""
    problems = [p for p in gather_objects(find_problem(folder, rank, world_size), world_size) if p]
    return problems[0] if problems else None
