"""An S3-compatible server for the object-storage tests: moto's server mode (PyPI ``moto[s3]`` +
flask), started once per test session on a free port, as ``conftest.py`` starts the broker.

Why moto's server and not its in-process mock: the code under test talks real HTTP through s3fs /
aiobotocore (conditional PUTs included), exactly as it would to S3; nothing is patched.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server (dummy credentials, fixed region)."""
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def new_bucket(self) -> str:
        """A fresh bucket (one per test: tests never see each other's objects)."""
        import boto3

        name = f"t{uuid.uuid4().hex[:16]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    moto_server = pytest.importorskip("moto.server", reason="moto[s3] + flask are dev dependencies (requirements.lock)")
    pytest.importorskip("s3fs", reason="s3fs is a pinned dependency (requirements.lock)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()
