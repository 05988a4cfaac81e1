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
            expected += direct_nll(model, [tok.eos_id] + tok.encode(doc), max_length, stride or max_length)
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
        expected = sum(direct_nll(model, [tok.eos_id] + tok.encode(wikitext_detokenize(d)), 32, 32) for d in docs)
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


# -- conditioning: documents are read after the token training put before them ---------------------------

def test_documents_are_read_after_eos_as_packed_training_data_has_them():
    """Packing joins documents with EOS, so a trained model has seen EOS before every document and never BOS:
    scoring after BOS would condition on a token it never read. BOS only when the manifest says so."""
    torch.manual_seed(2)
    model = LanguageModel(ModelConfig(d_model=32, n_layer=2, vocab_size=260, mamba=MambaConfig(d_state=8))).eval()
    tok = ByteTokenizer()
    docs = ["first document", "and a second one"]
    default = evaluate_perplexity(model, tok, docs, "d", 64, detokenize=False)
    bos = evaluate_perplexity(model, tok, docs, "d", 64, detokenize=False, document_prefix="bos")
    with torch.no_grad():
        after_eos = sum(direct_nll(model, [tok.eos_id] + tok.encode(d), 64, 64) for d in docs)
        after_bos = sum(direct_nll(model, [tok.bos_id] + tok.encode(d), 64, 64) for d in docs)
    assert abs(after_eos - after_bos) > 1e-3  # the two conditionings are told apart
    assert default.document_prefix == "eos" and default.nll == pytest.approx(after_eos, rel=1e-5)
    assert bos.document_prefix == "bos" and bos.nll == pytest.approx(after_bos, rel=1e-5)


def test_training_document_prefix_comes_from_the_manifest(tmp_path):
    from types import SimpleNamespace

    from ssmforge.data_pipeline.manifest import Manifest
    from ssmforge.errors import DataError
    from ssmforge.evaluation.perplexity import prefix_token_id, training_document_prefix

    def config_with(record):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if record is not None:
            Manifest(fingerprint="x", seq_len=8, token_dtype="uint16", tokenizer=record, sources=[], seed=0).write(folder)
        return SimpleNamespace(data=SimpleNamespace(shard_dir=str(folder)))

    old = {"kind": "byte", "file": None, "sha256": "0", "vocab_size": 260, "eos_id": 2, "pad_id": 0, "bos_id": 1}
    assert training_document_prefix(config_with({**old, "document_prefix": "eos"})) == "eos"
    assert training_document_prefix(config_with({**old, "document_prefix": "bos"})) == "bos"
    assert training_document_prefix(config_with(old)) == "eos"  # a manifest from before the field: packed with EOS
    assert training_document_prefix(config_with(None)) == "eos"  # the shards are gone (an export moved away)
    assert training_document_prefix(None) == "eos"  # a Hugging Face folder
    with pytest.raises(DataError, match="document_prefix='cls' is invalid"):
        training_document_prefix(config_with({**old, "document_prefix": "cls"}))
    tok = ByteTokenizer()
    assert (prefix_token_id(tok, "eos"), prefix_token_id(tok, "bos")) == (tok.eos_id, tok.bos_id)


# -- the harness: eval-ppl equals lm-evaluation-harness's rolling log-likelihood ---------------------------

def rolling_windows(tokens: list[int], prefix: int, max_length: int):
    """lm-evaluation-harness's loglikelihood_rolling windows (lm_eval.utils.get_rolling_token_windows with
    context_len 1, then make_disjoint_window): (context, continuation) pairs that score every token once,
    the first after the prefix token, each later window reaching back for a full max_length of input."""
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        def get_rolling_token_windows(token_list, prefix_token, max_seq_len, context_len):
            pred_len, predicted = max_seq_len - context_len + 1, 0
            first = min(max_seq_len, len(token_list))
            yield [prefix_token] + token_list[:first - 1], token_list[:first]
            predicted += first
            while predicted < len(token_list):
                n = min(len(token_list) - predicted, pred_len)
                end = predicted + n
                yield token_list[end - max_seq_len - 1:end - 1], token_list[end - n:end]
                predicted += n

        def make_disjoint_window(pair):
            a, b = pair
            return a[:len(a) - (len(b) - 1)], b
    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, max_length, 1)]


