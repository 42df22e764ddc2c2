"""Fixtures for the data tests: a real S3-compatible server (moto) on 127.0.0.1.

``s3_server`` is one moto server for the whole session (dummy credentials in the environment);
``s3_bucket`` gives each test a fresh, empty bucket on it; ``moto_server`` starts a private server
a test may stop (a server that goes away mid-epoch). Nothing leaves the machine.

    def test_upload(s3_bucket):
        fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
        fs.pipe(f"{s3_bucket.url}/x.bin", b"...")
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoS3:
    """A running moto server: ``endpoint_url`` and the fsspec/s3fs ``storage_options`` to reach it."""

    server: object  # moto.server.ThreadedMotoServer
    endpoint_url: str
    running: bool = True

    @property
    def storage_options(self) -> dict:
        """For ``fsspec.filesystem("s3", **opts)`` / ``url_to_fs(url, **opts)`` / ``data.storage_options``."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}, "skip_instance_cache": True}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False


@dataclass
class S3Bucket:
    """An empty bucket on a moto server: ``url`` is ``s3://NAME`` (append ``/prefix`` as you like)."""

    name: str
    s3: MotoS3

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict:
        return self.s3.storage_options

    def filesystem(self):
        return self.s3.filesystem()


def _start_moto() -> MotoS3:
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return MotoS3(server=server, endpoint_url=f"http://{host}:{port}")


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on 127.0.0.1 (a free port) for the session, with dummy AWS credentials set."""
    saved = {k: os.environ.get(k) for k in DUMMY_AWS_ENV}
    os.environ.update(DUMMY_AWS_ENV)
    s3 = _start_moto()
    yield s3
    s3.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    """A fresh empty bucket on the session's moto server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(name)
    return S3Bucket(name=name, s3=s3_server)


@pytest.fixture
def moto_server(monkeypatch):
    """A private moto server (a test may ``.stop()`` it); stopped at the end if still running."""
    for key, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    s3 = _start_moto()
    yield s3
    s3.stop()
