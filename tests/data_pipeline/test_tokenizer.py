"""Tokenizers: SentencePiece training with our special ids, Hugging Face files, the byte tokenizer."""
import pytest

from ssmforge.data_pipeline.tokenizer import ByteTokenizer, file_sha256, load_tokenizer, train_sentencepiece
from ssmforge.errors import DataError

from .conftest import WORDS


def sample_texts(n=300):
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(n)]


def test_sentencepiece_training_layout_and_byte_fallback(tmp_path):
    tok = train_sentencepiece(sample_texts(), tmp_path / "tok.model", vocab_size=400, model_type="bpe")
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    text = "the lazy fox — naïve 漢字 🙂"  # characters never seen in training come back through byte pieces
    assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(text)
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    assert tok.fingerprint() == file_sha256(tmp_path / "tok.model")
    again = load_tokenizer("sentencepiece", tmp_path / "tok.model")
    assert [list(a) for a in again.encode_batch(["jumps over", "a dog"])] == [again.encode("jumps over"),
                                                                            again.encode("a dog")]


def test_unigram_and_too_large_vocab(tmp_path):
    assert train_sentencepiece(sample_texts(), tmp_path / "u.model", 300, "unigram").vocab_size == 300
    with pytest.raises(DataError, match="tokenizer.vocab_size=100000 may be too large"):
        train_sentencepiece(sample_texts(20), tmp_path / "big.model", 100000)


def test_hugging_face_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(sample_texts(), trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>",
                                                                                                "<unk>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer("hf", tmp_path / "tokenizer.json")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.encode("the lazy dog") == hf.encode("the lazy dog").ids
    assert [list(a) for a in tok.encode_batch(["a dog"])] == [hf.encode("a dog").ids]


def test_byte_tokenizer_round_trip_and_batch():
    tok = ByteTokenizer()
    text = "état 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert [list(a) for a in tok.encode_batch([text, ""])] == [tok.encode(text), []]
    assert min(tok.encode(text)) >= 4 and tok.vocab_size == 260


@pytest.mark.parametrize("kind, content, message", [
    ("sentencepiece", b"garbage", r"bad: not a loadable SentencePiece model"),
    ("hf", b"{}", r"bad: not a loadable Hugging Face tokenizer.json"),
])
def test_bad_tokenizer_files(tmp_path, kind, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_tokenizer(kind, tmp_path / "bad")
    with pytest.raises(DataError, match=r"missing: tokenizer file not found"):
        load_tokenizer(kind, tmp_path / "missing")


# -- the word cache of SentencePiece models trained here -----------------------------------------------------
def random_texts(n, seed):
    """Texts that stress where the cache cuts: runs of spaces, leading and trailing spaces, tabs, newlines, a
    literal U+2581 and U+E000 (the escape rules' characters), characters the vocabulary lacks, empty texts."""
    import random

    rng = random.Random(seed)
    atoms = WORDS + [" ", "  ", "   ", "\t", "\n", "\r\n", "\u2581", "\ue000", "\u2581\u2581", "é", "漢字", "🙂",
                     "x\u2581y", "\ue000x", "0", "123", ".", ",", ""]
    return [("" if rng.random() < 0.05 else rng.choice(["", " ", "  "])) +
            "".join(rng.choice(atoms) + rng.choice(["", " ", " ", " ", "  "]) for _ in range(rng.randint(0, 40)))
            for _ in range(n)]


@pytest.mark.parametrize("training", ["words", "code"])
def test_word_cache_gives_sentencepieces_own_ids(tmp_path, training):
    import sentencepiece as spm

    texts = sample_texts() if training == "words" else random_texts(400, 1) + sample_texts(100)
    tok = train_sentencepiece(texts, tmp_path / "tok.model", vocab_size=420, model_type="bpe")
    assert tok.words is not None  # the models prepare trains take the fast path
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    for seed in range(4):  # the first batch fills the cache, the later ones mostly hit it
        batch = random_texts(300, seed) + sample_texts(50)
        assert [ids.tolist() for ids in tok.encode_batch(batch)] == plain.encode(batch)
    assert len(tok.words.spaced) > 10 and len(tok.words.whole) > 10
    small = type(tok.words)(plain, limit=5)  # a full cache is emptied, never wrong
    for seed in range(2):
        batch = random_texts(50, seed + 10)
        assert [ids.tolist() for ids in small.encode_batch(batch)] == plain.encode(batch)


def test_other_models_are_encoded_as_they_are(tmp_path):
    import sentencepiece as spm

    unigram = train_sentencepiece(sample_texts(), tmp_path / "u.model", 300, "unigram")
    assert unigram.words is None  # Viterbi scores add up over the whole text: no cut is provably neutral
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_texts()), model_prefix=str(tmp_path / "default"),
                                   vocab_size=150, model_type="bpe", minloglevel=2)
    default = load_tokenizer("sentencepiece", tmp_path / "default.model")
    assert default.words is None  # NFKC, a dummy prefix and whitespace collapsing
    texts = random_texts(50, 3)
    assert [ids.tolist() for ids in default.encode_batch(texts)] == default.sp.encode(texts)
