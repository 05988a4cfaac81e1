"""Tokenizer fidelity: decode(encode(text)) == text byte for byte for the byte tokenizer, SentencePiece models
trained here and a GPT-NeoX-style tokenizer.json; prepared shards, read back with plain mosaicml-streaming and
decoded with plain sentencepiece / tokenizers, give back the input documents; a lossy SentencePiece file is
refused unless tokenizer.allow_lossy."""
import io
import json
import random
import unicodedata

import numpy as np
import pytest

from ssmforge.data_pipeline.manifest import read_manifest
from ssmforge.data_pipeline.pack import data_fingerprint, prepare
from ssmforge.data_pipeline.tokenizer import (ByteTokenizer, _training_sentences, load_tokenizer, lost_text,
                                              require_lossless, train_sentencepiece)
from ssmforge.errors import ConfigError, DataError

from .conftest import WORDS, run_config
from .test_pack import read_split

LONG_LINE = " ".join(random.Random(1).choice(WORDS) for _ in range(20000))[:100_000]  # one 100k-character line

DOCUMENTS = [
    # program source: tabs, indentation, runs of spaces, blank lines, trailing spaces
    "def f(x):\n\tif x:\n        return  x + 1   \n\n\n    return 0\n",
    "int main() {\r\n    printf(\"hi\\n\");\r\n\r\n    return 0;\r\n}\r\n",  # CRLF line endings
    "ＡＢＣ１２３ full width, ﬁnance ligature, ①, ㎏",  # NFKC would fold every one of these
    "cafe\u0301 (combining accent) is not café (precomposed)",  # NFC would merge the first into the second
    "emoji 🙂👩\u200d💻 and CJK 漢字かなカナ 한국어",
    "  \t leading and trailing whitespace \n  ",
    " ", "\n", "\t\t", "",  # whitespace-only and empty documents
    "the start of a document without a dummy prefix",
    "literal \u2581 (SentencePiece's space mark), \ue000, <s> </s> <pad> <unk> <|endoftext|> <0x0A>",
    "control characters \x00 \x0b \x0c \x1c \x85 \u2028 \u00a0 \u3000 \u200b",
    LONG_LINE,
]


def sample_texts(n=200, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(n)]


def code_texts(n=100):
    rng = random.Random(2)
    return ["".join(f"def {w}(x):\n    if x:\n        return  x\n\treturn {rng.choice(WORDS)}\n\n"
                    for w in rng.sample(WORDS, 5)) for _ in range(n)]


