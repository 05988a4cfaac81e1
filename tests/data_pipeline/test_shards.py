"""Our shard writer against mosaicml-streaming's: the same bytes for the same samples, the same merged index."""
import json

import numpy as np
import pytest

from ssmforge.data_pipeline.shards import ShardWriter, merge_indexes


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype, width, size_limit, samples", [
    (np.uint16, 33, 1 << 26, 1000),  # one shard
    (np.uint16, 33, 5000, 1000),  # many shards, the last one partly filled
    (np.uint32, 129, 20_000, 301),
    (np.uint16, 17, 2000, 0),  # no samples: an index without shards
])
def test_writer_output_is_mdswriters_byte_for_byte(tmp_path, dtype, width, size_limit, samples):
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    rows = rng.integers(0, np.iinfo(dtype).max, (samples, width), dtype=np.int64).astype(dtype)
    theirs = MDSWriter(out=str(tmp_path / "theirs"), columns={"tokens": f"ndarray:{np.dtype(dtype).name}:{width}"},
                       compression="zstd", hashes=["xxh64"], size_limit=size_limit, exist_ok=True)
    for row in rows:
        theirs.write({"tokens": row})
    theirs.finish()
    ours = ShardWriter(tmp_path / "ours", dtype, width, size_limit=size_limit)
    for chunk in np.array_split(rows, 7):  # written in uneven pieces, as packing delivers them
        ours.write(chunk)
    assert ours.finish() == samples
    mine, want = files_of(tmp_path / "ours"), files_of(tmp_path / "theirs")
    assert json.loads(mine.pop("index.json")) == json.loads(want.pop("index.json"))
    assert mine == want and (samples == 0 or len(mine) >= 1)


def test_writer_through_a_process_pool_and_an_uploader(tmp_path):
    import multiprocessing

    rows = np.arange(40 * 9, dtype=np.uint16).reshape(40, 9)
    here = ShardWriter(tmp_path / "here", np.uint16, 9, size_limit=400)
    here.write(rows)
    here.finish()
    uploaded = []
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        there = ShardWriter(tmp_path / "pool", np.uint16, 9, size_limit=400, submit=pool.apply_async,
                            on_file=uploaded.append, max_inflight=2)
        there.write(rows)
        there.finish()
    assert files_of(tmp_path / "pool") == files_of(tmp_path / "here")
    shards = sorted(name for name in files_of(tmp_path / "pool") if name != "index.json")
    assert len(shards) > 3 and uploaded == shards + ["index.json"]  # every file once complete, the index last


def test_merged_index_is_streamings_merge_index(tmp_path):
    from streaming.base.util import merge_index

    split = tmp_path / "train"
    for i, folder in enumerate(["part-00000-of-00002", "part-00001-of-00002", "joint"]):
        writer = ShardWriter(split / folder, np.uint16, 5, size_limit=200)
        writer.write(np.full((7 + i, 5), i, np.uint16))
        writer.finish()
    folders = ["part-00000-of-00002", "part-00001-of-00002", "joint"]
    assert merge_indexes(split, folders) == 7 + 8 + 9
    ours = json.loads((split / "index.json").read_text())
    (split / "index.json").unlink()
    merge_index([str(split / f / "index.json") for f in folders], str(split))
    theirs = json.loads((split / "index.json").read_text())
    assert ours == theirs
    assert {s["zip_data"]["basename"].split("/")[0] for s in ours["shards"]} == set(folders)
