"""The command line answers at once: help, --version, `config show` and config errors load no torch,
DeepSpeed, streaming, triton, datasets or wandb (each costs seconds to import)."""
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
