"""The synthetic corpus: determinism, exact probabilities, entropy figures, recall segments."""
import hashlib
import math
import re

import numpy as np
import pytest

from ssmforge.data_pipeline.synthetic import SyntheticCorpus, entropy_floor_nats_per_token
from ssmforge.errors import ConfigError, DataError

PROSE = re.compile(r"[A-Z][a-z]*( [a-z]+)*")
MEMORY = re.compile(r"Remember: ([a-z]+ = [a-z]+)(, [a-z]+ = [a-z]+)*")
RECALL = re.compile(r"Recall: ([a-z]+) = ([a-z]+)")


@pytest.fixture(scope="module")
def corpus():
    return SyntheticCorpus(seed=7)


@pytest.fixture(scope="module")
def docs(corpus):
    return list(corpus.documents(1500))


def independent_log_prob(corpus: SyntheticCorpus, text: str):
    """ln P(text) from the written-down source, by our own parse; also the memory and recalls seen."""
    P, word_id = corpus.transition_matrix, {w: i for i, w in enumerate(corpus.words)}
    end, start = len(corpus.words), len(corpus.words) + 1
    assert text.endswith(".")
    prose, memory_at, memory, recall_slots, recalls, lp = 0, None, [], [], [], 0.0
    for sentence in text[:-1].split(". "):
        if MEMORY.fullmatch(sentence):
            memory_at = prose
            memory = [tuple(p.split(" = ")) for p in sentence.removeprefix("Remember: ").split(", ")]
        elif m := RECALL.fullmatch(sentence):
            recall_slots.append(prose)
            recalls.append((m.group(1), m.group(2)))
        else:
            assert PROSE.fullmatch(sentence), sentence
            ids = [word_id[w.lower()] for w in sentence.split(" ")] + [end]
            lp += sum(math.log(P[a, b]) for a, b in zip([start] + ids[:-1], ids))
            prose += 1
    c = corpus
    lp -= math.log(c.max_sentences - c.min_sentences + 1)
    if memory_at is None:
        return lp + math.log(1 - c.recall_rate), memory, recalls
    lp += math.log(c.recall_rate) - math.log(prose // 2 + 1)
    lp -= math.log(math.comb(prose - memory_at, c.n_recalls))  # which later slots hold recalls
    lp -= sum(math.log(c.key_space - j) for j in range(c.n_pairs)) + c.n_pairs * math.log(c.key_space)
    lp -= sum(math.log(c.n_pairs - j) for j in range(c.n_recalls))  # which keys, in order
    assert all(s > memory_at for s in recall_slots)
    return lp, memory, recalls


def test_determinism_and_independent_ranges(corpus):
    def texts(c, n, start=0):
        return [(d.text, d.surprisal_nats) for d in c.documents(n, start)]

    whole = texts(corpus, 15)
    assert texts(SyntheticCorpus(seed=7), 15) == whole
    assert texts(corpus, 5, start=10) == whole[10:]
    assert texts(SyntheticCorpus(seed=8), 15)[0] != whole[0]
    # Pinned so the stream cannot drift silently between versions or machines.
    digest = hashlib.sha256("\n".join(t for t, _ in texts(SyntheticCorpus(), 20)).encode()).hexdigest()
    assert digest == PINNED_DIGEST


def test_surprisal_is_exact_log_prob_of_text(corpus, docs):
    for doc in docs[:400]:
        lp, memory, recalls = independent_log_prob(corpus, doc.text)
        assert doc.surprisal_nats == pytest.approx(-lp, rel=1e-10, abs=1e-9)
        assert corpus.surprisal(doc.text) == pytest.approx(doc.surprisal_nats, rel=1e-12)
        assert tuple(memory) == doc.memory and tuple(recalls) == doc.recalls


def test_surprisal_is_exact_for_other_knobs():
    c = SyntheticCorpus(seed=11, language_seed=5, lexicon_size=40, branching=2, recall_rate=1.0,
                        min_sentences=3, max_sentences=5, n_pairs=3, n_recalls=1, pair_syllables=2)
    for doc in c.documents(200):
        assert doc.memory and re.search(r"Remember: [a-z]{4} = [a-z]{4}", doc.text)
        assert doc.surprisal_nats == pytest.approx(-independent_log_prob(c, doc.text)[0], rel=1e-10)
    nats = np.array([d.surprisal_nats for d in c.documents(1000)])
    assert abs(nats.mean() - c.expected_document_nats()) < 5 * nats.std() / math.sqrt(len(nats))


def test_transition_rows_are_distributions(corpus):
    P = corpus.transition_matrix
    rows = P[list(range(len(corpus.words))) + [len(corpus.words) + 1]]
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    assert (P >= 0).all() and len(set(corpus.words)) == len(corpus.words)
    assert (rows > 0).sum(axis=1).max() <= len(corpus.words)  # sparse rows for words:
    assert np.median((rows[:-1] > 0).sum(axis=1)) <= 4 * corpus.branching


def test_parser_rejects_texts_the_source_cannot_emit(corpus, docs):
    doc = next(d for d in docs if d.recalls)
    key, value = doc.recalls[0]
    wrong = "ka" if value != "ka" else "lu"
    for bad in [doc.text.replace(f"Recall: {key} = {value}.", f"Recall: {key} = {wrong}."),
                doc.text[0].lower() + doc.text[1:],
                doc.text[:-1] + " zzzqx.",
                doc.text[:-1]]:
        with pytest.raises(DataError):
            corpus.surprisal(bad)


def test_recall_values_equal_the_stored_ones(corpus, docs):
    with_memory = [d for d in docs if d.memory]
    for d in with_memory:
        stored = dict(d.memory)
        assert len(stored) == corpus.n_pairs and len(d.recalls) == corpus.n_recalls
        assert len({k for k, _ in d.recalls}) == corpus.n_recalls
        memory_end = d.text.index("Remember:")
        for key, value in d.recalls:
            assert stored[key] == value
            assert d.text.index(f"Recall: {key} = {value}.") > memory_end
    # Binomial(n, 0.5): 5 standard deviations.
    n = len(docs)
    assert abs(len(with_memory) - n * corpus.recall_rate) < 5 * math.sqrt(n * 0.25)


def test_text_is_ascii_and_english_like(docs):
    for d in docs[:300]:
        assert d.text.isascii() and d.text.endswith(".") and "  " not in d.text
        for sentence in d.text[:-1].split(". "):
            assert PROSE.fullmatch(sentence) or MEMORY.fullmatch(sentence) or RECALL.fullmatch(sentence), sentence
    words = " ".join(d.text for d in docs[:300]).split()
    assert words.count("the") + words.count("The") > 0.03 * len(words)  # function words are frequent
    assert 3.0 < np.mean([len(w.strip(".,:")) for w in words]) < 7.0


def test_word_entropy_rate_matches_monte_carlo():
    # Without memory and with a fixed length, a document's surprisal is its prose's alone.
    c = SyntheticCorpus(seed=3, recall_rate=0.0, min_sentences=40, max_sentences=40)
    docs = list(c.documents(1500))
    nats = np.array([d.surprisal_nats for d in docs])
    words = np.array([len(d.text.split()) for d in docs], dtype=float)
    chars = np.array([len(d.text) for d in docs], dtype=float)
    rate = nats.sum() / words.sum()
    # Ratio estimator: its standard error by the delta method; 5 sigma keeps false alarms ~1e-6.
    stderr = np.std(nats - rate * words) / (math.sqrt(len(nats)) * words.mean())
    assert stderr < 0.01 * rate  # the test has the power to see a 5% error
    assert abs(rate - c.entropy_rate_nats_per_word()) < 5 * stderr
    assert abs(nats.mean() - c.expected_document_nats()) < 5 * nats.std() / math.sqrt(len(nats))
    assert abs(chars.mean() - c.expected_document_chars()) < 5 * chars.std() / math.sqrt(len(chars))
    assert 5 * chars.std() / math.sqrt(len(chars)) < 0.75 * 39  # would see the 39 spaces between sentences


def test_document_entropy_and_length_match_monte_carlo(corpus, docs):
    nats = np.array([d.surprisal_nats for d in docs])
    chars = np.array([len(d.text) for d in docs], dtype=float)
    for sample, expected in [(nats, corpus.expected_document_nats()), (chars, corpus.expected_document_chars())]:
        stderr = sample.std() / math.sqrt(len(sample))
        assert abs(sample.mean() - expected) < 5 * stderr
        assert stderr < 0.02 * expected


def test_floor_is_clearly_below_unigram_entropy(corpus, docs):
    text = "".join(d.text for d in docs).encode()
    counts = np.bincount(np.frombuffer(text, dtype=np.uint8))
    freq = counts[counts > 0] / counts.sum()
    char_unigram = float(-(freq * np.log(freq)).sum())
    floor = corpus.floor_nats_per_byte_token()
    assert 0.1 < floor < 0.3 * char_unigram
    assert corpus.prose_nats_per_char() < 0.7 * corpus.word_unigram_nats_per_char()
    sampled = entropy_floor_nats_per_token(sum(d.surprisal_nats for d in docs), len(text) + len(docs))
    assert sampled == pytest.approx(floor, rel=0.03)
    with pytest.raises(DataError):
        entropy_floor_nats_per_token(1.0, 0)


def test_generation_is_fast():
    import time

    c = SyntheticCorpus(seed=1)
    t0 = time.perf_counter()
    chars = sum(len(d.text) for d in c.documents(1000))
    assert chars / (time.perf_counter() - t0) > 3e5  # measured ~3e6 chars/s on one core


@pytest.mark.parametrize("knobs", [dict(min_sentences=5, max_sentences=4), dict(recall_rate=1.5),
                                   dict(n_recalls=5, n_pairs=4), dict(min_sentences=2, n_recalls=2),
                                   dict(lexicon_size=3)])
def test_impossible_knobs_are_refused(knobs):
    with pytest.raises(ConfigError):
        SyntheticCorpus(**knobs)


PINNED_DIGEST = "42b09f20090b40151eed588789fded2e1b429bd1619f1fce60b901769ff8b9b9"  # SyntheticCorpus() docs 0..19
