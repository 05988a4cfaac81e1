"""Checkpoint integrity: a manifest of sizes and block hashes written with every checkpoint; a flipped bit, a
truncated or a missing file is named, and a resume falls back to the newest intact checkpoint."""
import json
import logging

import pytest
import xxhash

from ssmforge.errors import CheckpointError
from ssmforge.pretrain import checkpoint, integrity

from .conftest import run_pretrain, train_losses


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(integrity, "BLOCK", 1000)  # several blocks per file at test sizes


def make_checkpoint(root, tag: str, seed: int = 0):
    """A checkpoint-shaped folder: a state file, a 3.5-block weights file, an empty file and a nested one."""
    folder = root / tag
    (folder / "nested").mkdir(parents=True)
    (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": int(tag.split("_")[1])}))
    (folder / "weights.pt").write_bytes(bytes((i * 7 + seed) % 251 for i in range(3500)))
    (folder / "empty.pt").write_bytes(b"")
    (folder / "nested" / "optim.pt").write_bytes(b"x" * 10)
    integrity.write_manifest(folder)
    return folder


def flip_bit(path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_size_and_block_hashes(tmp_path, small_blocks):
    folder = make_checkpoint(tmp_path, "step_00000010")
    (folder / "universal").mkdir()
    (folder / "universal" / "derived.pt").write_bytes(b"later")  # written by a resume, after the manifest
    manifest = json.loads((folder / integrity.INTEGRITY_FILE).read_text())
    assert sorted(manifest["files"]) == ["empty.pt", "nested/optim.pt", "trainer_state.json", "weights.pt"]
    weights = (folder / "weights.pt").read_bytes()
    expected = [xxhash.xxh3_128_hexdigest(weights[i:i + 1000]) for i in range(0, 3500, 1000)]  # independent
    assert manifest["files"]["weights.pt"] == {"size": 3500, "blocks": expected}
    assert manifest["files"]["empty.pt"] == {"size": 0, "blocks": [xxhash.xxh3_128_hexdigest(b"")]}
    assert integrity.verify(folder) is None


@pytest.mark.parametrize("damage, message", [
    (lambda f: flip_bit(f / "weights.pt", 2500), "weights.pt: content differs from when it was saved (bytes 2000 to 3000"),
    (lambda f: flip_bit(f / "weights.pt", 3499), "weights.pt: content differs from when it was saved (bytes 3000 to 3500"),
    (lambda f: (f / "weights.pt").write_bytes((f / "weights.pt").read_bytes()[:3000]),
     "weights.pt: 3000 bytes, 3500 when saved (truncated or rewritten)"),
    (lambda f: (f / "nested" / "optim.pt").unlink(), "nested/optim.pt: missing (listed in integrity.json)"),
    (lambda f: (f / "empty.pt").write_bytes(b"\0"), "empty.pt: 1 bytes, 0 when saved"),
    (lambda f: (f / integrity.INTEGRITY_FILE).write_text("{"), "integrity.json: unreadable integrity manifest"),
])
def test_damage_is_found_and_the_file_named(tmp_path, small_blocks, damage, message):
    folder = make_checkpoint(tmp_path, "step_00000010")
    damage(folder)
    problem = integrity.verify(folder)
    assert problem is not None and message in problem, problem
    assert problem.startswith(str(folder))


def test_rank_shares_cover_every_block_once(tmp_path, small_blocks):
    folder = make_checkpoint(tmp_path, "step_00000010")
    for offset in (10, 1010, 2010, 3010):  # one flipped bit in each block of weights.pt, in turn
        flip_bit(folder / "weights.pt", offset)
        found = [integrity.find_problem(folder, rank, 3) for rank in range(3)]
        assert sum(p is not None for p in found) == 1, (offset, found)
        flip_bit(folder / "weights.pt", offset)
    assert all(integrity.find_problem(folder, rank, 3) is None for rank in range(3))


def test_a_checkpoint_saved_before_manifests_is_accepted_unverified(tmp_path):
    folder = make_checkpoint(tmp_path, "step_00000010")
    (folder / integrity.INTEGRITY_FILE).unlink()
    flip_bit(folder / "weights.pt", 5)
    assert integrity.verify(folder) is None


def test_a_damaged_latest_falls_back_to_the_newest_intact_one_with_one_warning(tmp_path, small_blocks, caplog):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, f"step_{step:08d}", seed=step)
    (tmp_path / "step_00000040").mkdir()  # a partial save, newer than latest
    (tmp_path / checkpoint.LATEST).write_text("step_00000030")
    assert checkpoint.choose_intact(tmp_path) == "step_00000030"
    flip_bit(tmp_path / "step_00000030" / "weights.pt", 100)
    (tmp_path / "step_00000020" / checkpoint.STATE_FILE).unlink()  # the one before is damaged too
    with caplog.at_level(logging.WARNING, logger="ssmforge.pretrain.checkpoint"):
        assert checkpoint.choose_intact(tmp_path) == "step_00000010"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "step_00000030/weights.pt: content differs" in warnings[0]
    assert f"resuming from {tmp_path / 'step_00000010'} instead (refused: step_00000030, step_00000020" in warnings[0]
    assert (tmp_path / checkpoint.LATEST).read_text() == "step_00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt_step_00000020", "corrupt_step_00000030", "latest", "step_00000010", "step_00000040"]


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, small_blocks):
    make_checkpoint(tmp_path, "step_00000010")
    (tmp_path / checkpoint.LATEST).write_text("step_00000010")
    (tmp_path / "step_00000010" / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="weights.pt: 0 bytes, 3500 when saved .*; no older checkpoint is "
                                              "intact either"):
        checkpoint.choose_intact(tmp_path)
    assert (tmp_path / "step_00000010").is_dir() and (tmp_path / checkpoint.LATEST).read_text() == "step_00000010"


@pytest.mark.slow
def test_training_resumes_from_the_newest_intact_checkpoint_as_if_uninterrupted(tmp_path):
    from ssmforge.pretrain.export import load_run_model

    steps = ("train.max_steps=30", "train.log_every=1", "train.eval_every=1000", "train.save_every=10",
             "train.keep_checkpoints=3")
    run_pretrain(tmp_path / "straight", *steps)
    run = tmp_path / "damaged"
    run_pretrain(run, *steps, "train.stop_at_step=20", expect=75)
    checkpoints = run / "checkpoints"
    for step in (10, 20):  # every saved checkpoint has its manifest, and it verifies
        assert (checkpoints / f"step_{step:08d}" / integrity.INTEGRITY_FILE).exists()
        assert integrity.verify(checkpoints / f"step_{step:08d}") is None
    states = checkpoints / "step_00000020" / "mp_rank_00_model_states.pt"
    flip_bit(states, states.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: content differs"):
        load_run_model(run)  # export and evaluation refuse it too
    resumed = run_pretrain(run, *steps)
    output = resumed.stdout + resumed.stderr
    assert f"{states}: content differs from when it was saved" in output
    assert f"resumed from {checkpoints / 'step_00000010'}" in output
    assert (checkpoints / "corrupt_step_00000020").is_dir()
    straight, after = train_losses(tmp_path / "straight"), train_losses(run)
    for step in range(11, 31):
        assert after[step] == pytest.approx(straight[step], abs=1e-6), step
