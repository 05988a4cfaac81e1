"""How long a checkpoint's integrity manifest takes to write and to verify, on a checkpoint-shaped folder of
--gb gigabytes (one large model-states file, optimizer shards, small JSON files), on one process.

    python benchmarks/checkpoint_integrity.py            # 1 GB in a temporary folder
    python benchmarks/checkpoint_integrity.py --gb 4 --dir /scratch/bench

Prints the seconds and GB/s of write_manifest and of verify, with the file pages cached (right after a
save, the usual case) and, where the process may drop the page cache (root on Linux), read from disk.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ssmforge.pretrain import integrity


def make_folder(folder: Path, gb: float) -> int:
    """Files like a ZeRO checkpoint's: 40% model states, six optimizer shards, a few small files."""
    total = int(gb * (1 << 30))
    sizes = {"mp_rank_00_model_states.pt": int(total * 0.4)}
    sizes.update({f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": int(total * 0.1) for r in range(6)})
    chunk = os.urandom(1 << 24)
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            for start in range(0, size, len(chunk)):
                f.write(chunk[:min(len(chunk), size - start)])
    for name in ("trainer_state.json", "rng_rank0.json"):
        (folder / name).write_text("{}")
    return sum(sizes.values()) + 4


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    p.add_argument("--dir", help="where to write it (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        size = make_folder(folder, args.gb)
        subprocess.run(["sync"], check=False)  # the write-back of the files is not part of the measurement
        print(f"{size / 1e9:.2f} GB in {len(list(folder.iterdir()))} files, {integrity.THREADS} hashing threads, "
              f"{os.cpu_count()} CPUs")
        rows = []
        for cache in ("cached", "from disk"):
            if cache == "from disk" and not drop_page_cache():
                print("from disk: skipped (dropping the page cache needs root)")
                continue
            started = time.perf_counter()
            integrity.write_manifest(folder)
            written = time.perf_counter() - started
            if cache == "from disk":
                drop_page_cache()
            started = time.perf_counter()
            problem = integrity.verify(folder)
            verified = time.perf_counter() - started
            assert problem is None, problem
            rows.append((cache, written, verified))
        print("| pages | write manifest | verify |\n|---|---|---|")
        for cache, written, verified in rows:
            print(f"| {cache} | {written:.2f} s ({size / written / 1e9:.1f} GB/s) | {verified:.2f} s "
                  f"({size / verified / 1e9:.1f} GB/s) |")


if __name__ == "__main__":
    main()
