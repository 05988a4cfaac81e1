"""data.document_boundaries=reset in the training loss: the loss of a packed batch is the loss of its
documents each run alone, with the EOS that joins two documents read as the first input of the second."""
import json

import pytest
import torch

from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.pretrain.trainer import lm_loss

from .conftest import run_pretrain

EOS = 0


def model():
    torch.manual_seed(0)
    config = ModelConfig.from_dict(dict(family="hybrid", layer_pattern="M*", n_layer=2, d_model=32, vocab_size=50,
                                        mamba=dict(d_state=8), attention=dict(heads=4)))
    return LanguageModel(config).eval()


def test_the_reset_loss_is_the_documents_losses_each_computed_alone():
    lm = model()
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 50, (2, 25), generator=g)
    rows[0, [6, 7, 15]] = EOS  # documents of 6, 1 (EOS alone), 8 and 10 inputs
    rows[1, [0, 20]] = EOS
    with torch.no_grad():
        packed = lm_loss(lm, rows, torch.device("cpu"), torch.float32, reduction="sum", reset_at=EOS)
        flowing = lm_loss(lm, rows, torch.device("cpu"), torch.float32, reduction="sum")
        alone = 0.0
        for row in rows:
            inputs, targets = row[:-1], row[1:]
            starts = [0] + [t for t in range(1, len(inputs)) if inputs[t] == EOS] + [len(inputs)]
            for a, b in zip(starts, starts[1:]):  # each document: its inputs from its EOS on, alone
                alone += lm(inputs[None, a:b], targets=targets[None, a:b], reduction="sum")
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert abs(packed - flowing) > 1e-2  # the reset changes the loss: documents do see each other otherwise


@pytest.mark.slow
def test_the_config_reaches_the_training_and_the_validation_loss(tmp_path):
    """The same step from the same weights and batch, once with data.document_boundaries=flow and once with
    reset: both the training loss and the validation loss change. The learning rate is too small to move
    the weights, so validation after the step sees the initial weights in both runs and only the setting
    can change its loss. Rows of 1024 tokens hold EOS inside them (the synthetic documents average about
    500 bytes), so a setting that did not reach lm_loss or evaluate would run the very same computation and
    give bitwise equal losses. At initialisation the model barely reads its context, so the change is small
    (measured: 9.8e-5 in training, 1.5e-5 in validation), yet far above the 5e-7 that a different summation
    order could give at a loss of 5.6 in fp32."""
    settings = ("train.max_steps=1", "data.seq_len=1024", "train.micro_batch_size=4", "train.log_every=1",
                "train.eval_every=1", "train.eval_batches=2", "train.save_every=100", "train.lr=1e-12",
                "train.warmup_steps=0", "data.sources=[{kind: synthetic, max_documents: 2000}]")
    losses = {}
    for mode in ("flow", "reset"):
        run_pretrain(tmp_path / mode, *settings, f"data.document_boundaries={mode}")
        records = map(json.loads, (tmp_path / mode / "metrics.jsonl").read_text().splitlines())
        losses[mode] = {r["kind"]: r["loss"] for r in records if r["step"] == 1}
    assert set(losses["flow"]) == set(losses["reset"]) == {"train", "val"}, losses
    for kind in ("train", "val"):
        assert abs(losses["reset"][kind] - losses["flow"][kind]) > 5e-6, (kind, losses)
