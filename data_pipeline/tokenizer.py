"""Tokenizers behind one small interface: encode(text) -> ids, decode(ids) -> text, special ids.

Kinds: `byte` (UTF-8 bytes after four special ids; needs no file), `sentencepiece` (a .model file)
and `hf` (a Hugging Face tokenizer.json, through the `tokenizers` library).

decode(encode(text)) == text for every text with the byte tokenizer and with SentencePiece models trained
here (see train_sentencepiece); `lost_text` probes what a tokenizer file from elsewhere would not give back.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterable

import numpy as np

from ssmforge.errors import DataError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass
class ByteTokenizer:
    """Bytes 0..255 map to ids 4..259; ids 0..3 are pad, bos, eos, unk."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    offset: int = 4

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset for t in texts]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"byte:offset={self.offset}".encode()).hexdigest()


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a loadable SentencePiece model ({str(e).splitlines()[0]})") from None
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        self.words = _WordCache(self.sp) if _encodes_word_by_word(self.sp) else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text: sp.encode's, through a cache of words for the models trained here (see
        _WordCache), about four times faster on English-like text."""
        if self.words is not None:
            return self.words.encode_batch(texts)
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(texts)]

    def fingerprint(self) -> str:
        return file_sha256(self.path)


# sha256 of the normalization rules train_sentencepiece compiles into its models (_ESCAPE_RULES), as SentencePiece
# 0.2 compiles them; a model with other rules (or a SentencePiece that compiles them otherwise) is encoded as is.
_ESCAPE_CHARSMAP_SHA256 = "29ecb1e75bef41aeadb03c37d0c9de1ed75f6e720642c59a1e6d94f1be29d7f1"
_SEGMENTS = re.compile(r" *[^ ]+| +")


def _encodes_word_by_word(sp) -> bool:
    """Whether sp.encode(text) is the concatenation of sp.encode over the text's segments (a run of spaces and
    the non-space characters after it), so that _WordCache gives the same ids. It is for a BPE model that merges
    only within pieces of its vocabulary, when no piece holds a non-space character followed by a space (true of
    every model trained with whitespace splitting, as train_sentencepiece does) and normalization maps each
    character on its own, adds no prefix and keeps whitespace: our escape rules, which also keep a literal U+2581
    from acting as a space. Needs protobuf to read the model; without it, False."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except (ImportError, TypeError):
        return False
    model = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    spec = model.normalizer_spec
    if (model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or spec.add_dummy_prefix
            or spec.remove_extra_whitespaces or not spec.escape_whitespaces
            or hashlib.sha256(spec.precompiled_charsmap).hexdigest() != _ESCAPE_CHARSMAP_SHA256):
        return False
    return not any(re.search("[^\u2581]\u2581", piece.piece) for piece in model.pieces)


class _WordCache:
    """Encodes each distinct word once: a text is cut before every run of spaces (no piece spans such a cut, see
    _encodes_word_by_word), segments not seen yet are encoded in one sp.encode call per batch, and a text's ids
    are its segments' ids joined (kept as int32 bytes, so that a join is one C call). Texts with single spaces
    take a fast path through str.split; the cache is emptied when it passes `limit` entries (some 50 MB)."""

    def __init__(self, sp, limit: int = 1 << 18):
        self.sp, self.limit = sp, limit
        self.spaced: dict[str, bytes] = {}  # word -> ids of " " + word
        self.whole: dict[str, bytes] = {}  # segment -> its ids

    def _join(self, text: str) -> bytes:
        """The text's ids from the cache (KeyError when a segment is not in it)."""
        if "  " in text or text.endswith(" "):  # a run of spaces or a trailing space: cut with the expression
            return b"".join(map(self.whole.__getitem__, _SEGMENTS.findall(text)))
        words = text.split(" ")  # the first word, then " " + each other word
        return b"".join(chain((self.whole[words[0]],), map(self.spaced.__getitem__, islice(words, 1, None))))

    def _learn(self, text: str, spaced: set[str], whole: set[str]) -> None:
        """Add the text's segments that the cache lacks to `spaced` / `whole`."""
        if "  " in text or text.endswith(" "):
            whole.update(s for s in _SEGMENTS.findall(text) if s not in self.whole)
            return
        words = text.split(" ")
        if words[0] not in self.whole:
            whole.add(words[0])
        spaced.update(w for w in islice(words, 1, None) if w not in self.spaced)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if len(self.spaced) + len(self.whole) > self.limit:
            self.spaced.clear()
            self.whole.clear()
        out: list[bytes | None] = []
        spaced, whole = set(), set()
        for text in texts:
            try:
                out.append(self._join(text))
            except KeyError:
                out.append(None)
                self._learn(text, spaced, whole)
        if spaced or whole:
            new_whole, new_spaced = list(whole), list(spaced)
            encoded = self.sp.encode(new_whole + [" " + word for word in new_spaced])
            as_bytes = [np.asarray(ids, dtype=np.int32).tobytes() for ids in encoded]
            self.whole.update(zip(new_whole, as_bytes))
            self.spaced.update(zip(new_spaced, as_bytes[len(new_whole):]))
            out = [data if data is not None else self._join(text) for data, text in zip(out, texts)]
        return [np.frombuffer(data, dtype=np.int32) for data in out]


class HFTokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{path}: not a loadable Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        # a document that mentions "<|endoftext|>" is text: encoded as such it never becomes an EOS id in the
        # middle of the document, and decode (which skips special ids) gives it back
        self.tok.encode_special_tokens = True
        vocab = self.tok.get_vocab()

        def special(*names: str) -> int | None:
            return next((vocab[n] for n in names if n in vocab), None)

        self.pad_id = special("<pad>", "<|padding|>", "[PAD]")
        self.bos_id = special("<s>", "<|endoftext|>", "[CLS]")
        self.eos_id = special("</s>", "<|endoftext|>", "[SEP]")
        self.unk_id = special("<unk>", "[UNK]")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def fingerprint(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Bump when train_sentencepiece's settings change the model it trains (it is part of the data fingerprint).
SENTENCEPIECE_TRAINER_VERSION = 2
# SentencePiece writes a space as "▁" (U+2581) and decodes every "▁" as a space, so a literal "▁" would come
# back as " ". Our models escape it with normalization rules: "▁" -> E "x" and E -> E E on the way in
# (E = U+E000, a private-use character), the reverse on the way out. Every E in normalized text starts one of
# the two pairs, so decoding is exact. Format: source code points, tab, target code points (hex).
_ESCAPE_RULES = "2581\tE000 78\nE000\tE000 E000\n"
_UNESCAPE_RULES = "E000 78\t2581\nE000 E000\tE000\n"
_MAX_SENTENCE_BYTES = 1 << 16


def _training_sentences(texts: Iterable[str], limit: int = _MAX_SENTENCE_BYTES):
    """Documents whole, so that pieces are learned from newlines, tabs and indentation as they occur; one
    longer than `limit` UTF-8 bytes (SentencePiece would skip it) is cut before a newline where it can be,
    else at a character boundary. The trainer drops a sentence's trailing whitespace, hence before, not after."""
    for text in texts:
        data = text.encode("utf-8")
        start = 0
        while len(data) - start > limit:
            cut = data.rfind(b"\n", start + 1, start + limit)
            if cut == -1:
                cut = start + limit
                while (data[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte: back to the character's start
                    cut -= 1
            yield data[start:cut].decode("utf-8")
            start = cut
        if start < len(data):
            yield data[start:].decode("utf-8")


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int, model_type: str = "bpe",
                        num_threads: int = 0) -> SentencePieceTokenizer:
    """Train a lossless SentencePiece model, write it to out_path atomically and load it.

    decode(encode(text)) == text byte for byte: no Unicode normalization (identity rules but the "▁" escape
    above), whitespace kept as it is (no trimming or collapsing of runs, no dummy prefix space), and byte
    fallback for whatever is not in the vocabulary (rare characters, or a "\n" the sample never had).
    Runs of spaces may be pieces of their own (indentation). Ids pad 0, bos 1, eos 2, unk 3, the byte
    tokenizer's layout."""
    import os
    import tempfile

    import sentencepiece as spm

    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as rules:
        escape, unescape = Path(rules) / "escape.tsv", Path(rules) / "unescape.tsv"
        escape.write_text(_ESCAPE_RULES)
        unescape.write_text(_UNESCAPE_RULES)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(texts), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, normalization_rule_tsv=str(escape), denormalization_rule_tsv=str(unescape),
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.9995,
                num_threads=num_threads or os.cpu_count() or 1, max_sentence_length=_MAX_SENTENCE_BYTES,
                hard_vocab_limit=True, minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(f"training the SentencePiece tokenizer failed: {str(e).splitlines()[0]} "
                            f"(tokenizer.vocab_size={vocab_size} may be too large for the sample)") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return SentencePieceTokenizer(out_path)


# What a lossy tokenizer typically drops (a normalizer such as NFKC, whitespace trimming and collapsing,
# no byte fallback), each with a short text that shows it.
_FIDELITY_PROBES = {
    "newlines": "a\nb\n\nc",
    "carriage returns": "a\r\nb",
    "tabs": "a\tb",
    "runs of spaces": "a  b   c",
    "leading and trailing spaces": " a ",
    "compatibility characters such as 'ﬁ' (NFKC)": "ﬁ ＡＢＣ１２３",
}


def lost_text(tokenizer) -> list[str]:
    """What decode(encode(text)) does not give back with this tokenizer, as names of _FIDELITY_PROBES."""
    return [name for name, text in _FIDELITY_PROBES.items() if tokenizer.decode(tokenizer.encode(text)) != text]


def require_lossless(tokenizer, path: str | Path) -> None:
    """Refuse a tokenizer file that would change the documents it encodes (see lost_text)."""
    lost = lost_text(tokenizer)
    if not lost:
        return
    why = ""
    if isinstance(tokenizer, SentencePieceTokenizer):
        try:
            from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only to say why
        except (ImportError, TypeError):  # no protobuf, or one its generated code does not support
            pass
        else:
            spec = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.sp.serialized_model_proto()).normalizer_spec
            why = f" (normalizer {spec.name!r}, remove_extra_whitespaces={str(spec.remove_extra_whitespaces).lower()})"
    raise DataError(f"{path}: the tokenizer does not give text back as it was{why}: it loses {', '.join(lost)}; "
                    f"set tokenizer.allow_lossy=true to prepare data with it anyway")


def tokenizer_from_flag(value: str):
    """The tokenizer a --tokenizer flag names: 'byte', or a tokenizer.json (hf) or SentencePiece model path."""
    if value == "byte":
        return ByteTokenizer()
    return load_tokenizer("hf" if str(value).endswith(".json") else "sentencepiece", value)


def load_tokenizer(kind: str, path: str | Path | None = None):
    """A tokenizer of `kind` (byte | sentencepiece | hf) from `path` where the kind needs a file."""
    if kind == "byte":
        return ByteTokenizer()
    if path is None:
        raise DataError(f"tokenizer kind {kind!r} needs a file path")
    if not Path(path).is_file():
        raise DataError(f"{path}: tokenizer file not found")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "hf":
        return HFTokenizer(path)
    raise DataError(f"unknown tokenizer kind {kind!r}: expected byte, sentencepiece or hf")
