"""Sources: local files of each format, bad input named by file and line, weighted mixing, the hub."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssmforge.data_pipeline.sources import SkipCounter, hub_documents, local_documents, mixed_documents
from ssmforge.errors import DataError
from ssmforge.pretrain.config import SourceConfig


def read(patterns, field="text", policy="fail"):
    skipped = SkipCounter()
    return list(local_documents([str(p) for p in patterns], field, policy, skipped)), skipped


def test_formats_and_globs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three", None, "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five\nstill five")
    docs, _ = read([tmp_path / "*.jsonl", tmp_path / "*.parquet", tmp_path / "c.txt"], field="body")
    assert docs == ["one", "two", "three", "four", "five\nstill five"]


def test_missing_text_field_names_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: no text field 'text'"):
        read([tmp_path / "a.jsonl"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text'"):
        read([tmp_path / "b.parquet"])


def test_invalid_utf8_fails_or_is_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "good"}\n{"text": "bad \xff\xfe"}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid UTF-8 at byte 14"):
        read([tmp_path / "a.jsonl"])
    docs, skipped = read([tmp_path / "a.jsonl"], policy="skip")
    assert docs == ["good", "fine"] and skipped.invalid_utf8 == 1 and skipped.files == [f"{tmp_path}/a.jsonl:2"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty\.jsonl: file is empty"),
    ("blank.jsonl", b"\n\n", r"blank\.jsonl: holds no documents"),
    ("broken.jsonl", b'{"text": "a"\n', r"broken\.jsonl:1: not valid JSON"),
    ("number.jsonl", b'{"text": 3}\n', r"number\.jsonl:1: field 'text' is int"),
    ("data.csv", b"a,b\n", r"data\.csv: unsupported file type '\.csv'"),
    ("bad.parquet", b"not parquet", r"bad\.parquet: not a readable parquet file"),
])
def test_bad_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read([tmp_path / name])


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"nothing\*\.jsonl: no such file"):
        read([tmp_path / "nothing*.jsonl"])


def test_mixing_follows_weights_and_stops_at_the_first_exhausted(tmp_path):
    for name, n in (("a", 3000), ("b", 3000)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
    sources = [SourceConfig(kind="local", paths=[str(tmp_path / "a.jsonl")], weight=3.0),
               SourceConfig(kind="local", paths=[str(tmp_path / "b.jsonl")], weight=1.0)]
    mixed = list(mixed_documents(sources, 7, "fail", SkipCounter()))
    from_a = [text for i, text, _ in mixed if i == 0]
    from_b = [text for i, text, _ in mixed if i == 1]
    assert from_a == [f"a{i}" for i in range(3000)]  # a ran out first, each document once, in order
    assert from_b == [f"b{i}" for i in range(len(from_b))]
    assert abs(len(from_b) / len(mixed) - 0.25) < 0.03  # 3000 draws: standard error ~0.008
    assert mixed == list(mixed_documents(sources, 7, "fail", SkipCounter()))
    assert mixed != list(mixed_documents(sources, 8, "fail", SkipCounter()))


def test_hub_source_streams_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split, streaming):
        calls.append((name, subset, split, streaming))
        return iter([{"text": "first"}, {"text": "second"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(hub_documents("wikitext", "wikitext-2-raw-v1", "train", "text", True)) == ["first", "second"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True)]
    with pytest.raises(DataError, match=r"hub dataset 'wikitext': no text field 'body'"):
        list(hub_documents("wikitext", None, "train", "body", True))


@pytest.mark.timeout(120)
def test_unreachable_hub_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub dataset 'no-such-org/no-such-dataset' .* could not be loaded"):
        list(hub_documents("no-such-org/no-such-dataset", None, "train", "text", True))


def budgeted(*limits):
    from ssmforge.data_pipeline.sources import TokenBudget

    return TokenBudget([SourceConfig(kind="synthetic", max_documents=10, max_tokens=limit) for limit in limits])


@pytest.mark.parametrize("limit, taken", [(1, 1), (5, 1), (6, 2), (12, 2), (13, 3), (15, 3), (16, 4), (24, 4),
                                          (25, 4)])
def test_a_budget_ends_with_the_document_that_reaches_it(limit, taken):
    lengths = [5, 7, 3, 9]  # cumulative 5, 12, 15, 24
    budget = budgeted(limit)
    assert budget.admit_batch([0] * 4, lengths) == taken
    assert budget.documents == [taken] and budget.tokens == [sum(lengths[:taken])]
    assert budget.ended == (sum(lengths[:taken]) >= limit)  # 25: the source ran out first, not the budget


def test_a_spent_source_ends_the_mixture_where_it_is_drawn_next():
    budget = budgeted(10, None)
    # source 0 reaches 10 with its second document; source 1 goes on until source 0 is drawn again
    sources, lengths = [0, 1, 0, 1, 1, 0, 1], [4, 100, 6, 100, 100, 1, 100]
    assert budget.admit_batch(sources, lengths) == 5
    assert budget.documents == [2, 3] and budget.tokens == [10, 300] and budget.ended
    assert budget.admit_batch([1], [5]) == 0  # ended for good


@pytest.mark.parametrize("value", [0, -3, "many", 1.5])
def test_max_tokens_must_be_a_positive_integer_or_null(value):
    from ssmforge.errors import ConfigError
    from ssmforge.pretrain.config import load_config

    where = r"data\.sources\.0\.max_tokens=-?\d+ is invalid: must be a positive integer or null" if isinstance(
        value, int) else r"max_tokens: Value '.*' of type '.*' could not be converted to Integer"
    with pytest.raises(ConfigError, match=where) as error:
        load_config(None, ["run_dir=r", f"data.sources=[{{kind: synthetic, max_documents: 10, max_tokens: {value}}}]"])
    assert "\n" not in str(error.value)
    config = load_config(None, ["run_dir=r", "data.sources=[{kind: synthetic, max_tokens: 1000}]"])  # bounded too
    assert config.data.sources[0].max_tokens == 1000 and config.data.sources[0].max_documents is None
