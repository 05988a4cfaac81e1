"""data.document_boundaries=reset in the training loss: the loss of a packed batch is the loss of its
documents each run alone, with the EOS that joins two documents read as the first input of the second."""
import torch

from ssmforge.models import LanguageModel, ModelConfig
from ssmforge.pretrain.trainer import lm_loss

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