def neox_style_tokenizer(path, nfc=True):
    """A byte-level BPE tokenizer.json configured as GPT-NeoX-20B's (the Mamba paper's tokenizer; the hub is not
    reachable from the tests): NFC normalizer, ByteLevel pre-tokenizer, post-processor and decoder with
    add_prefix_space=False and trim_offsets=True, <|endoftext|> 0 and <|padding|> 1, and runs of 2 to 24
    spaces as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.train_from_iterator(sample_texts() + code_texts(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)])
    tok.save(str(path))
    return path


def round_trips(tok, docs=DOCUMENTS):
    """The documents whose decode(encode(doc)) differs, one at a time and through encode_batch."""
    one = [d for d in docs if tok.decode(tok.encode(d)) != d]
    batch = [d for d, ids in zip(docs, tok.encode_batch(docs)) if tok.decode(ids.tolist()) != d]
    return one, batch


# -- round trips of each tokenizer ---------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_every_document():
    assert round_trips(ByteTokenizer()) == ([], [])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_sentencepiece_round_trips_every_document(tmp_path, model_type):
    import sentencepiece as spm

    # trained on words alone: newlines, tabs, CR, rare characters are not in the vocabulary and come back
    # through byte fallback
    words = train_sentencepiece(sample_texts(), tmp_path / "words.model", 300, model_type)
    assert round_trips(words) == ([], [])
    assert lost_text(words) == []
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "words.model"))  # the file alone, as others read it
    assert [plain.decode(ids) for ids in plain.encode(DOCUMENTS)] == DOCUMENTS
    assert (words.pad_id, words.bos_id, words.eos_id, words.unk_id) == (0, 1, 2, 3)
    assert not {0, 1, 2, 3} & {i for d in DOCUMENTS for i in words.encode(d)}  # text never becomes a special id
    assert plain.encode("\n", out_type=str) == ["<0x0A>"]

    # trained on code, with the fidelity documents in the sample: whitespace is learned as pieces
    code = train_sentencepiece(code_texts() + sample_texts() + DOCUMENTS, tmp_path / "code.model", 360, model_type)
    assert round_trips(code) == ([], [])
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "code.model"))
    assert plain.piece_to_id("\n") != plain.unk_id()
    assert len(plain.encode("    ")) == 1 and len(plain.encode("        ")) <= 2  # indentation: whole pieces
    assert not any(plain.is_byte(i) for i in plain.encode("def fox(x):\n    if x:\n        return  x\n"))


def test_training_sentences_keep_every_byte_and_fit_the_limit():
    doc = "ab\ncd\n" * 10 + "é" * 40 + "\nlast"  # a newline-free stretch of 2-byte characters longer than the limit
    chunks = list(_training_sentences([doc, "short", ""], limit=16))
    assert "".join(chunks[:-1]) == doc and chunks[-1] == "short"
    assert all(0 < len(c.encode()) <= 16 for c in chunks)
    assert chunks[1].startswith("\n")  # cut before a newline, not after it (the trainer strips trailing whitespace)


@pytest.mark.parametrize("nfc", [True, False])
def test_gpt_neox_style_tokenizer_json_round_trips(tmp_path, nfc):
    from tokenizers import Tokenizer

    path = neox_style_tokenizer(tmp_path / "tokenizer.json", nfc=nfc)
    tok = load_tokenizer("hf", path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 0, 1)
    # GPT-NeoX's NFC normalizer composes 'e' + U+0301 into 'é'; that is all it changes
    expected = [unicodedata.normalize("NFC", d) if nfc else d for d in DOCUMENTS]
    assert [tok.decode(tok.encode(d)) for d in DOCUMENTS] == expected
    assert [tok.decode(ids.tolist()) for ids in tok.encode_batch(DOCUMENTS)] == expected
    assert sum(e != d for e, d in zip(expected, DOCUMENTS)) == nfc
    assert lost_text(tok) == []
    literal = "a document that mentions <|endoftext|> and <|padding|>"
    assert not {0, 1} & set(tok.encode(literal))  # text, not the EOS between documents
    plain = Tokenizer.from_file(str(path))
    assert plain.decode(tok.encode(literal)) == literal


# -- end to end: prepare -> shards -> plain streaming reader -> plain decoder ---------------------------------
def documents_from_shards(data_dir, decode):
    """The train split's samples in order, joined back into the EOS-joined stream (pack cuts it into
    consecutive, non-overlapping samples of seq_len + 1 and drops the incomplete tail), split on EOS: the
    decoded complete documents and the ids of the document cut by the tail."""
    manifest = read_manifest(data_dir)
    stream = read_split(data_dir / "train").reshape(-1)
    assert stream.size == manifest.splits["train"].tokens
    eos = np.flatnonzero(stream == manifest.tokenizer["eos_id"])
    pieces = np.split(stream, eos)  # each piece after the first starts with its document's EOS
    complete = [pieces[0]] + [p[1:] for p in pieces[1:-1]] if len(eos) else []
    cut = (pieces[-1][1:] if len(eos) else pieces[0]).tolist()
    return [decode(ids.tolist()) for ids in complete], cut


def write_corpus(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def corpus_documents():
    filler = " ".join(WORDS * 10)  # last, longer than a sample: the dropped tail falls inside it
    return sample_texts(100, seed=3) + code_texts(20) + DOCUMENTS + [filler]


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf"])
def test_prepared_shards_give_back_the_documents(tmp_path, kind):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    docs = corpus_documents()
    corpus = write_corpus(tmp_path / "docs.jsonl", docs)
    overrides = ["data.val_fraction=0"]
    if kind == "sentencepiece":  # trained by prepare on these documents
        overrides += ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400", "model.vocab_size=400"]
    elif kind == "hf":
        path = neox_style_tokenizer(tmp_path / "tokenizer.json")
        overrides += ["tokenizer.kind=hf", f"tokenizer.path={path}", "model.vocab_size=640"]
    manifest = prepare(run_config(tmp_path, [corpus], *overrides))
    data_dir = tmp_path / "run" / "data"
    assert manifest.splits["val"].documents == 0 and manifest.splits["train"].documents == len(docs)
    # the decoders and encoders of the plain libraries, on the file the manifest names
    if kind == "byte":
        def encode(text):
            return [b + 4 for b in text.encode("utf-8")]

        def decode(ids):
            return bytes(i - 4 for i in ids).decode("utf-8")
        expected = docs
    elif kind == "sentencepiece":
        plain = spm.SentencePieceProcessor(model_file=str(data_dir / manifest.tokenizer["file"]))
        encode, decode, expected = plain.encode, plain.decode, docs
    else:
        plain = Tokenizer.from_file(str(data_dir / manifest.tokenizer["file"]))
        encode, decode = (lambda text: plain.encode(text, add_special_tokens=False).ids), plain.decode
        expected = [unicodedata.normalize("NFC", d) for d in docs]  # GPT-NeoX's normalizer
    got, cut = documents_from_shards(data_dir, decode)
    assert got == expected[:len(got)] and len(got) >= len(docs) - 1  # at most the filler is cut by the tail
    tail = encode(docs[-1]) + [manifest.tokenizer["eos_id"]] if len(got) < len(docs) else []
    assert cut == tail[:len(cut)] and len(tail) - len(cut) == manifest.splits["train"].dropped_tail_tokens


# -- refusing a lossy SentencePiece file ----------------------------------------------------------------------
def train_with_spm_defaults(path, **options):
    """A SentencePiece model as most are trained: NFKC, extra whitespace removed, dummy prefix."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts()), model_writer=model, vocab_size=300,
                                   byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return path


