"""A StreamingDataset of token samples that refuses token ids outside the model's vocabulary.

Shard hashes catch damaged files, but not a shard that is intact and holds the wrong ids (written by
another tokenizer, or copied from another run): those would index past the embedding, or silently train
on garbage. Each sample is checked as it is read, before it reaches a batch, and the error names the
shard file and the sample."""
from __future__ import annotations

from pathlib import Path

from streaming import StreamingDataset

from ssmforge.errors import DataError


class VocabCheckedDataset(StreamingDataset):
    """StreamingDataset whose samples' `tokens` must lie in [0, vocab_size)."""

    def __init__(self, *args, vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size

    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        tokens = sample["tokens"]
        if tokens.size and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            shard_id, index = self.spanner[sample_id]
            shard = self.shards[shard_id]
            name = (shard.zip_data or shard.raw_data).basename if hasattr(shard, "raw_data") else f"shard {shard_id}"
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise DataError(f"{Path(self.streams[0].local) / name}: sample {index} holds token id {bad}, outside the "
                            f"vocabulary [0, {self.vocab_size}) of model.vocab_size; these shards were not prepared "
                            f"with this model's tokenizer")
        return sample
