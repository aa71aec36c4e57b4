"""A real S3 API on 127.0.0.1 for tests and benchmarks: moto's server mode as a process.

``MotoServer(log_dir).start()`` runs ``python -m moto.server`` on a free port (or a
given one, to restart it in place), waits until it answers, and :meth:`MotoServer.stop`
kills it by its PID. moto keeps everything in memory: a restart is an empty S3, so a
test that restarts it creates its bucket again (:meth:`MotoServer.create_bucket`).
The AWS variables of :data:`CREDENTIALS` are what its clients sign with (moto accepts
any); they go to the gateway's environment, never to its command line.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.cluster_harness import free_port

MOTO_INSTALLED = (
    importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None
)
INSTALL_HINT = "install it with: pip install 'moto[server]' (or pip install -e '.[test]')"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        if not MOTO_INSTALLED:
            raise FileNotFoundError(f"moto's server mode is not installed; {INSTALL_HINT}")
        self.port = port or free_port()
        self.log = log_dir / f"moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> MotoServer:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"moto_server did not start; see {self.log}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/moto-api/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def create_bucket(self, bucket: str) -> None:
        """A bucket (path style; moto needs no signature for it)."""
        response = httpx.put(f"{self.url}/{bucket}", timeout=5)
        assert response.status_code == 200, response.text

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The keys under ``prefix`` (the first 1,000)."""
        listed = self._client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]

    def object(self, bucket: str, key: str) -> dict | None:
        """An object as S3 has it (``Body`` read into bytes, ``ContentType``, ``Metadata``,
        …), or None if there is none; read with boto3 (moto's own dependency)."""
        from botocore.exceptions import ClientError

        try:
            found = self._client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        found["Body"] = found["Body"].read()
        return found

    def _client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset endpoint)."""
        httpx.post(f"{self.url}/moto-api/reset", timeout=5).raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _env() -> dict[str, str]:
    # moto's server must not pick up a developer's real AWS settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **CREDENTIALS}