def test_a_lossy_sentencepiece_file_is_refused_unless_allowed(tmp_path):
    import sentencepiece as spm

    lossy = train_with_spm_defaults(tmp_path / "lossy.model")
    plain = spm.SentencePieceProcessor(model_file=str(lossy))
    assert plain.decode(plain.encode("def f(x):\n    return  x+1")) == "def f(x): return x+1"  # what it does
    docs = code_texts(30)
    corpus = write_corpus(tmp_path / "docs.jsonl", docs)
    args = ("tokenizer.kind=sentencepiece", f"tokenizer.path={lossy}", "model.vocab_size=300", "data.val_fraction=0")
    with pytest.raises(DataError) as refused:
        prepare(run_config(tmp_path / "a", [corpus], *args))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{lossy}: the tokenizer does not give text back as it was")
    assert "normalizer 'nmt_nfkc', remove_extra_whitespaces=true" in message
    assert "loses newlines, carriage returns, tabs, runs of spaces, leading and trailing spaces, compatibility " \
           "characters such as 'ﬁ' (NFKC)" in message
    assert message.endswith("set tokenizer.allow_lossy=true to prepare data with it anyway")
    assert not (tmp_path / "a" / "run" / "data" / "train").exists()

    # allowed: the shards hold exactly what plain sentencepiece makes of the documents, lossy as it is
    manifest = prepare(run_config(tmp_path / "b", [corpus], *args, "tokenizer.allow_lossy=true"))
    stream = read_split(tmp_path / "b" / "run" / "data" / "train").reshape(-1).tolist()
    want = [i for d in docs for i in plain.encode(d) + [2]]
    assert stream == want[:len(stream)] and len(want) - len(stream) == manifest.splits["train"].dropped_tail_tokens
    assert plain.decode(plain.encode(docs[0])) != docs[0]

    # loading it outside prepare (generation from an export) is not refused
    assert load_tokenizer("sentencepiece", lossy).decode(plain.encode("a b")) == "a b"


def test_what_the_probe_finds(tmp_path):
    collapses = load_tokenizer("sentencepiece", train_with_spm_defaults(
        tmp_path / "ws.model", normalization_rule_name="identity"))  # no NFKC, but whitespace still trimmed
    assert lost_text(collapses) == ["runs of spaces", "leading and trailing spaces"]  # it trims " " only
    with pytest.raises(DataError, match=r"ws\.model: .*\(normalizer 'identity', remove_extra_whitespaces=true\): "
                                        r"it loses runs of spaces, leading and trailing spaces; "
                                        r"set tokenizer\.allow_lossy=true"):
        require_lossless(collapses, tmp_path / "ws.model")
    # identity normalization, whitespace kept and a dummy prefix (as Llama's tokenizer): nothing lost
    kept = load_tokenizer("sentencepiece", train_with_spm_defaults(
        tmp_path / "kept.model", normalization_rule_name="identity", remove_extra_whitespaces=False))
    assert lost_text(kept) == []
    require_lossless(kept, tmp_path / "kept.model")


def test_allow_lossy_is_validated_and_does_not_change_the_data(tmp_path, monkeypatch):
    from ssmforge.data_pipeline import pack
    from ssmforge.pretrain.config import TokenizerConfig

    with pytest.raises(ConfigError, match=r"tokenizer.allow_lossy='yes' is invalid: must be true or false"):
        TokenizerConfig(allow_lossy="yes").validate()
    sources = [tmp_path / "x.jsonl"]
    with pytest.raises(ConfigError, match=r"allow_lossy"):
        run_config(tmp_path, sources, "tokenizer.allow_lossy=maybe")
    given = ("tokenizer.kind=sentencepiece", "tokenizer.path=a.model")
    assert data_fingerprint(run_config(tmp_path, sources, *given)) == data_fingerprint(
        run_config(tmp_path, sources, *given, "tokenizer.allow_lossy=true"))
    # a trained tokenizer's fingerprint names the trainer: shards from the old, lossy trainer are other data
    trained, byte = run_config(tmp_path, sources, "tokenizer.kind=sentencepiece"), run_config(tmp_path, sources)
    before = data_fingerprint(trained), data_fingerprint(byte)
    monkeypatch.setattr(pack, "SENTENCEPIECE_TRAINER_VERSION", pack.SENTENCEPIECE_TRAINER_VERSION + 1)
    assert data_fingerprint(trained) != before[0] and data_fingerprint(byte) == before[1]
