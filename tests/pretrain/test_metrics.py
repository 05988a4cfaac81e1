"""Metrics: JSONL records and resume, rank gating, wandb offline runs, plots, peak FLOP/s, MFU, memory."""
import io
import json
import math
import time
import resource
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssmforge.pretrain import metrics
from ssmforge.pretrain.metrics import MetricsLogger, mfu, peak_flops, peak_memory_bytes, read_metrics


def wandb_config(mode):
    return SimpleNamespace(mode=mode, project="ssmforge-tests", entity=None, run_name="unit")


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch, tmp_path):
    """wandb stays local: no server, no prompts, nothing outside tmp_path."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir_env"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def log_steps(run_dir, steps, mode="disabled", run_id=None, loss_offset=0.0):
    logger = MetricsLogger(run_dir, wandb_config(mode), {"seed": 1}, is_rank0=True, wandb_run_id=run_id,
                           total_steps=max(steps))
    for step in steps:
        logger.log(step, {"loss": 10.0 / step + loss_offset, "tokens_per_s": 1000.0 + step, "lr": 1e-3})
        if step % 5 == 0:
            logger.log(step, {"loss": 12.0 / step}, kind="val")
    return logger


def test_jsonl_holds_one_record_per_log_and_disabled_wandb_writes_nothing(tmp_path):
    log_steps(tmp_path, range(1, 6)).close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"),
                                                          (5, "train"), (5, "val")]
    assert records[1]["loss"] == pytest.approx(5.0) and records[1]["tokens_per_s"] == 1002.0
    assert records[-1] == {"step": 5, "kind": "val", "time": records[-1]["time"], "loss": pytest.approx(2.4)}
    assert all(r["time"] > 1.6e9 for r in records)  # unix seconds
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_dir_env").exists()


def test_train_step_owns_the_interval_and_the_throughput_arithmetic(tmp_path, monkeypatch):
    """Records only every log_every steps and at the last step; loss is the mean of every micro-step
    loss, tokens/s counts the tokens since the previous record over a controlled clock, leaving out the
    time spent checkpointing (reported on its own), MFU follows."""
    # construction, the step-2 record, a checkpoint from 104.5 to 105.5, then the step-4 and step-5 records
    clock = iter([100.0, 104.0, 104.5, 105.5, 106.0, 107.0])
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock), time=time.time))
    throughput = metrics.Throughput(log_every=2, forward_flops_per_token=2.0, peak_flops=1e6, world_size=2,
                                    device=torch.device("cpu"))
    logger = MetricsLogger(tmp_path, wandb_config("disabled"), {}, is_rank0=True, total_steps=5,
                           throughput=throughput, start_tokens=1000)
    norms = []
    for step in range(1, 6):
        logger.train_step(step, 1000 + 100 * step, torch.tensor(2.0 * step + 1), 2, 1e-3,
                          lambda: norms.append(1) or 0.25, skipped_steps=step // 4)
        if step == 3:
            with logger.excluded("checkpoint"):
                pass
    logger.validation(5, 2.0, entropy_floor=1.5)
    logger.close()
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 5] and len(norms) == 3  # the norm only when a record is due
    assert [r["loss"] for r in train] == [2.5, 4.5, 5.5]
    assert [r["tokens"] for r in train] == [1200, 1400, 1500]
    assert [r["tokens_per_s"] for r in train] == [pytest.approx(200 / 4), pytest.approx(200 / 1), pytest.approx(100)]
    assert [r["checkpoint_s"] for r in train] == [0.0, 1.0, 0.0] and [r["validation_s"] for r in train] == [0.0] * 3
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    assert train[0]["mfu"] == pytest.approx(50 / 2 * 6.0 / 1e6)
    assert train[0]["grad_norm"] == 0.25 and train[0]["peak_memory_gb"] > 0
    val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "val"]
    assert val[0]["perplexity"] == pytest.approx(math.exp(2.0)) and val[0]["entropy_floor"] == 1.5


def test_tensor_and_numpy_values_are_stored_as_numbers(tmp_path):
    logger = MetricsLogger(tmp_path, wandb_config("disabled"), {}, is_rank0=True)
    logger.log(1, {"loss": torch.tensor(2.5), "tokens": 4096, "grad_norm": torch.tensor(0.5).numpy()})
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] == 2.5 and line["tokens"] == 4096 and line["grad_norm"] == 0.5


def test_resume_drops_steps_it_rewrites(tmp_path):
    log_steps(tmp_path, range(1, 11)).close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "kind": "tra')  # torn line from a killed job
    log_steps(tmp_path, range(6, 9), loss_offset=100.0).close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["step"] for r in records if r["kind"] == "val"] == [5]  # the old step-10 eval is gone
    assert all(r["loss"] > 100 for r in records if r["kind"] == "train" and r["step"] >= 6)  # the new run's
    assert all(r["loss"] < 100 for r in records if r["step"] <= 5)
    assert not list(tmp_path.glob("*.tmp"))


def test_non_rank0_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, wandb_config("offline"), {}, is_rank0=False, wandb_run_id="abc123")
    logger.log(1, {"loss": 1.0})
    assert logger.close() is None
    assert not run_dir.exists() and not (tmp_path / "wandb_dir_env").exists()
    assert logger.wandb_run_id == "abc123"


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    log_steps(tmp_path / "tty", range(1, 11)).close()
    shown = terminal.getvalue()
    assert "10/10" in shown and "loss=1.0000" in shown and "tok/s=1,010" in shown

    pipe = io.StringIO()  # isatty() is False
    monkeypatch.setattr("sys.stderr", pipe)
    log_steps(tmp_path / "pipe", range(1, 11)).close()
    assert pipe.getvalue() == ""


def test_wandb_offline_run_lives_in_run_dir_and_resumes_same_id(tmp_path):
    run_dir = tmp_path / "run"
    first = log_steps(run_dir, range(1, 4), mode="offline")
    run_id = first.wandb_run_id
    first.close()
    assert run_id and len(run_id) >= 6
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert not (tmp_path / "wandb_dir_env").exists()  # run_dir wins over WANDB_DIR

    resumed = log_steps(run_dir, range(4, 6), mode="offline", run_id=run_id)
    assert resumed.wandb_run_id == run_id
    resumed.close()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert all((r / f"run-{run_id}.wandb").exists() for r in runs)


def test_plot_is_a_png_of_the_expected_size(tmp_path):
    import matplotlib.image

    png = log_steps(tmp_path, range(1, 21)).close()
    assert png == tmp_path / "plots" / "training.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 2_000_000
    image = matplotlib.image.imread(png)
    assert image.shape == (600, 800, 4)  # figsize (8, 6) at 100 dpi, RGBA
    assert image[..., :3].std() > 0.05  # lines were drawn, not a blank canvas


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def named(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return named


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12),
    ("NVIDIA A10G", torch.bfloat16, 70e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, 15.7e12),  # no bf16 tensor cores on Volta
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71e12),
])
def test_gpu_peak_from_table(fake_gpu, monkeypatch, name, dtype, expected):
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda *a, **k: pytest.fail("table GPU was measured"))
    fake_gpu(name)
    value, source = peak_flops(torch.device("cuda"), dtype)
    assert value == expected
    assert "datasheet" in source or "whitepaper" in source or "Baseten" in source


def test_gpu_fp32_peak_follows_tf32_setting(fake_gpu):
    fake_gpu("NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops(torch.device("cuda"), torch.float32)[0] == 67e12
        torch.set_float32_matmul_precision("high")
        assert peak_flops(torch.device("cuda"), torch.float32)[0] == 495e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_gpu_is_measured(fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, dtype: calls.append((device, dtype)) or 4.2e14)
    fake_gpu("NVIDIA Imaginary X9000")
    value, source = peak_flops(torch.device("cuda"), torch.bfloat16)
    assert value == 4.2e14 and "measured" in source and "X9000" in source
    assert calls == [(torch.device("cuda"), torch.bfloat16)]


def test_cpu_peak_is_measured_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, dtype: calls.append(dtype) or 5.5e10)
    first = peak_flops(torch.device("cpu"), torch.float32)
    second = peak_flops(torch.device("cpu"), torch.bfloat16)
    assert first[0] == second[0] == 5.5e10 and calls == [torch.float32]
    cache = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())
    (key, stored), = cache.items()
    assert stored == 5.5e10
    assert f"threads={torch.get_num_threads()}" in key and torch.__version__ in key

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another machine: measure again
        peak_flops(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2


def test_cpu_matmul_benchmark_is_quick_and_plausible():
    import time

    start = time.perf_counter()
    flops = metrics.measure_matmul_flops(torch.device("cpu"), torch.float32, budget_s=1.0)
    assert time.perf_counter() - start < 5
    assert 1e9 < flops < 1e14  # one to many cores, far below any GPU
    print(f"CPU fp32 matmul peak: {flops / 1e9:.1f} GFLOP/s with {torch.get_num_threads()} threads")


def test_mfu_arithmetic():
    assert mfu(tokens_per_s=2_000, flops_per_token=6 * 125e6, peak=3e12) == pytest.approx(0.5)
    assert mfu(0.0, 1e9, 1e12) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def _current_rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to size the allocation")
def test_cpu_peak_memory_grows_with_a_big_tensor():
    before = peak_memory_bytes(torch.device("cpu"))
    assert before > 50 * 2**20  # python + torch are resident
    # the peak only rises once resident memory passes the old peak, wherever earlier tests left it
    extra = max(before - _current_rss_bytes(), 0) + 256 * 2**20
    big = torch.ones(extra // 4, dtype=torch.float32)  # ones() touches every page
    after = peak_memory_bytes(torch.device("cpu"))
    del big
    assert after >= before + 200 * 2**20
