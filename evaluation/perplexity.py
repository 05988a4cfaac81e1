"""Document-level perplexity the way the literature reports WikiText: every document scored as a whole
with rolling windows of the model's context, after the standard WikiText detokenisation; token, word
and byte perplexity and bits per byte, with words and bytes counted on the original text.

`scoring_windows` is the one place that decides which tokens a window reads and which it scores:
with stride = max_length (the default) windows do not overlap and the last one reaches back for a full
context (the evaluation harness's rolling log-likelihood); with a smaller stride every scored token
has at least max_length - stride tokens of context.

Conditioning: each document is read after the token that preceded every document in training, the
manifest's `document_prefix` (`training_document_prefix`): EOS for data packed by ssmforge, which joins
documents with EOS and never feeds BOS. It is what lm-evaluation-harness feeds a model whose BOS is its
EOS (its `prefix_token_id`; pass `prefix_token_id=EOS` in its model_args for another tokenizer).

Length: a window longer than `chunk_length` is fed chunk by chunk with the model's recurrent state
carried from one chunk to the next (`token_nll`), so an SSM scores any length in memory constant in it
(an attention layer keeps its KV cache: a sliding window's stays bounded, full attention's grows).

Importing this module loads no torch: the CLI checks --dataset with it before it loads a model.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ssmforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SYNTHETIC_HELDOUT = "synthetic-heldout"  # documents of the run's synthetic corpus that training never saw
WIKITEXT = {  # --dataset name -> (hub dataset, subset); one page per row, in the field "page"
    "wikitext-103": ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1"),
    "wikitext-2": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
}

# The WikiText detokenisation used by the evaluation harness (originally Megatron-LM's): undo the
# dataset's spaced-out punctuation and number separators before tokenizing.
_PLAIN = [("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
          (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_BRACKETS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
             (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]
_TAIL = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
         (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def wikitext_detokenize(text: str) -> str:
    for old, new in _PLAIN:
        text = text.replace(old, new)
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for pattern, repl in _BRACKETS:
        text = re.sub(pattern, repl, text)
    for old, new in _TAIL:
        text = text.replace(old, new)
    return text


def count_words(text: str) -> int:
    """Words as the harness counts them: pieces between runs of whitespace, on the original text."""
    return len(re.split(r"\s+", text))


_HEADING = re.compile(r"^ = [^=].* = $")  # a WikiText article title line: " = Title = "


def split_wikitext_pages(text: str) -> list[str]:
    """Raw WikiText (one file) -> articles, each starting at its level-1 heading. A text with no such
    heading is one document."""
    pages, current = [], []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) and any(s.strip() for s in current):
            pages.append("".join(current))
            current = []
        current.append(line)
    if any(s.strip() for s in current):
        pages.append("".join(current))
    return pages


def load_documents(dataset: str, split: str = "test") -> list[str]:
    """The documents of `dataset`: wikitext-103 / wikitext-2 from the hub (document-level pages), or
    local files and globs: text (.txt, WikiText's .raw, ...) split into WikiText articles, .jsonl/.parquet one document per row
    (field `page`, else `text`)."""
    if dataset in WIKITEXT:
        import datasets

        name, subset = WIKITEXT[dataset]
        try:
            rows = datasets.load_dataset(name, subset, split=split)
        except Exception as e:  # offline, or the hub is unreachable: say what to do instead
            raise DataError(f"--dataset {dataset}: cannot load {name}/{subset} from the hub "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"pass local files instead (e.g. --dataset wiki.test.raw)") from None
        return [row["page"] for row in rows]
    from ssmforge.data_pipeline.sources import SkipCounter, local_documents

    paths = dataset_files(dataset)
    docs: list[str] = []
    for path in paths:
        if path.suffix in (".jsonl", ".json", ".parquet"):
            field = "page" if _has_field(path, "page") else "text"
            docs.extend(local_documents([str(path)], field, "fail", SkipCounter()))
        else:
            docs.extend(split_wikitext_pages(path.read_text(encoding="utf-8")))
    if not docs:
        raise DataError(f"--dataset {dataset}: no documents in {', '.join(map(str, paths))}")
    return docs


def dataset_files(dataset: str, where: str = "--dataset") -> list[Path] | None:
    """The local files of an eval-ppl dataset, each readable (None for a hub name); a name or glob that
    matches nothing is one line naming it as `where` says it was given."""
    from ssmforge.data_pipeline.sources import expand_paths

    if dataset in WIKITEXT or dataset == SYNTHETIC_HELDOUT:
        return None
    try:
        paths = expand_paths([dataset], formats=None)
    except DataError as e:
        raise DataError(f"{where} {e}") from None
    for path in paths:
        try:
            open(path, "rb").close()
        except OSError as e:
            raise DataError(f"{where} {dataset}: cannot read {path} ({e.strerror})") from None
    return paths


def _has_field(path: Path, field: str) -> bool:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return field in pq.read_schema(path).names
    import json

    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        return field in json.loads(first)
    except ValueError:
        return False


def training_document_prefix(config) -> str:
    """"eos" or "bos": the token each document followed in the training data of a run config (its
    manifest's document_prefix). None (a Hugging Face folder), remote shards, or shards no longer there
    (an export moved elsewhere): "eos", what packing has always done."""
    from ssmforge.data_pipeline.manifest import (DEFAULT_DOCUMENT_PREFIX, MANIFEST_FILE, document_prefix, is_remote,
                                                 read_manifest)

    if config is None or is_remote(config.data.shard_dir):
        return DEFAULT_DOCUMENT_PREFIX
    try:
        manifest = read_manifest(config.data.shard_dir)
    except DataError as e:  # the shards of another version: the run's own were packed with EOS as well
        log.warning("%s; documents start with EOS", e)
        return DEFAULT_DOCUMENT_PREFIX
    return document_prefix(manifest.tokenizer if manifest else None, str(Path(config.data.shard_dir) / MANIFEST_FILE))


def prefix_token_id(tokenizer, prefix: str = "eos") -> int:
    """The id that starts each document: the tokenizer's EOS for prefix "eos", its BOS for "bos" (the
    other one where the tokenizer lacks it)."""
    if prefix not in ("eos", "bos"):
        raise ConfigError(f"document prefix {prefix!r} is invalid; need 'eos' or 'bos'")
    ids = (tokenizer.eos_id, tokenizer.bos_id) if prefix == "eos" else (tokenizer.bos_id, tokenizer.eos_id)
    found = next((i for i in ids if i is not None and i >= 0), None)
    if found is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS id to start documents with")
    return found


@dataclass(frozen=True)
class Window:
    """Inputs seq[start:end] of a document's sequence seq = [prefix] + tokens; the logits at positions
    score_from - start .. end - start - 1 predict seq[score_from + 1 .. end]."""

    doc: int
    start: int
    end: int
    score_from: int


def scoring_windows(doc: int, n_tokens: int, max_length: int, stride: int) -> Iterator[Window]:
    """Windows that score each of a document's n_tokens exactly once (targets seq[1..n])."""
    if not 1 <= stride <= max_length:
        raise ConfigError(f"eval.stride={stride} is invalid: must be between 1 and eval.max_length ({max_length})")
    first = 1
    while first <= n_tokens:
        last = min(first + stride, n_tokens + 1)  # targets seq[first:last]
        end = last - 1
        start = max(0, end - max_length)
        yield Window(doc, start, end, first - 1)
        first = last


@dataclass
class PerplexityResult:
    dataset: str
    documents: int
    tokens: int
    words: int
    bytes: int
    nll: float  # total negative log-likelihood in nats
    max_length: int
    stride: int
    document_prefix: str = "eos"  # the token each document was read after
    chunk_length: int | None = None  # windows longer than this were fed in chunks, the state carried
    recurrent_windows: int = 0  # how many windows were (summed over ranks)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    def to_dict(self) -> dict:
        return {**asdict(self), "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "byte_perplexity": self.byte_perplexity, "bits_per_byte": self.bits_per_byte}

    def table(self) -> str:
        rows = [("documents", f"{self.documents}"), ("tokens", f"{self.tokens}"), ("words", f"{self.words}"),
                ("bytes", f"{self.bytes}"), ("token perplexity", f"{self.token_perplexity:.4f}"),
                ("word perplexity", f"{self.word_perplexity:.4f}"),
                ("byte perplexity", f"{self.byte_perplexity:.4f}"), ("bits per byte", f"{self.bits_per_byte:.4f}")]
        chunks = f", fed in chunks of {self.chunk_length}" if self.recurrent_windows else ""
        head = (f"Perplexity on {self.dataset} (window {self.max_length}, stride {self.stride}{chunks}; documents "
                f"read after {self.document_prefix.upper()})\n\n")
        return head + "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _no_grad(fn):
    """torch.no_grad() as a decorator that imports torch only when the function runs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


IGNORE = -100  # the target of a position that is not scored


def token_nll(model, inputs, targets, chunk_length: int | None = None, greedy: bool = False):
    """-ln P(target) at each position, (batch, L) fp32, 0 where the target is IGNORE: inputs, targets
    (batch, L) int64, right-padded. L <= chunk_length (or no chunk_length): one forward. Longer: chunks of
    chunk_length tokens fed in order through one recurrent state (model.allocate_state), each chunk
    continuing where the previous one stopped, so that only one chunk's activations and logits exist at
    a time; the result equals the single forward's. With `greedy`: (nll, hits), hits (batch, L) bool
    saying where the target is the most likely token (False where it is IGNORE)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    width = inputs.shape[1]
    chunk = width if chunk_length is None else chunk_length
    state = model.allocate_state(inputs.shape[0]) if width > chunk else None
    out = torch.zeros(targets.shape, dtype=torch.float32, device=device)
    hits = torch.zeros(targets.shape, dtype=torch.bool, device=device)
    for c in range(0, width, chunk):
        logits = model(inputs[:, c:c + chunk], state=state)  # (batch, chunk, vocab); continues the state
        part = targets[:, c:c + chunk]
        out[:, c:c + chunk] = F.cross_entropy(logits.flatten(0, 1), part.flatten(), ignore_index=IGNORE,
                                              reduction="none").view(part.shape)
        if greedy:
            hits[:, c:c + chunk] = logits.argmax(-1) == part
        del logits
    return (out, hits) if greedy else out


@_no_grad
def evaluate_perplexity(model, tokenizer, documents: list[str], dataset: str, max_length: int,
                        stride: int | None = None, batch_size: int = 8, detokenize: bool = True,
                        rank: int = 0, world_size: int = 1, progress: bool = False,
                        score_end: bool = False, document_prefix: str = "eos",
                        chunk_length: int | None = None) -> PerplexityResult:
    """Score `documents` (rank r takes every world_size-th one; sums are all-reduced when a process group
    is up). Each document is read after the token `document_prefix` names ("eos", as packed training
    data precedes every document, or "bos"; see `training_document_prefix`), so its first token is
    scored; with `score_end` its EOS, as packed training data ends it, is scored too (and counted as a
    token). A window longer than `chunk_length` is fed in chunks with the recurrent state carried
    (`token_nll`): memory stays constant in max_length for SSMs."""
    import torch

    from ssmforge.pretrain.collectives import sum_over_ranks

    stride = stride or max_length
    if max_length < 1:
        raise ConfigError(f"eval.max_length={max_length} is invalid: must be >= 1")
    if chunk_length is not None and chunk_length < 1:
        raise ConfigError(f"eval.chunk_length={chunk_length} is invalid: must be >= 1")
    prefix = prefix_token_id(tokenizer, document_prefix)
    mine = list(range(rank, len(documents), world_size))
    sequences, windows = {}, []
    totals = torch.zeros(6, dtype=torch.float64)  # nll, tokens, words, bytes, documents, recurrent windows
    for i in mine:
        original = documents[i]
        ids = tokenizer.encode(wikitext_detokenize(original) if detokenize else original)
        ids = list(ids) + ([tokenizer.eos_id] if score_end else [])
        sequences[i] = torch.tensor([prefix] + list(ids), dtype=torch.long)
        windows.extend(scoring_windows(i, len(ids), max_length, stride))
        totals[1:5] += torch.tensor([len(ids), count_words(original), len(original.encode("utf-8")), 1],
                                    dtype=torch.float64)
    windows.sort(key=lambda w: w.end - w.start, reverse=True)  # similar lengths share a batch: little padding
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for b in batches:
        group = windows[b:b + batch_size]
        width = group[0].end - group[0].start
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, w in enumerate(group):
            seq = sequences[w.doc]
            inputs[row, :w.end - w.start] = seq[w.start:w.end]
            scored = slice(w.score_from - w.start, w.end - w.start)
            targets[row, scored] = seq[w.score_from + 1:w.end + 1]
        totals[0] += token_nll(model, inputs, targets, chunk_length).sum(dtype=torch.float64).cpu()
        if chunk_length is not None:
            totals[5] += sum(w.end - w.start > chunk_length for w in group)
    device = next(model.parameters()).device
    totals = totals.tolist()
    if world_size > 1:  # each rank scored its share of the documents
        totals = sum_over_ranks(totals, device)
    nll, tokens, words, n_bytes, docs, recurrent = totals
    if tokens == 0:
        raise DataError(f"{dataset}: the documents hold no tokens to score")
    return PerplexityResult(dataset=dataset, documents=int(docs), tokens=int(tokens), words=int(words),
                            bytes=int(n_bytes), nll=nll, max_length=max_length, stride=stride,
                            document_prefix=document_prefix, chunk_length=chunk_length,
                            recurrent_windows=int(recurrent))
