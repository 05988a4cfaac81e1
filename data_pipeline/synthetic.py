"""The embedded synthetic corpus: English-like text whose exact probability is known.

The source is a word Markov chain built over a small part-of-speech grammar, with a pseudo-English
lexicon generated from syllables (plus real function words), Zipf-skewed and sparse: each word may be
followed by only a few words of each class that may come next. Some documents also carry a memory
block and later recalls of it, which only a model with long memory can predict:

    The brovak strelled a tarn. Remember: ka = lu, bo = ti. He plomes under the fist. Recall: bo = ti.

Every document is drawn as a sequence of choices that the text spells out unambiguously (words carry
no spaces or punctuation, segment markers end with ':' which no word does), so -ln P(text) is the
sum of -ln of the choices' probabilities, document length and end included. `surprisal` re-parses a
text and recomputes that sum.

Entropy floor. For any tokenizer that maps text to tokens injectively (byte-level, SentencePiece with
byte fallback), a model's expected total cross-entropy on a document, its end-of-document token
included, is at least H(document) = E[-ln P(text)]. So the mean loss per token predicted is at least
(sum of surprisals) / (number of tokens predicted): `entropy_floor_nats_per_token`. It is the loss of
the best model, one that knows the source exactly; cutting documents across sequence boundaries only
removes context, so the bound stays valid for packed data. `expected_document_nats` gives the exact
expectation analytically (the chain's sentence entropy from its absorbing-chain visit counts, the
length and recall choices by enumeration), and `entropy_report` compares it with a Monte-Carlo sample.

Determinism: the language (lexicon, transitions) is a pure function of the knobs and `language_seed`;
document i is a pure function of (language, seed, i), drawn from a `random.Random` seeded by a hash
of (seed, i) and using only `random()`, whose stream Python keeps stable across versions and machines.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from ssmforge.errors import ConfigError, DataError

MEMORY_MARK = "Remember:"
RECALL_MARK = "Recall:"
KEY_CONSONANTS = "bdfgklmnprstvz"
KEY_VOWELS = "aeiou"

# Function words are real English; content words are generated. Listed most frequent first.
FUNCTION_WORDS = {
    "DET": ["the", "a", "this", "that", "every", "some", "each", "no"],
    "PRON": ["he", "she", "they", "it", "we", "you"],
    "PREP": ["in", "on", "of", "with", "from", "under", "near", "over", "into", "by"],
    "CONJ": ["and", "but", "or", "so"],
}
CONTENT_SHARE = {"NOUN": 0.45, "VERB": 0.25, "ADJ": 0.2, "ADV": 0.1}
CLASSES = list(CONTENT_SHARE) + list(FUNCTION_WORDS)

# The class grammar: P(next class | class); "END" ends the sentence with a period.
GRAMMAR = {
    "START": {"DET": 0.45, "PRON": 0.25, "NOUN": 0.15, "ADJ": 0.1, "ADV": 0.05},
    "DET": {"NOUN": 0.65, "ADJ": 0.35},
    "ADJ": {"NOUN": 0.85, "ADJ": 0.15},
    "NOUN": {"VERB": 0.55, "PREP": 0.15, "CONJ": 0.05, "END": 0.25},
    "PRON": {"VERB": 0.9, "ADV": 0.1},
    "VERB": {"DET": 0.4, "NOUN": 0.1, "PREP": 0.15, "ADV": 0.1, "END": 0.25},
    "ADV": {"VERB": 0.3, "PREP": 0.2, "END": 0.5},
    "PREP": {"DET": 0.8, "NOUN": 0.2},
    "CONJ": {"DET": 0.5, "PRON": 0.35, "NOUN": 0.15},
}
ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "br", "cr", "dr", "fl", "gr", "pl", "st", "tr", "ch", "sh", "th", ""]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "oo"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rk"]
SUFFIXES = {"NOUN": [""], "VERB": ["s", "es", "ed"], "ADJ": ["", "ous", "ful", "ish", "y"], "ADV": ["ly"]}


@dataclass
class SyntheticDocument:
    index: int
    text: str
    surprisal_nats: float  # -ln P(text) under the source, the document's end included
    memory: tuple[tuple[str, str], ...] = ()  # (key, value) pairs of the memory block, if any
    recalls: tuple[tuple[str, str], ...] = ()  # (key, value) recalled later, in order


@dataclass
class SyntheticCorpus:
    """A deterministic stream of synthetic documents; see the module docstring for the source.

    A document holds n prose sentences, n uniform in [min_sentences, max_sentences]. With probability
    `recall_rate` it also holds a memory block of `n_pairs` distinct keys with random values, placed
    after m prose sentences (m uniform in [0, n // 2]), and `n_recalls` recalls of distinct stored keys
    (uniform, ordered) at distinct later slots (after m+1 .. n prose sentences, uniform).
    """

    seed: int = 0
    language_seed: int = 0  # the lexicon and transitions; documents vary with `seed`
    lexicon_size: int = 320  # generated content words (nouns, verbs, adjectives, adverbs)
    branching: int = 6  # successors a word may have in each class that may follow it
    zipf_exponent: float = 1.1
    min_sentences: int = 8
    max_sentences: int = 20
    recall_rate: float = 0.5
    n_pairs: int = 4
    n_recalls: int = 2
    pair_syllables: int = 1  # keys and values are this many consonant-vowel syllables

    def __post_init__(self):
        checks = [
            (self.lexicon_size >= 4 * len(CONTENT_SHARE), "lexicon_size", "at least 16"),
            (self.branching >= 1, "branching", ">= 1"),
            (self.zipf_exponent >= 0, "zipf_exponent", ">= 0"),
            (1 <= self.min_sentences <= self.max_sentences, "min_sentences", "in [1, max_sentences]"),
            (0.0 <= self.recall_rate <= 1.0, "recall_rate", "in [0, 1]"),
            (1 <= self.n_pairs <= self.key_space, "n_pairs", "in [1, number of possible keys]"),
            (0 <= self.n_recalls <= self.n_pairs, "n_recalls", "in [0, n_pairs]"),
            (self.min_sentences - self.min_sentences // 2 >= self.n_recalls, "n_recalls",
             "<= min_sentences - min_sentences // 2 (one free slot per recall)"),
            (self.pair_syllables >= 1, "pair_syllables", ">= 1"),
        ]
        for ok, key, need in checks:
            if not ok:
                raise ConfigError(f"synthetic.{key}: {getattr(self, key)!r} is invalid; need {need}")

    # ---- the language -------------------------------------------------------------------------

    @property
    def key_space(self) -> int:
        return (len(KEY_CONSONANTS) * len(KEY_VOWELS)) ** self.pair_syllables

    @cached_property
    def _language(self) -> dict:
        rng = random.Random(f"ssmforge-synthetic-language:{self.language_seed}:{self.lexicon_size}")
        taken = {w for words in FUNCTION_WORDS.values() for w in words} | {"remember", "recall"}
        words, word_class = [], []
        for cls in CLASSES:
            if cls in FUNCTION_WORDS:
                members = list(FUNCTION_WORDS[cls])
            else:
                members = _pseudo_words(rng, cls, max(1, round(self.lexicon_size * CONTENT_SHARE[cls])), taken)
            words += members
            word_class += [cls] * len(members)
        n_words = len(words)
        end, start = n_words, n_words + 1  # state ids: words, then END, then START (a row only)
        by_class = {c: [i for i in range(n_words) if word_class[i] == c] for c in CLASSES}
        # P[s, t]: probability that state s is followed by word t (or END); rows of START and words.
        P = np.zeros((n_words + 2, n_words + 1))
        for s in range(n_words + 2):
            cls = "START" if s == start else (word_class[s] if s < n_words else None)
            if cls is None:
                continue
            for next_cls, p_cls in GRAMMAR[cls].items():
                if next_cls == "END":
                    P[s, end] += p_cls
                    continue
                members = by_class[next_cls]
                # Global Zipf weights by rank in class make frequent words frequent everywhere;
                # a sparse, weighted subset per word makes the chain predictable (low entropy rate).
                k = len(members) if s == start else min(self.branching, len(members))
                chosen = _weighted_sample(rng, members, _zipf(len(members), self.zipf_exponent), k)
                local = _zipf(k, self.zipf_exponent)
                P[s, chosen] += p_cls * local / local.sum()
        return {"words": words, "word_class": word_class, "P": P}

    @property
    def words(self) -> list[str]:
        """The lexicon; word id i is words[i]. Ids len(words) and len(words)+1 are END and START."""
        return self._language["words"]

    @property
    def transition_matrix(self) -> np.ndarray:
        """(n_words + 2, n_words + 1): P[state, next word or END]; row START = n_words + 1."""
        return self._language["P"]

    @cached_property
    def _sampler(self) -> tuple[list, list, list]:
        """Per state: successor ids, cumulative probabilities (last forced to 1.0), log-probabilities."""
        succ, cum, logp = [], [], []
        for row in self.transition_matrix:
            ids = np.flatnonzero(row)
            c = np.cumsum(row[ids])
            if len(c):
                c[-1] = 1.0
            succ.append(ids.tolist())
            cum.append(c.tolist())
            logp.append(dict(zip(ids.tolist(), np.log(row[ids]).tolist())))
        return succ, cum, logp

    @cached_property
    def _word_id(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    # ---- documents ----------------------------------------------------------------------------

    def documents(self, n: int, start: int = 0) -> Iterator[SyntheticDocument]:
        """Documents start .. start+n-1; document i depends only on (language, seed, i)."""
        for i in range(start, start + n):
            yield self.document(i)

    def document(self, index: int) -> SyntheticDocument:
        digest = hashlib.blake2b(f"ssmforge-synthetic:{self.seed}:{index}".encode(), digest_size=16).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        u = rng.random
        logp = 0.0
        n_prose = self.min_sentences + _pick(u, self.max_sentences - self.min_sentences + 1)
        logp -= math.log(self.max_sentences - self.min_sentences + 1)
        memory, recalls, slots, where = (), (), [], -1
        if u() < self.recall_rate:
            logp += math.log(self.recall_rate)
            where = _pick(u, n_prose // 2 + 1)
            slots = sorted(_distinct(u, n_prose - where, self.n_recalls))
            slots = [where + 1 + s for s in slots]
            keys = _distinct(u, self.key_space, self.n_pairs)
            values = [_pick(u, self.key_space) for _ in range(self.n_pairs)]
            memory = tuple((self._key(k), self._key(v)) for k, v in zip(keys, values))
            recalls = tuple(memory[j] for j in _distinct(u, self.n_pairs, self.n_recalls))
            logp += self._memory_log_prob(n_prose, where)
        else:
            logp += math.log1p(-self.recall_rate)  # reached only when recall_rate < 1
        parts = []
        recall_iter = iter(recalls)
        for j in range(n_prose + 1):
            if j == where:
                parts.append(MEMORY_MARK + " " + ", ".join(f"{k} = {v}" for k, v in memory) + ".")
            parts += [f"{RECALL_MARK} {k} = {v}." for k, v in (next(recall_iter) for s in slots if s == j)]
            if j < n_prose:
                sentence, lp = self._sentence(u)
                parts.append(sentence)
                logp += lp
        return SyntheticDocument(index, " ".join(parts), -logp, memory, recalls)

    def _sentence(self, u) -> tuple[str, float]:
        succ, cum, logp = self._sampler
        words, state, total = self.words, len(self.words) + 1, 0.0
        out = []
        while True:
            nxt = succ[state][bisect.bisect_right(cum[state], u())]
            total += logp[state][nxt]
            if nxt == len(words):
                break
            out.append(words[nxt])
            state = nxt
        out[0] = out[0].capitalize()
        return " ".join(out) + ".", total

    def _key(self, k: int) -> str:
        syllables = []
        for _ in range(self.pair_syllables):
            k, r = divmod(k, len(KEY_CONSONANTS) * len(KEY_VOWELS))
            syllables.append(KEY_CONSONANTS[r // len(KEY_VOWELS)] + KEY_VOWELS[r % len(KEY_VOWELS)])
        return "".join(syllables)

    def _memory_log_prob(self, n_prose: int, where: int) -> float:
        """ln P of the memory choices: position, recall slots, keys, values, which keys are recalled."""
        lp = -math.log(n_prose // 2 + 1) - math.log(math.comb(n_prose - where, self.n_recalls))
        lp -= sum(math.log(self.key_space - j) for j in range(self.n_pairs))
        lp -= self.n_pairs * math.log(self.key_space)
        lp -= sum(math.log(self.n_pairs - j) for j in range(self.n_recalls))
        return lp

    # ---- parsing: the same probability, recomputed from the text alone ------------------------

    def surprisal(self, text: str) -> float:
        """-ln P(text) recomputed by parsing `text`; raises DataError if the source cannot emit it."""
        if not text.endswith("."):
            raise DataError("synthetic text must end with '.'")
        sentences = text[:-1].split(". ")
        n_prose, where, slots, memory, recalled, logp = 0, -1, [], {}, [], 0.0
        for s in sentences:
            if s.startswith(MEMORY_MARK + " "):
                if where >= 0:
                    raise DataError("synthetic text has two memory blocks")
                where = n_prose
                memory = dict(self._pair(p) for p in s[len(MEMORY_MARK) + 1:].split(", "))
            elif s.startswith(RECALL_MARK + " "):
                key, value = self._pair(s[len(RECALL_MARK) + 1:])
                if memory.get(key) != value or key in recalled:
                    raise DataError(f"synthetic recall {key!r} does not match the memory block")
                slots.append(n_prose)
                recalled.append(key)
            else:
                logp += self._sentence_log_prob(s)
                n_prose += 1
        if not self.min_sentences <= n_prose <= self.max_sentences:
            raise DataError(f"synthetic text has {n_prose} prose sentences")
        logp -= math.log(self.max_sentences - self.min_sentences + 1)
        if (where < 0 and self.recall_rate == 1) or (where >= 0 and self.recall_rate == 0):
            raise DataError(f"synthetic text {'lacks' if where < 0 else 'has'} a memory block")
        if where < 0:
            return -(logp + math.log1p(-self.recall_rate))
        if (len(memory) != self.n_pairs or len(recalled) != self.n_recalls or where > n_prose // 2
                or any(s <= where for s in slots) or len(set(slots)) != len(slots)):
            raise DataError("synthetic memory block or recalls do not fit the source")
        return -(logp + math.log(self.recall_rate) + self._memory_log_prob(n_prose, where))

    def _pair(self, text: str) -> tuple[str, str]:
        key, sep, value = text.partition(" = ")
        syllable = f"[{KEY_CONSONANTS}][{KEY_VOWELS}]"
        if not sep or not all(re.fullmatch(f"({syllable}){{{self.pair_syllables}}}", x) for x in (key, value)):
            raise DataError(f"synthetic key-value pair malformed: {text!r}")
        return key, value

    def _sentence_log_prob(self, sentence: str) -> float:
        words = sentence.split(" ")
        if not words[0][:1].isupper():
            raise DataError(f"synthetic sentence not capitalised: {sentence!r}")
        words[0] = words[0][:1].lower() + words[0][1:]  # lexicon words are lowercase
        table, state, total = self._sampler[2], len(self.words) + 1, 0.0
        for w in words + [None]:
            nxt = len(self.words) if w is None else self._word_id.get(w)
            if nxt is None or nxt not in table[state]:
                raise DataError(f"synthetic sentence has an impossible word {w!r}: {sentence!r}")
            total += table[state][nxt]
            state = nxt
        return total

    # ---- analytic entropy ---------------------------------------------------------------------

    @cached_property
    def _sentence_stats(self) -> dict:
        """Expected nats, words and characters of one prose sentence, from absorbing-chain visits."""
        P, n_words = self.transition_matrix, len(self.words)
        transient = list(range(n_words)) + [n_words + 1]  # words, then START
        Q = P[transient][:, :n_words]
        Q = np.hstack([Q, np.zeros((len(transient), 1))])  # nothing returns to START
        visits = np.linalg.solve((np.eye(len(transient)) - Q).T, np.eye(len(transient))[-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)[transient]
        lengths = np.array([len(w) for w in self.words], dtype=float)
        word_visits = visits[:n_words]
        # k words take sum(len) + (k - 1) spaces + 1 period characters.
        return {"nats": float(visits @ row_entropy), "words": float(word_visits.sum()),
                "chars": float(word_visits @ lengths + word_visits.sum()), "word_visits": word_visits}

    def entropy_rate_nats_per_word(self) -> float:
        """Entropy rate of the prose word chain, nats per word (the sentence end's choice included)."""
        s = self._sentence_stats
        return s["nats"] / s["words"]

    def prose_nats_per_char(self) -> float:
        """Entropy rate of long prose, nats per character (the space joining sentences counted)."""
        s = self._sentence_stats
        return s["nats"] / (s["chars"] + 1)

    def word_unigram_nats_per_char(self) -> float:
        """What a model knowing only word frequencies would pay, nats per prose character."""
        s = self._sentence_stats
        freq = np.append(s["word_visits"], 1.0) / (s["words"] + 1)  # words and the sentence end
        freq = freq[freq > 0]  # a word no subset picked is never emitted
        return float(-(freq * np.log(freq)).sum()) * (s["words"] + 1) / (s["chars"] + 1)

    def expected_document_nats(self) -> float:
        """E[-ln P(document)] = H(document), exactly (up to float rounding), by enumerating the
        length and memory position; prose sentences are i.i.d. given their number."""
        n_range = range(self.min_sentences, self.max_sentences + 1)
        r = self.recall_rate
        h = math.log(len(n_range)) - sum(p * math.log(p) for p in (r, 1 - r) if p > 0)
        h += self._sentence_stats["nats"] * (self.min_sentences + self.max_sentences) / 2
        if r > 0:
            h -= r * sum(self._memory_log_prob(n, m) / (n // 2 + 1) for n in n_range
                         for m in range(n // 2 + 1)) / len(n_range)
        return h

    def expected_document_chars(self) -> float:
        """E[len(text)]: prose, memory and recall sentences, and one space between sentences."""
        pair = 4 * self.pair_syllables + 3  # "ka = lu"
        memory = len(MEMORY_MARK) + 1 + self.n_pairs * pair + 2 * (self.n_pairs - 1) + 1
        recall = len(RECALL_MARK) + 1 + pair + 1
        n_mean = (self.min_sentences + self.max_sentences) / 2
        extra = self.recall_rate * (memory + self.n_recalls * recall)
        n_sentences = n_mean + self.recall_rate * (1 + self.n_recalls)
        return n_mean * self._sentence_stats["chars"] + extra + n_sentences - 1

    def floor_nats_per_byte_token(self) -> float:
        """Expected floor for byte tokens (the text is ASCII): nats per document / (bytes + 1 EOS)."""
        return self.expected_document_nats() / (self.expected_document_chars() + 1)


def entropy_floor_nats_per_token(total_surprisal_nats: float, n_tokens: int) -> float:
    """Lowest achievable mean loss per token on a set of documents: sum of -ln P(text) / tokens.

    `n_tokens` counts every token a model predicts, the EOS appended per document included. Valid
    for any tokenizer that maps text to tokens injectively: a model's total cross-entropy on a
    document is then at least -ln P(text) in expectation, and packing only removes context.
    """
    if n_tokens <= 0:
        raise DataError("entropy floor needs at least one token")
    return total_surprisal_nats / n_tokens


def entropy_report(corpus: SyntheticCorpus, n_docs: int = 2000) -> dict:
    """Analytic entropy figures beside a Monte-Carlo sample of `n_docs` documents and its speed."""
    t0 = time.perf_counter()
    docs = list(corpus.documents(n_docs))
    seconds = time.perf_counter() - t0
    chars = sum(len(d.text) for d in docs)
    counts = np.bincount(np.frombuffer("".join(d.text for d in docs).encode("ascii"), dtype=np.uint8))
    freq = counts[counts > 0] / counts.sum()
    return {
        "nats_per_word": corpus.entropy_rate_nats_per_word(),
        "prose_nats_per_char": corpus.prose_nats_per_char(),
        "word_unigram_nats_per_char": corpus.word_unigram_nats_per_char(),
        "char_unigram_nats_per_char_sampled": float(-(freq * np.log(freq)).sum()),
        "expected_document_nats": corpus.expected_document_nats(),
        "sampled_document_nats": sum(d.surprisal_nats for d in docs) / n_docs,
        "expected_document_chars": corpus.expected_document_chars(),
        "sampled_document_chars": chars / n_docs,
        "floor_nats_per_byte_token": corpus.floor_nats_per_byte_token(),
        "sampled_floor_nats_per_byte_token": entropy_floor_nats_per_token(
            sum(d.surprisal_nats for d in docs), chars + n_docs),
        "chars_per_second": chars / seconds,
    }


def _pseudo_words(rng: random.Random, cls: str, count: int, taken: set[str]) -> list[str]:
    """`count` new distinct lowercase words, shortest first (frequent words are short, as in English)."""
    made = []
    while len(made) < count:
        n_syl = 1 + _pick(rng.random, 2) + (rng.random() < 0.15)
        stem = "".join(ONSETS[_pick(rng.random, len(ONSETS))] + NUCLEI[_pick(rng.random, len(NUCLEI))]
                       + CODAS[_pick(rng.random, len(CODAS))] for _ in range(n_syl))
        word = stem + SUFFIXES[cls][_pick(rng.random, len(SUFFIXES[cls]))]
        if word not in taken and len(word) >= 2:
            taken.add(word)
            made.append(word)
    return sorted(made, key=len)


def _zipf(n: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, n + 1) ** exponent


def _weighted_sample(rng: random.Random, items: list[int], weights: np.ndarray, k: int) -> list[int]:
    """k distinct items, drawn one after another with probability proportional to weight."""
    keys = np.log(np.array([rng.random() for _ in items]) + 1e-300) / weights  # Efraimidis-Spirakis
    return [items[i] for i in np.argsort(-keys)[:k]]


def _pick(u, k: int) -> int:
    """Uniform in [0, k): from random() alone, whose stream Python keeps stable across versions."""
    return min(int(u() * k), k - 1)


def _distinct(u, k: int, count: int) -> list[int]:
    """`count` distinct values uniform in [0, k), in draw order (rejection keeps each draw uniform)."""
    out: list[int] = []
    while len(out) < count:
        x = _pick(u, k)
        if x not in out:
            out.append(x)
    return out


if __name__ == "__main__":
    for name, value in entropy_report(SyntheticCorpus()).items():
        print(f"{name:40s} {value:12.4f}")
