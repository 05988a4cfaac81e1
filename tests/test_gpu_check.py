"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: the plain command says so in one
line and succeeds; the CPU mode at tiny shapes runs every part end to end, and its kernel comparisons
really compare (a wrong output or a wrong gradient is reported as a failure)."""
import json
import subprocess
import sys

import pytest
import torch

from ssmforge import kernels

from .pretrain.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("kernels", "bandwidth", "train_step", "resume")


def gpu_check():
    sys.path.insert(0, str(ROOT))
    import benchmarks.gpu_check as module

    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the plain command runs the whole check")
def test_without_a_gpu_the_command_prints_one_line_and_succeeds(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stdout
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.slow
def test_tiny_cpu_run_fills_every_section(tmp_path):
    # the budgets are a GPU's: a CPU that other tests share gets three times as long
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path),
                           "--budget-scale", "3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "tiny" and not report["skipped_parts"]
    assert all(section in report for section in SECTIONS)

    cases = report["kernels"]["cases"]
    assert {c["kernel"] for c in cases} == {"scan", "ssd", "conv1d", "fftconv", "vandermonde", "cauchy", "linear_scan"}
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float64"}
    # the survey families' kernels in the one precision the models run them in, every gradient
    ssm = {c["kernel"]: c for c in cases if c["kernel"] in ("vandermonde", "cauchy", "linear_scan")}
    assert ssm["vandermonde"]["dtype"] == "float32" and set(ssm["vandermonde"]["errors"]) == {"K", "dw", "ddt_lam"}
    assert ssm["cauchy"]["dtype"] == "float64"
    assert set(ssm["cauchy"]["errors"]) == {"sums", "dnumerators", "dpoles", "ddt"}
    assert ssm["linear_scan"]["dtype"] == "float32" and set(ssm["linear_scan"]["errors"]) == {"x", "da", "db"}
    assert {c["case"] for c in cases if c["kernel"] == "linear_scan"} == {"edge", "shared", "documents"}
    assert all(c["status"] == "ok" and c["errors"] for c in cases), cases
    # every gradient was compared, not only the outputs
    scan = next(c for c in cases if c["kernel"] == "scan")
    assert {"out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"} <= set(scan["errors"])
    assert any(c["case"] == "last row" for c in cases)
    # packed rows with document resets, for every kernel
    assert {c["kernel"] for c in cases if c["case"] == "documents"} == {"scan", "ssd", "conv1d", "fftconv", "linear_scan"}
    # the gates and the conv's SiLU on inputs far below exp's float32 range
    assert {c["kernel"] for c in cases if c["case"] == "extreme"} == {"scan", "conv1d"}

    rows = report["bandwidth"]["rows"]
    assert report["bandwidth"]["copy_GBps"] > 0
    assert {r["kernel"] for r in rows} == {"scan", "ssd", "conv1d"}
    assert all(r["fwd_GBps"] > 0 and r["fwd_bwd_GBps"] > 0 and r["fwd_frac_bw"] > 0 for r in rows)
    assert report["bandwidth"]["scan_L2048_fwd_frac_bw"] > 0
    timed = report["bandwidth"]["ssm_kernels"]
    # no fused kernel on CPU
    assert [(r["kernel"], r["backend"]) for r in timed] == [("vandermonde", "ref"), ("cauchy", "ref"), ("linear_scan", "ref")]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in timed)

    for recipe in ("130m", "370m"):
        step = report["train_step"][recipe]
        assert step["status"] == "ok", step
        assert step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1
        assert step["measured_peak_bytes"] > 0 and step["planned_peak_bytes"] > 0
        assert step["kernels"].startswith("selective scan: cpu")

    resume = report["resume"]
    assert resume["status"] == "ok" and resume["losses_equal"]
    assert len(resume["straight_losses"]) == resume["steps"] == len(resume["resumed_losses"])

    targets = report["targets"]
    assert set(targets) == {"kernels_equal_oracle", "scan_bandwidth", "mfu_370m", "resume_equal"}
    assert targets["kernels_equal_oracle"]["ok"] and targets["resume_equal"]["ok"]
    summary = (tmp_path / "summary.md").read_text()
    assert "## Kernels against their oracle" in summary and "| mfu_370m |" in summary
    assert "targets:" in proc.stdout and ": ok" in proc.stdout


def test_a_wrong_kernel_output_or_gradient_is_reported(tmp_path, monkeypatch):
    check = gpu_check()
    scan, conv, vandermonde = kernels.SCAN_BACKENDS["cpu"], kernels.CONV1D_BACKENDS["cpu"], kernels.vandermonde_ref
    cauchy = kernels.cauchy_ref

    def wrong_scan(*args, **kwargs):  # an output 10% off (past the bf16 tolerance too)
        out, last = scan(*args, **kwargs)
        return out * 1.1, last

    def wrong_conv_gradient(x, weight, bias=None, activation=None, **documents):  # right values, weight gradient 10% off
        weight = weight + 0.1 * (weight - weight.detach())
        return conv(x, weight, bias, activation=activation, **documents)

    def wrong_mode_gradient(w, dt_lam, length):  # right values, dt_lam's gradient 10% off
        return vandermonde(w, dt_lam + 0.1 * (dt_lam - dt_lam.detach()), length)

    monkeypatch.setitem(kernels.SCAN_BACKENDS, "cpu", wrong_scan)
    monkeypatch.setitem(kernels.CONV1D_BACKENDS, "cpu", wrong_conv_gradient)
    def wrong_sums(numerators, poles, nodes, scales):  # values 10% off
        return 1.1 * cauchy(numerators, poles, nodes, scales)

    monkeypatch.setitem(kernels.VANDERMONDE_BACKENDS, "ref", wrong_mode_gradient)
    monkeypatch.setitem(kernels.CAUCHY_BACKENDS, "ref", wrong_sums)
    assert check.main(["--device", "cpu", "--tiny", "--parts", "kernels", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {(c["kernel"], c["case"], c["dtype"]): c for c in report["kernels"]["cases"]}
    for (kernel, _, dtype), c in status.items():
        assert c["status"] == ("FAILED" if kernel in ("scan", "conv1d", "vandermonde", "cauchy") else "ok"), c
    conv_fp32 = status[("conv1d", "edge", "float32")]["errors"]
    assert conv_fp32["out"] < 1e-5 and conv_fp32["dx"] < 1e-5 and conv_fp32["dweight"] > 0.05
    modes = status[("vandermonde", "edge", "float32")]["errors"]
    assert modes["K"] < 1e-5 and modes["dw"] < 1e-5 and modes["ddt_lam"] > 0.05
    assert not report["targets"]["kernels_equal_oracle"]["ok"]
    assert "| kernels_equal_oracle |" in (tmp_path / "summary.md").read_text()


def test_a_failed_resume_run_is_reported_with_its_cause(tmp_path, monkeypatch, capsys):
    check = gpu_check()
    monkeypatch.setattr(check, "RESUME_DATA", "data.sources=[{kind: nonsense}]")
    assert check.main(["--device", "cpu", "--tiny", "--parts", "resume", "--budget-scale", "2",
                       "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["budget_s"]["resume"] == 2 * check.BUDGET_S["resume"]
    resume = report["resume"]
    assert resume["status"] == "FAILED" and resume["failed_run"] == "straight" and resume["straight_exit"] == 2
    assert resume["cause"] == (f"ssmforge: error: {check.ROOT / 'configs' / 'tiny.yaml'}: data.sources.0.kind="
                               "'nonsense' is invalid: one of synthetic, hub, local")
    assert f"the straight run failed: {resume['cause']}" in capsys.readouterr().out
    assert resume["cause"] in (tmp_path / "summary.md").read_text()


def test_a_kernel_that_ignores_document_resets_is_reported(tmp_path, monkeypatch):
    check = gpu_check()
    scan = kernels.SCAN_BACKENDS["cpu"]

    def scan_across_documents(*args, seq_idx=None, **kwargs):  # the state flows over every boundary
        return scan(*args, **kwargs)

    monkeypatch.setitem(kernels.SCAN_BACKENDS, "cpu", scan_across_documents)
    assert check.main(["--device", "cpu", "--tiny", "--parts", "kernels", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for c in report["kernels"]["cases"]:
        assert c["status"] == ("FAILED" if (c["kernel"], c["case"]) == ("scan", "documents") else "ok"), c
