"""Every mixer through the same commands: a hybrid stack holding all of them (M Mamba, 2 Mamba-2, G GSS,
* attention, - MLP, and the Mamba-360 families S S4, Q Liquid-S4, D S4D, E DSS, H H3, Y Hyena, L LRU; GSS with its
optional short conv) trains with document resets under ZeRO-3 to the losses it has under ZeRO-0 (so every
weight a kernel reads is gathered), stops and resumes exactly, exports, and its export evaluates, fine-tunes
on GLUE and generates through the CLI."""
import json
import math
import subprocess
import sys

import pytest
import torch

from ssmforge.models import load_pretrained
from ssmforge.pretrain.export import load_run_model

from ..evaluation.glue_fixture import write_glue
from .conftest import ROOT, run_pretrain, train_losses

EVERY_MIXER = ("model.family=hybrid", "model.layer_pattern=M2G*-SQDEHYL", "model.n_layer=12",
               "model.mamba2.headdim=16",
               "model.mamba2.d_state=16", "model.mamba2.chunk_size=16", "model.gss.d_state=8", "model.gss.d_conv=4",
               "model.attention.heads=4", "model.attention.kv_heads=2", "model.s4.d_state=8",
               "model.liquid_s4.d_state=8", "model.s4d.d_state=8", "model.dss.d_state=8", "model.h3.d_state=8",
               "model.h3.head_dim=2", "model.lru.d_state=8", "data.document_boundaries=reset")
STEPS = ("train.max_steps=8", "train.log_every=1", "train.warmup_steps=2", "train.eval_every=100",
         "train.save_every=100")


def ssmforge(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssmforge", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_every_mixer_under_zero3_resumes_exports_evaluates_finetunes_and_generates(tmp_path):
    run_pretrain(tmp_path / "zero0", *EVERY_MIXER, *STEPS, "deepspeed.zero_stage=0")
    zero3 = tmp_path / "zero3"
    # every parameter partitioned, however small (by default ZeRO-3 keeps small ones whole on each rank)
    zero3_options = ("deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0")
    run_pretrain(zero3, *EVERY_MIXER, *STEPS, *zero3_options, "train.stop_at_step=4", expect=75)
    run_pretrain(zero3, *EVERY_MIXER, *STEPS, *zero3_options)
    plain, partitioned = train_losses(tmp_path / "zero0"), train_losses(zero3)
    assert sorted(plain) == sorted(partitioned) == list(range(1, 9))
    for step in plain:  # the same computation: parameters gathered around every forward that reads them
        assert partitioned[step] == pytest.approx(plain[step], abs=1e-5), step
    assert plain[8] < plain[1] - 0.3

    # the ZeRO-3 checkpoint exports to one folder whose logits equal the run's consolidated weights
    export = tmp_path / "export"
    proc = ssmforge("export", zero3, export)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "ssmforge" and config["ssmforge_model"]["layer_pattern"] == "M2G*-SQDEHYL"
    exported, (from_run, _, _) = load_pretrained(export).eval(), load_run_model(zero3)
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), from_run.eval()(ids), rtol=0, atol=0)

    # perplexity of the export and of the run folder (its latest checkpoint) agree
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran after it\n" * 6)
    results = []
    for source, out in ((export, tmp_path / "ppl-export"), (zero3, tmp_path / "ppl-run")):
        proc = ssmforge("eval-ppl", source, "--dataset", text, "--max-length", 32, "--out", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
        results.append(result)
    assert results[0]["tokens"] == results[1]["tokens"] == len(text.read_bytes())
    assert results[0]["nll"] == pytest.approx(results[1]["nll"], rel=1e-6)
    assert 1 < results[0]["token_perplexity"] < 260  # better than uniform over the bytes after 8 steps

    # a GLUE fine-tune of the hybrid backbone, and sampling from it
    write_glue(tmp_path / "glue", ["rte"], n_train=32, n_dev=16, n_test=4)
    proc = ssmforge("finetune-glue", export, "--task", "rte", "--data-dir", tmp_path / "glue", "--out",
                    tmp_path / "glue-out", "--config", ROOT / "configs" / "tiny.yaml", "glue.epochs=1",
                    "glue.batch_size=8", "glue.max_length=32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rte = json.loads((tmp_path / "glue-out" / "results.json").read_text())["tasks"]["rte"]
    assert 0 <= rte["dev"]["accuracy"] <= 1 and math.isfinite(rte["epochs"][0]["train_loss"])
    proc = ssmforge("generate", export, "--prompt", "the ", "--max-new-tokens", 12, "--temperature", 0)
    assert proc.returncode == 0 and proc.stdout.startswith("the ") and len(proc.stdout.rstrip("\n")) > 4, proc.stderr