def test_eval_ppl_equals_the_harness_rolling_loglikelihood_on_a_transformers_mamba_folder(tmp_path):
    """A transformers MambaForCausalLM folder with a GPT-NeoX-style tokenizer (<|endoftext|> is BOS and EOS,
    as in the state-spaces checkpoints): the harness reads each document after its prefix_token_id (BOS if
    the tokenizer has one, else EOS: here the same token), and eval-ppl after EOS, so both agree."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path / "hf"
    text = ("The quick brown fox jumps over the lazy dog, then naps under the old oak tree.\n" * 3 +
            "Another paragraph follows, with numbers 1 2 3 and more words to score.\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(3)
    config = transformers.MambaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, state_size=8,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.MambaForCausalLM(config).eval()
    model.save_pretrained(folder)
    (tmp_path / "doc.txt").write_text(text)

    # the harness's side: prefix_token_id (custom, else BOS, else EOS), rolling windows of max_length
    prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
    assert prefix == hf_tok.eos_token_id == 0
    tokens = hf_tok(text, add_special_tokens=False)["input_ids"]
    harness = 0.0
    with torch.no_grad():
        for context, continuation in rolling_windows(tokens, prefix, 16):
            inputs = torch.tensor([(context + continuation)[:-1]])
            logp = F.log_softmax(model(inputs).logits[0, -len(continuation):].float(), -1)
            harness -= logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item()

    out = tmp_path / "eval"
    proc = subprocess.run(ssmforge("eval-ppl", folder, "--dataset", tmp_path / "doc.txt", "--max-length", 16,
                                   "--out", out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ppl-doc.txt-L16-S16.json").read_text())
    assert result["document_prefix"] == "eos" and result["tokens"] == len(tokens)
    assert result["nll"] == pytest.approx(harness, rel=1e-4)


# -- length: windows longer than a chunk are fed recurrently, the state carried ---------------------------

def tiny(family: str, **kw) -> LanguageModel:
    from ssmforge.models import AttentionConfig, GSSConfig, Mamba2Config

    torch.manual_seed(4)
    config = ModelConfig(family=family, d_model=32, n_layer=2 if family != "hybrid" else 3, vocab_size=260,
                         layer_pattern="M*M" if family == "hybrid" else None, mamba=MambaConfig(d_state=8),
                         mamba2=Mamba2Config(d_state=8, headdim=8, chunk_size=16), gss=GSSConfig(d_state=8),
                         attention=AttentionConfig(heads=4, **kw))
    return LanguageModel(config).eval()


CHUNK_MODELS = [("mamba", {}), ("mamba2", {}), ("gss", {}), ("hybrid", {}), ("hybrid", {"window": 24}),
                ("transformer", {"window": 24})]


@pytest.mark.parametrize("family,attention", CHUNK_MODELS, ids=[f + ("-window" if a else "") for f, a in CHUNK_MODELS])
def test_chunked_scoring_equals_one_forward(family, attention):
    model = tiny(family, **attention)
    tok = ByteTokenizer()
    docs = ["a document long enough for several chunks of sixteen tokens, " * 2, "short", "mid-length text, two chunks"]
    whole = evaluate_perplexity(model, tok, docs, "d", 128, batch_size=2, detokenize=False)
    chunked = evaluate_perplexity(model, tok, docs, "d", 128, batch_size=2, detokenize=False, chunk_length=16)
    assert whole.recurrent_windows == 0 and chunked.recurrent_windows == 2 and chunked.chunk_length == 16
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-5, abs=1e-5)
    strided = evaluate_perplexity(model, tok, docs, "d", 64, 24, batch_size=2, detokenize=False)
    strided_chunked = evaluate_perplexity(model, tok, docs, "d", 64, 24, batch_size=2, detokenize=False,
                                          chunk_length=10)
    assert strided_chunked.nll == pytest.approx(strided.nll, rel=1e-5, abs=1e-5)


def test_a_long_window_is_fed_in_chunks_through_one_state(monkeypatch):
    """The chunked path is the one taken: every forward reads at most chunk_length tokens, all of a window's
    chunks share one state, and each chunk continues where the previous one stopped."""
    model = tiny("mamba")
    calls = []
    forward = model.forward

    def spy(input_ids, state=None, **kw):
        calls.append((input_ids.shape[1], id(state) if state is not None else None,
                      state.seqlen if state is not None else None))
        return forward(input_ids, state=state, **kw)

    monkeypatch.setattr(model, "forward", spy)
    result = evaluate_perplexity(model, ByteTokenizer(), ["x" * 100], "d", 128, detokenize=False, chunk_length=32)
    assert [width for width, _, _ in calls] == [32, 32, 32, 4]  # 100 tokens after the prefix: 100 inputs
    assert len({state for _, state, _ in calls}) == 1 and None not in {s for _, s, _ in calls}
    assert [seqlen for _, _, seqlen in calls] == [0, 32, 64, 96]
    assert result.recurrent_windows == 1 and result.tokens == 100


@pytest.mark.slow
def test_eval_ppl_chunk_length_flag_gives_the_unchunked_result(byte_model_dir, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("a plain text document of some length, to be scored in windows of sixty-four tokens. " * 2)
    results = {}
    for name, extra in (("whole", ["--chunk-length", 64]), ("chunked", ["--chunk-length", 16])):
        out = tmp_path / name
        proc = subprocess.run(ssmforge("eval-ppl", byte_model_dir, "--dataset", data, "--max-length", 64, *extra,
                                       "--out", out), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "ppl-d.txt-L64-S64.json").read_text())
    assert results["whole"]["recurrent_windows"] == 0 and results["chunked"]["recurrent_windows"] > 0
    assert results["chunked"]["nll"] == pytest.approx(results["whole"]["nll"], rel=1e-5)
