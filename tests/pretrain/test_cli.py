"""The installed `ssmforge` console script: help, generate, convert, and one-line errors with exit code 2."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[2]
SSMFORGE = shutil.which("ssmforge", path=str(Path(sys.executable).parent)) or "ssmforge"


def run(*args, check_code=0):
    proc = subprocess.run([SSMFORGE, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == check_code, proc.stderr
    return proc


def assert_one_line_error(proc, *fragments):
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ssmforge: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_help_lists_the_subcommands():
    out = run("--help").stdout
    for command in ("prepare", "generate", "convert"):
        assert command in out


def test_generate_from_a_random_model_is_seeded():
    args = ("generate", "--random-init", "configs/tiny.yaml", "--prompt", "Hello", "--max-new-tokens", "12")
    first, again = run(*args).stdout, run(*args).stdout
    assert first == again and first.startswith("Hello")
    assert run(*args, "--seed", "7").stdout != first


def test_generate_greedy_from_an_export_matches_the_library(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(d_model=32, n_layer=2, vocab_size=260, mamba=MambaConfig(d_state=8))).eval()
    save_pretrained(model, tmp_path / "m")
    out = run("generate", tmp_path / "m", "--tokenizer", "byte", "--prompt", "ab", "--temperature", "0",
              "--max-new-tokens", "5").stdout.rstrip("\n")
    ids = [ord("a") + 4, ord("b") + 4]
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1, :260].argmax()))
    want = bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")
    assert out == want


def test_convert_round_trip_through_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    run("convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "ours")
    run("convert", tmp_path / "ours", "--to-hf", tmp_path / "back")
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs(ids).logits)
        torch.testing.assert_close(load_pretrained(tmp_path / "ours")(ids), theirs(ids).logits, rtol=1e-4,
                                   atol=1e-4)


def test_prepare_reports_the_splits_and_is_idempotent(tmp_path):
    args = ("prepare", "configs/tiny.yaml", f"run_dir={tmp_path}", "data.sources=[{kind: synthetic, max_documents: 200}]")
    out = run(*args).stdout
    assert "train:" in out and "val:" in out and "entropy floor" in out
    assert run(*args).stdout == out
    proc = run(*args[:-1], "data.sources=[{kind: synthetic, max_documents: 300}]", check_code=2)
    assert_one_line_error(proc, "already holds data prepared from a different config")


@pytest.mark.parametrize("args, fragments", [
    (("generate", "no/such/dir", "--prompt", "x"), ["no/such/dir: not found (expected a run folder or a model folder)"]),
    (("generate", "--random-init", "configs/tiny.yaml", "--prompt", "x", "--top-p", "2"), ["top_p"]),
    (("generate", "--random-init", "configs/none.yaml", "--prompt", "x"), ["configs/none.yaml: cannot read config"]),
    (("generate", "--prompt", "x"), ["exactly one of CHECKPOINT or --random-init"]),
    (("generate", "--random-init", "configs/tiny.yaml", "--prompt", "x", "--max-new-tokens", "-1"),
     ["--max-new-tokens=-1"]),
    (("convert", "--from-hf", "configs"), ["--out"]),
    (("prepare", "configs/tiny.yaml", "data.sources=[{kind: local, paths: [missing/*.jsonl]}]", "run_dir=/tmp/x"),
     ["missing/*.jsonl: no such file"]),
    (("prepare", "configs/tiny.yaml", "data.seq_len=zero"), ["data.seq_len"]),
    (("convert", "configs", "--to-hf", "/tmp/x"), ["configs/config.json: file not found"]),
])
def test_user_errors_are_one_line_with_exit_code_2(args, fragments):
    assert_one_line_error(run(*args, check_code=2), *fragments)


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layer=1, vocab_size=64, mamba=MambaConfig(d_state=4))
    save_pretrained(LanguageModel(config), tmp_path / "m")
    proc = run("generate", tmp_path / "m", "--tokenizer", "byte", "--prompt", "x", check_code=2)
    assert_one_line_error(proc, "tokenizer has 260 ids", "holds 64")


def test_argparse_usage_error_exits_2():
    proc = run("generate", "--max-new-tokens", "many", "--prompt", "x", check_code=2)
    assert "invalid int value" in proc.stderr
