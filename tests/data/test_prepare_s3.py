"""``distllm prepare`` into object storage: a real S3-compatible server (moto) on 127.0.0.1."""

import pytest
from prepared import file_bytes, make_config

import distllm.data.output as output_module
from distllm.data.prepare import INTERRUPT_ENV, prepare
from distllm.data.shards import MANIFEST, verify
from distllm.errors import DataError

SETTINGS = {"shard_tokens": 4000, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def local_build(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "data"
    prepare(make_config(tiny_corpus, out, **SETTINGS))
    return out


def s3_config(tiny_corpus, bucket, tmp_path, **data):
    return make_config(tiny_corpus, f"{bucket.url}/corpus/v1", storage_options=bucket.storage_options,
                       cache_dir=str(tmp_path / "cache"), **{**SETTINGS, **data})  # fmt: skip


def download(bucket, tmp_path):
    local = tmp_path / "download"
    bucket.filesystem().get(f"{bucket.url}/corpus/v1/", str(local), recursive=True)
    return local


def test_prepare_writes_to_s3_with_the_manifest_last(tiny_corpus, local_build, s3_bucket, tmp_path, monkeypatch):
    order = []
    write_shard, put_text = output_module.RemoteOutput.write_shard, output_module.RemoteOutput.put_text
    monkeypatch.setattr(output_module.RemoteOutput, "write_shard",
                        lambda self, name, *a: order.append(name) or write_shard(self, name, *a))  # fmt: skip
    monkeypatch.setattr(output_module.RemoteOutput, "put_text",
                        lambda self, name, text: order.append(name) or put_text(self, name, text))  # fmt: skip
    manifest = prepare(s3_config(tiny_corpus, s3_bucket, tmp_path))
    assert order[-1] == MANIFEST and order.count(MANIFEST) == 1 and len(order) > 4

    local = download(s3_bucket, tmp_path)
    assert verify(local, check_hashes=True)["splits"] == manifest["splits"]
    assert file_bytes(local) == file_bytes(local_build)  # the same bytes as a local build
    assert not any((tmp_path / "cache").iterdir())  # staging and journal removed

    # an existing prepared prefix is refused like a local directory
    with pytest.raises(DataError, match=r"s3://.*already holds a prepared dataset .*data.overwrite=true"):
        prepare(s3_config(tiny_corpus, s3_bucket, tmp_path, shard_tokens=999))


def test_interrupted_upload_finishes_on_rerun(tiny_corpus, local_build, s3_bucket, tmp_path, monkeypatch):
    cfg = s3_config(tiny_corpus, s3_bucket, tmp_path)
    monkeypatch.setenv(INTERRUPT_ENV, "shard:3")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    fs = s3_bucket.filesystem()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket.url}/corpus/v1", detail=False)}
    assert MANIFEST not in names and {"train_000000.bin", "train_000001.bin", "train_000002.bin"} <= names

    monkeypatch.delenv(INTERRUPT_ENV)
    uploads = []
    write_shard = output_module.RemoteOutput.write_shard
    monkeypatch.setattr(output_module.RemoteOutput, "write_shard",
                        lambda self, name, *a: uploads.append(name) or write_shard(self, name, *a))  # fmt: skip
    prepare(cfg)
    assert "train_000000.bin" not in uploads and "train_000003.bin" in uploads  # only what was missing
    assert file_bytes(download(s3_bucket, tmp_path)) == file_bytes(local_build)


def test_unreachable_object_store_is_a_clear_error(tiny_corpus, tmp_path, moto_server):
    options = {"client_kwargs": {"endpoint_url": moto_server.endpoint_url}, "skip_instance_cache": True,
               "retries": 0, "connect_timeout": 1}  # fmt: skip
    moto_server.stop()
    cfg = make_config(tiny_corpus, "s3://gone/corpus", storage_options=options, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"s3://gone/corpus.*data.storage_options"):
        prepare(cfg)
