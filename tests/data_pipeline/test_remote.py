"""Shards written to and streamed from an S3 remote (moto's in-process S3), and an unreachable remote."""
import pytest

from ssmforge.data_pipeline.loader import build_loader, open_manifest
from ssmforge.data_pipeline.pack import prepare
from ssmforge.errors import DataError

from .conftest import run_config

moto = pytest.importorskip("moto")


@pytest.fixture
def s3(monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("S3_ENDPOINT_URL", "")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("S3_ENDPOINT_URL")
    with moto.mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="shards")
        yield boto3.client("s3")


def test_prepare_uploads_and_the_loader_streams_back(tmp_path, corpus, s3):
    path, _ = corpus
    config = run_config(tmp_path, [path], "data.shard_dir=s3://shards/run1")
    manifest = prepare(config)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="shards")["Contents"]}
    assert {"run1/manifest.json", "run1/train/index.json", "run1/val/index.json"} <= keys
    assert any(k.startswith("run1/train/shard.") for k in keys)
    assert open_manifest("s3://shards/run1", str(tmp_path / "other-cache")) == manifest
    assert prepare(config) == manifest  # the remote manifest makes a re-run a no-op
    remote = build_loader("s3://shards/run1", "train", 4, 5, str(tmp_path / "cache"))
    local_config = run_config(tmp_path / "local", [path])
    prepare(local_config)
    local = build_loader(local_config.data.shard_dir, "train", 4, 5, str(tmp_path / "cache2"))
    import torch

    assert all(torch.equal(a, b) for a, b in zip(list(remote)[:5], list(local)[:5]))


def test_unreachable_remote_is_one_clear_error(tmp_path, corpus, monkeypatch):
    path, _ = corpus
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(DataError, match=r"s3://shards/run1: remote is not reachable"):
        prepare(run_config(tmp_path, [path], "data.shard_dir=s3://shards/run1"))
