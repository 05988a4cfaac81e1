import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from ssmforge.data_pipeline.tokenizer import ByteTokenizer
from ssmforge.evaluation.perplexity import (count_words, evaluate_perplexity, scoring_windows, split_wikitext_pages,
                                   wikitext_detokenize)
from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, load_pretrained
from ssmforge.errors import ConfigError

from .conftest import ROOT, ssmforge

RAW = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) , "
       "commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game . "
       "It sold 1 @,@ 000 copies in 2 @.@ 5 weeks . \n \n = = Gameplay = = \n \n The game 's battle system is \" "
       "simple \" . \n \n = Tower Building = \n \n The building 's height is 50 @.@ 1 m ( 164 ft ) . \n")


def test_detokenize_undoes_wikitext_spacing():
    text = " The game 's battle @-@ system , ( a ) sold 1 @,@ 000 in 2 @.@ 5 weeks . \" quoted \" = = Head = = \n "
    assert wikitext_detokenize(text) == " The game's battle-system, (a) sold 1,000 in 2.5 weeks. \"quoted\" == Head ==\n"


def test_pages_split_at_level_one_headings_only():
    pages = split_wikitext_pages(RAW)
    assert [p.splitlines()[0] for p in pages] == [" = Valkyria Chronicles III = ", " = Tower Building = "]
    assert "".join(pages) == RAW  # nothing dropped
    assert split_wikitext_pages("plain text\nwith no heading\n") == ["plain text\nwith no heading\n"]


def test_words_counted_on_whitespace_runs():
    assert count_words(" a  b\nc ") == 5  # leading and trailing empties count, as the harness does
    assert count_words("one") == 1


@pytest.mark.parametrize("n,max_length,stride", [(1, 4, 4), (10, 4, 4), (12, 4, 4), (10, 4, 1), (10, 4, 3),
                                                 (5, 16, 16), (9, 3, 2)])
def test_windows_score_each_target_once_within_the_context_limit(n, max_length, stride):
    scored = []
    for w in scoring_windows(0, n, max_length, stride):
        assert 0 <= w.start <= w.score_from < w.end <= n and w.end - w.start <= max_length
        scored.extend(range(w.score_from + 1, w.end + 1))
        if w.score_from > 0:  # later windows give every scored token at least max_length - stride context
            assert w.score_from + 1 - w.start >= min(max_length - stride + 1, w.score_from + 1)
    assert scored == list(range(1, n + 1))


def test_stride_larger_than_window_is_refused():
    with pytest.raises(ConfigError, match="eval.stride=5 is invalid"):
        list(scoring_windows(0, 10, 4, 5))


def direct_nll(model, seq: list[int], max_length: int, stride: int) -> float:
    """Oracle: one forward per target token, reading exactly the context its chunk's window reads:
    target t belongs to chunk (t-1)//stride, whose window ends at min(chunk end, n) and is max_length long."""
    n, total = len(seq) - 1, 0.0
    for t in range(1, n + 1):
        end = min(((t - 1) // stride + 1) * stride, n)
        start = max(0, end - max_length)
        logits = model(torch.tensor([seq[start:t]]))[0, -1]
        total -= F.log_softmax(logits, -1)[seq[t]].item()
    return total


@pytest.mark.parametrize("max_length,stride", [(16, None), (16, 5), (64, None), (7, 1)])
def test_perplexity_equals_a_direct_computation(max_length, stride):
    torch.manual_seed(1)
    model = LanguageModel(ModelConfig(d_model=32, n_layer=2, vocab_size=260, mamba=MambaConfig(d_state=8))).eval()
    tok = ByteTokenizer()
    docs = ["short", "a somewhat longer document, of forty-odd bytes", "x" * 3, "mid-length text here."]
    result = evaluate_perplexity(model, tok, docs, "docs", max_length, stride, batch_size=3, detokenize=False)
    expected = 0.0
    with torch.no_grad():
        for doc in docs:
            expected += direct_nll(model, [tok.bos_id] + tok.encode(doc), max_length, stride or max_length)
    tokens = sum(len(d.encode()) for d in docs)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert (result.tokens, result.bytes, result.documents) == (tokens, tokens, 4)
    assert result.words == sum(len(d.split()) for d in docs)
    assert result.token_perplexity == pytest.approx(math.exp(expected / tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / tokens / math.log(2), rel=1e-5)
    assert result.word_perplexity == pytest.approx(math.exp(expected / result.words), rel=1e-5)


def test_words_and_bytes_count_the_original_text_and_tokens_the_detokenized_one():
    model = LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=260, mamba=MambaConfig(d_state=4))).eval()
    doc = " The game 's battle @-@ system . \n"
    result = evaluate_perplexity(model, ByteTokenizer(), [doc], "d", 64)
    assert result.words == 9 and result.bytes == len(doc.encode())
    assert result.tokens == len(wikitext_detokenize(doc).encode())


@pytest.mark.slow
def test_eval_ppl_command_on_one_and_two_ranks_agree(byte_model_dir, tmp_path):
    """The CLI end to end: a WikiText-style file, detokenised; two ranks split the documents and reduce."""
    data = tmp_path / "wiki.test.raw"
    data.write_text(RAW * 3)
    model = load_pretrained(byte_model_dir).eval()
    docs = split_wikitext_pages(RAW * 3)
    tok = ByteTokenizer()
    with torch.no_grad():
        expected = sum(direct_nll(model, [tok.bos_id] + tok.encode(wikitext_detokenize(d)), 32, 32) for d in docs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    results = []
    for launcher, out in ((["-m", "ssmforge"], tmp_path / "one"),
                          (["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ssmforge"], tmp_path / "two")):
        cmd = ssmforge("eval-ppl", byte_model_dir, "--dataset", data, "--max-length", 32, "--batch-size", 4,
                       "--wikitext-detokenize", "--out", out)
        cmd[1:3] = launcher
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| token perplexity |" in proc.stdout
        results.append(json.loads((out / "ppl-wiki.test.raw-L32-S32.json").read_text()))
    for r in results:
        assert r["documents"] == 6 and r["bytes"] == len((RAW * 3).encode())
        assert r["nll"] == pytest.approx(expected, rel=1e-5)
    assert results[0]["token_perplexity"] == pytest.approx(results[1]["token_perplexity"], rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--stride", "9", "--max-length", "8"], "--stride=9 is invalid: must be <= the window --max-length (8)"),
    (["--max-length", "0"], "--max-length=0 is invalid"),
    (["--dataset", "nothing-here-*.txt"], "nothing-here-"),
])
def test_eval_ppl_usage_errors_are_one_line(byte_model_dir, tmp_path, args, message):
    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    if "--dataset" not in args:
        args = args + ["--dataset", str(data)]
    proc = subprocess.run(ssmforge("eval-ppl", byte_model_dir, *args), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_eval_ppl_without_a_tokenizer_says_so(tmp_path):
    from ssmforge.models import save_pretrained

    config = ModelConfig(d_model=16, n_layer=1, vocab_size=260, mamba=MambaConfig(d_state=4))
    save_pretrained(LanguageModel(config), tmp_path / "m")
    (tmp_path / "d.txt").write_text("text\n")
    proc = subprocess.run(ssmforge("eval-ppl", tmp_path / "m", "--dataset", tmp_path / "d.txt"), cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no tokenizer found" in proc.stderr, proc.stderr
