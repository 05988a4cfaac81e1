"""Tokenizers behind one small interface: encode(text) -> ids, decode(ids) -> text, special ids.

Kinds: `byte` (UTF-8 bytes after four special ids; needs no file), `sentencepiece` (a .model file)
and `hf` (a Hugging Face tokenizer.json, through the `tokenizers` library).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
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

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(texts)]

    def fingerprint(self) -> str:
        return file_sha256(self.path)


class HFTokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{path}: not a loadable Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
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


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int, model_type: str = "bpe",
                        num_threads: int = 0) -> SentencePieceTokenizer:
    """Train a SentencePiece model with byte fallback and the ids pad 0, bos 1, eos 2, unk 3 (the byte
    tokenizer's layout), write it to out_path atomically and load it."""
    import os

    import sentencepiece as spm

    def lines():
        for text in texts:
            yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.9995,
            num_threads=num_threads or os.cpu_count() or 1, max_sentence_length=1 << 16,
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
