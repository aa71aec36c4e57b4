"""The official Runware SDKs, unmodified but for their URL, against a live server.

The SDKs are installed once, pinned, into ``.sdk-envs/`` (ignored by git; ``SDK_ENVS_DIR``
moves it): the legacy ``runware`` and the new ``runware-sdk`` both install a package named
``runware``, so each gets its own virtualenv; ``@runware/sdk-js`` goes into an npm folder.
An environment is reused when its marker names the pinned version and the SDK imports.
The server runs as a real subprocess: ``python -m gateway serve --model tiny``.

Each client script (``tests/sdk_clients/``) runs under its SDK's interpreter, writes the
images it got into a folder and prints a JSON summary; the checks here decode those files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
import venv
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port, png_bytes, serve_command

pytestmark = pytest.mark.sdk

ROOT = Path(__file__).resolve().parent.parent
ENVS = Path(os.environ.get("SDK_ENVS_DIR", ROOT / ".sdk-envs"))
CLIENTS = Path(__file__).parent / "sdk_clients"
PINS = {"legacy": "runware==0.5.24", "new": "runware-sdk==1.8.0", "js": "@runware/sdk-js@1.3.2"}
PROBES = {
    "legacy": "import runware; assert runware.__version__ == '0.5.24', runware.__version__",
    "new": "from importlib.metadata import version; import runware; assert version('runware-sdk') == '1.8.0'",
    "js": "import('@runware/sdk-js').then((m) => { if (!m.Runware) process.exit(1); })",
}
API_KEY = "test-key"
INPUT_SIZE = (40, 24)
OUTPUT_SIZE = (80, 48)
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}
# What a failed install prints when the registry cannot be reached (pip, then npm).
OFFLINE_SIGNS = (
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "Failed to establish a new connection",
    "No matching distribution found",
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ETIMEDOUT",
    "ENETUNREACH",
)


def _install_failed(what: str, result: subprocess.CompletedProcess) -> None:
    output = (result.stdout + result.stderr)[-2000:]
    if any(sign in output for sign in OFFLINE_SIGNS):
        pytest.skip(f"could not install {what}: the package registry is unreachable\n{output}")
    pytest.fail(f"could not install {what}:\n{output}")


def _probe(command: list[str], cwd: Path | None = None) -> bool:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _python_env(name: str) -> Path:
    """A virtualenv holding only PINS[name]; built on first use, reused after."""
    folder = ENVS / name
    python = folder / "bin" / "python"
    marker = folder / ".installed"
    if marker.exists() and marker.read_text() == PINS[name] and _probe([str(python), "-c", PROBES[name]]):
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
            "--no-input",
            PINS[name],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        _install_failed(PINS[name], result)
    if not _probe([str(python), "-c", PROBES[name]]):
        pytest.fail(f"{PINS[name]} installed but does not import")
    marker.write_text(PINS[name])
    return python


@pytest.fixture(scope="session")
def legacy_python() -> Path:
    return _python_env("legacy")


@pytest.fixture(scope="session")
def new_python() -> Path:
    return _python_env("new")


@pytest.fixture(scope="session")
def js_folder() -> Path:
    """An npm folder with PINS['js'] installed exactly; built on first use, reused after."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed for the @runware/sdk-js test")
    folder = ENVS / "js"
    marker = folder / ".installed"
    probe = ["node", "--input-type=module", "-e", PROBES["js"]]
    if marker.exists() and marker.read_text() == PINS["js"] and _probe(probe, cwd=folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "package.json").write_text('{"name": "sdk-test", "private": true, "type": "module"}\n')
    result = subprocess.run(
        ["npm", "install", "--save-exact", "--no-audit", "--no-fund", "--loglevel=error", PINS["js"]],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        _install_failed(PINS["js"], result)
    if not _probe(probe, cwd=folder):
        pytest.fail(f"{PINS['js']} installed but does not import")
    marker.write_text(PINS["js"])
    return folder


class LiveServer:
    def __init__(self, port: int, http_port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1"
        self.http_url = f"http://127.0.0.1:{http_port}/v1"
        self.log_path = log_path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port, http_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("w")
    command = serve_command(
        port, "--host", "127.0.0.1", "--api-key", API_KEY, "--log-level", "WARNING", http_port=http_port
    )
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(port, http_port, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within 120 s:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, f"unclean exit after SIGTERM:\n{server.log_tail()}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def input_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdk-input") / "input.png"
    path.write_bytes(png_bytes(*INPUT_SIZE, (30, 120, 200)))
    return path


def _run_client(command: list[str], server: LiveServer, cwd: Path | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    where = f"{Path(command[1]).name} against {command[2]}"
    assert result.returncode == 0, (
        f"{where} failed (rc {result.returncode}):\nstdout:\n{result.stdout[-2000:]}\n"
        f"stderr:\n{result.stderr[-4000:]}\nserver log:\n{server.log_tail()}"
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"{where} printed nothing:\n{result.stderr[-4000:]}"
    return json.loads(lines[-1])


def _check_image(path: str, size: tuple[int, int] = OUTPUT_SIZE) -> None:
    """The file decodes, in the format its name says, at exactly `size`."""
    with Image.open(path) as image:
        image.load()
        assert image.size == size, (path, image.size)
        assert image.format == FORMATS[Path(path).suffix], (path, image.format)


def _is_uuid(value) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def test_legacy_python_sdk(legacy_python, live_server, input_png, tmp_path):
    summary = _run_client(
        [
            str(legacy_python),
            str(CLIENTS / "legacy_python.py"),
            live_server.url,
            API_KEY,
            str(input_png),
            str(tmp_path),
        ],
        live_server,
    )
    upload = summary["upload"]
    assert _is_uuid(upload["imageUUID"]), upload
    assert upload["imageURL"].startswith(f"http://127.0.0.1:{live_server.port}/images/"), upload
    _check_image(str(tmp_path / "uploaded.png"), INPUT_SIZE)

    for case in ("uuid-base64Data", "datauri-dataURI", "uuid-URL", "path-base64Data-webp"):
        result = summary[case]
        _check_image(result["file"])
        assert result["taskType"] == "imageUpscale", result
        assert _is_uuid(result["imageUUID"]) and _is_uuid(result["inputImageUUID"]), result
        assert result["seed"] == 7, result
    for case in ("uuid-base64Data", "uuid-URL"):
        assert summary[case]["inputImageUUID"] == upload["imageUUID"], summary[case]
    assert isinstance(summary["uuid-base64Data"]["cost"], float) and summary["uuid-base64Data"]["cost"] > 0
    assert summary["datauri-dataURI"]["cost"] is None

    assert len(summary["concurrent"]) == 3
    for path in summary["concurrent"]:
        _check_image(path)

    assert summary["async-ack"] == "IAsyncTaskResponse", summary
    _check_image(summary["async-getResponse"]["file"])

    error = summary["error"]
    assert error["code"] == "invalidUpscaleFactor", error
    assert error["data"]["parameter"] == "upscaleFactor" and _is_uuid(error["data"]["taskUUID"]), error

    assert summary["bad-key"].startswith("ConnectionError"), summary["bad-key"]
    assert summary["bad-key-seconds"] < 30, summary


def test_new_python_sdk(new_python, live_server, input_png, tmp_path):
    summary = _run_client(
        [
            str(new_python),
            str(CLIENTS / "new_python.py"),
            live_server.url,
            API_KEY,
            str(input_png),
            str(tmp_path),
        ],
        live_server,
    )
    for case in ("sync", "default-async", "uuid-dataURI", "after-error"):
        _check_image(summary[case]["file"])
    assert summary["sync"]["items"] == 1 and summary["default-async"]["items"] == 1, summary
    assert isinstance(summary["sync"]["cost"], float) and summary["sync"]["cost"] > 0, summary
    assert summary["sync"]["taskType"] == "upscale", summary  # the request's own taskType
    assert _is_uuid(summary["upload"]["imageUUID"]), summary["upload"]
    assert summary["uuid-dataURI"]["inputImageUUID"] == summary["upload"]["imageUUID"], summary
    assert len(summary["concurrent"]) == 3
    for path in summary["concurrent"]:
        _check_image(path)
    # runware-sdk maps server codes to categories: invalid… → "validation", …ApiKey → "auth".
    assert summary["error"]["code"] == "validation", summary["error"]
    assert summary["error"]["parameter"] == "upscaleFactor", summary["error"]
    assert _is_uuid(summary["error"]["task_uuid"]), summary["error"]
    assert summary["bad-key"]["code"] == "auth", summary["bad-key"]
    assert summary["bad-key-seconds"] < 20, summary


def test_new_python_sdk_over_rest(new_python, live_server, input_png, tmp_path):
    summary = _run_client(
        [
            str(new_python),
            str(CLIENTS / "new_python_rest.py"),
            live_server.http_url,
            API_KEY,
            str(input_png),
            str(tmp_path),
        ],
        live_server,
    )
    for delivery in ("sync", "async"):  # every output type and format, both ways
        results = summary[delivery]
        assert len(results) == 9, results
        for result in results.values():
            _check_image(result["file"])  # in the format its name says
            assert result["items"] == 1 and result["taskType"] == "upscale", result
    default = summary["default-async"]
    _check_image(default["file"])
    assert default["items"] == 1 and default["taskType"] == "upscale", default
    assert isinstance(default["cost"], float) and default["cost"] > 0, default
    upload = summary["upload"]
    assert _is_uuid(upload["imageUUID"]) and upload["taskType"] == "imageUpload", upload
    _check_image(summary["by-uuid"]["file"])
    assert summary["by-uuid"]["inputImageUUID"] == upload["imageUUID"], summary["by-uuid"]
    # runware-sdk maps server codes to categories: invalid… → "validation", …ApiKey → "auth".
    error = summary["error"]
    assert (error["code"], error["parameter"], error["status"]) == ("validation", "upscaleFactor", 400), error
    assert _is_uuid(error["task_uuid"]), error
    # Its client time-out re-POSTed the task (normally at least once), and the retry attached.
    _check_image(summary["retried"]["file"])
    assert summary["bad-key"]["code"] == "auth" and summary["bad-key"]["status"] == 401, summary["bad-key"]
    assert summary["bad-key-seconds"] < 20, summary


def test_js_sdk(js_folder, live_server, input_png, tmp_path):
    # Node resolves `@runware/sdk-js` from the script's folder, so the script runs from there.
    script = js_folder / "sdk_js.mjs"
    shutil.copy(CLIENTS / "sdk_js.mjs", script)
    summary = _run_client(
        ["node", str(script), live_server.url, API_KEY, str(input_png), str(tmp_path)],
        live_server,
        cwd=js_folder,
    )
    for case in ("upscale", "no-model", "uuid-URL", "dataURI-webp", "async"):
        _check_image(summary[case]["file"])
    assert summary["no-model"]["taskType"] == "upscale", summary
    assert isinstance(summary["upscale"]["cost"], float) and summary["upscale"]["cost"] > 0, summary
    assert summary["upscale"]["taskType"] == "upscale", summary
    assert _is_uuid(summary["upload"]["imageUUID"]), summary["upload"]
    assert summary["uuid-URL"]["inputImageUUID"] == summary["upload"]["imageUUID"], summary
    assert summary["async"]["status"] == "success", summary["async"]
    assert len(summary["concurrent"]) == 3
    for path in summary["concurrent"]:
        _check_image(path)
    error = summary["error"]
    assert error["code"] == "invalidUpscaleFactor" and _is_uuid(error["taskUUID"]), error
    # Only this exact code makes sdk-js stop retrying the connection and reject at once.
    assert summary["badKey"]["code"] == "invalidApiKey", summary["badKey"]
    assert summary["badKeySeconds"] < 10, summary
