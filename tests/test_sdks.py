"""The official Runware SDKs, unmodified but for their URL, against a live server.

The SDKs are installed on first use into ``.sdk-envs/`` (ignored by git): the legacy
``runware`` and the new ``runware-sdk`` both install a package named ``runware``, so
each gets its own virtualenv; ``@runware/sdk-js`` goes into an npm folder. The server
runs as a real subprocess: ``python -m gateway serve --model tiny``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import venv
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, png_bytes, serve_command

pytestmark = pytest.mark.sdk

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / ".sdk-envs"
CLIENTS = Path(__file__).parent / "sdk_clients"
PINS = {"legacy": "runware==0.5.24", "new": "runware-sdk==1.8.0", "js": "@runware/sdk-js@1.3.2"}
API_KEY = "sdk-test-key"


def _python_env(name: str, requirement: str) -> Path:
    folder = ENVS / name
    python = folder / "bin" / "python"
    marker = folder / ".installed"
    if marker.exists() and marker.read_text() == requirement:
        return python
    shutil.rmtree(folder, ignore_errors=True)
    venv.create(folder, with_pip=True)
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
            "pillow",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.skip(f"could not install {requirement} from PyPI: {result.stderr[-500:]}")
    marker.write_text(requirement)
    return python


def _node_env() -> Path:
    folder = ENVS / "js"
    marker = folder / ".installed"
    if marker.exists() and marker.read_text() == PINS["js"]:
        return folder
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed for the JS SDK test")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text('{"name": "sdk-test", "private": true, "type": "module"}')
    result = subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", PINS["js"]],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.skip(f"could not install {PINS['js']} from npm: {result.stderr[-500:]}")
    marker.write_text(PINS["js"])
    return folder


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        serve_command(port, "--api-key", API_KEY, "--log-level", "WARNING"),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("the server did not become ready")
    yield f"ws://127.0.0.1:{port}/v1"
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def input_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdk") / "input.png"
    path.write_bytes(png_bytes(40, 24, (30, 120, 200)))
    return path


def _run(command: list[str], cwd: Path | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, f"{command[1]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_legacy_python_sdk(live_server, input_png):
    python = _python_env("legacy", PINS["legacy"])
    summary = _run([str(python), str(CLIENTS / "legacy_python.py"), live_server, API_KEY, str(input_png)])
    for case in ("uuid-base64Data", "datauri-dataURI", "uuid-URL"):
        assert summary[case] == [80, 48], summary
    assert summary["async"]


def test_new_python_sdk(live_server, input_png):
    python = _python_env("new", PINS["new"])
    summary = _run([str(python), str(CLIENTS / "new_python.py"), live_server, API_KEY, str(input_png)])
    assert summary == {"sync": [80, 48], "async": [80, 48]}


def test_js_sdk(live_server, input_png):
    folder = _node_env()
    script = folder / "sdk_js.mjs"
    shutil.copy(CLIENTS / "sdk_js.mjs", script)
    env_summary = _run(["node", str(script), live_server, API_KEY, str(input_png)], cwd=folder)
    assert env_summary["upscale"] == [80, 48]
