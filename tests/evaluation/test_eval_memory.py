"""eval-ppl's chunked recurrent scoring keeps memory constant in the document length: a Mamba model scoring
one document of 8k and of 32k tokens in chunks of 1024 reaches the same peak, while one forward over the
whole document (the negative control, showing the measurement sees activations) grows with L."""
import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_chunked_scoring_memory_does_not_grow_with_the_length(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.eval_memory import measure

    grown = {(length, chunk): measure("mamba", length, chunk, 1024)["peak_growth_mib"]
             for length in (8192, 32768) for chunk in (1024, None)}
    # measured: chunked 188 and 189 MiB, one forward 259 and 576 MiB (benchmarks/results/eval_memory.json);
    # the same from a parent holding 1 GiB, which the peak no longer inherits: the bound separates constant memory from activations that grow
    # with L, not a leak as small as one chunk's logits (1 MiB each, 24 MiB in all)
    assert grown[32768, 1024] - grown[8192, 1024] < 50, grown
    assert grown[32768, None] - grown[8192, None] > 150, grown
