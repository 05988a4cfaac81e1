"""The command line answers at once: help, --version, `config show` and config errors load no torch,
DeepSpeed, streaming, triton, datasets or wandb (each costs seconds to import)."""
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "streaming", "triton", "datasets", "wandb", "transformers", "sentencepiece")
PROBE = """
import json, sys
from ssmforge.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def cli_imports(*args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["--version"], 0),
    (["pretrain", "--help"], 0),
    (["config", "show", "configs/tiny.yaml"], 0),
    (["pretrain", "configs/tiny.yaml", "train.bogus=1"], 2),
    (["pretrain", "configs/tiny.yaml", "model.d_model=-4"], 2),
    (["prepare", "configs/no-such-config.yaml"], 2),
    (["submit", "configs/tiny.yaml", "--time", "forever", "--dry-run"], 2),
])
def test_answers_without_heavy_imports(args, code):
    result, stderr = cli_imports(*args)
    assert result["code"] == code, stderr[-2000:]
    assert result["heavy"] == [], f"{args} imported {result['heavy']}"
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_the_probe_sees_a_heavy_import():
    """The check can fail: a command that builds a model does import torch."""
    result, stderr = cli_imports("generate", "--random-init", "configs/tiny.yaml", "--prompt", "a",
                                 "--max-new-tokens", "1")
    assert result["code"] == 0, stderr[-2000:]
    assert "torch" in result["heavy"]


def test_each_environment_builds_deepspeeds_ops_in_a_folder_of_its_own(monkeypatch, tmp_path):
    """Two environments sharing ~/.cache/torch_extensions rebuild each other's DeepSpeed ops at every start."""
    import sys

    from ssmforge.cli import keep_torch_extensions_per_environment

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folders = []
    for prefix in ("/envs/a", "/envs/b", "/envs/a"):
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(sys, "prefix", prefix)
        keep_torch_extensions_per_environment()
        folders.append(os.environ["TORCH_EXTENSIONS_DIR"])
    assert folders[0] == folders[2] != folders[1] and all(f.startswith(f"{tmp_path}/torch_extensions/env-")
                                                          for f in folders)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    keep_torch_extensions_per_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/chosen"  # the user's choice stands
