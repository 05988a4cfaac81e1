"""The StreamingDataset of token samples that the loader reads: it refuses token ids outside the model's
vocabulary, and it stops streaming's background threads when an epoch is left unfinished.

Shard hashes catch damaged files, but not a shard that is intact and holds the wrong ids (written by
another tokenizer, or copied from another run): those would index past the embedding, or silently train
on garbage. Each sample is checked as it is read, before it reaches a batch, and the error names the
shard file and the sample.

streaming runs two threads per epoch (shard preparation and readiness) that stop at the epoch's end or
when the next epoch starts; an epoch left part-way (training ends at max_steps, validation reads
eval_batches) keeps them polling every few milliseconds until the process exits, each holding the dataset.
Closing the epoch's iterator here stops them."""
from __future__ import annotations

from pathlib import Path

from streaming import StreamingDataset

from ssmforge.errors import DataError


class TokenDataset(StreamingDataset):
    """StreamingDataset whose samples' `tokens` must lie in [0, vocab_size) (unchecked when vocab_size is
    None), and whose abandoned epochs release their threads."""

    def __init__(self, *args, vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size

    def __iter__(self):
        epoch = None  # streaming's state of this epoch, which its threads poll
        try:
            for sample in super().__iter__():
                if epoch is None:
                    epoch = self._iterator
                yield sample
        finally:  # also when the consumer drops the iterator part-way (GeneratorExit)
            if epoch is not None:
                epoch.exit()

    def get_item(self, sample_id: int, retry: int = 7):
        sample = super().get_item(sample_id, retry)
        tokens = sample["tokens"]
        if self.vocab_size is None or not tokens.size:
            return sample
        if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
            shard_id, index = self.spanner[sample_id]
            shard = self.shards[shard_id]
            name = (shard.zip_data or shard.raw_data).basename if hasattr(shard, "raw_data") else f"shard {shard_id}"
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise DataError(f"{Path(self.streams[0].local) / name}: sample {index} holds token id {bad}, outside the "
                            f"vocabulary [0, {self.vocab_size}) of model.vocab_size; these shards were not prepared "
                            f"with this model's tokenizer")
        return sample
