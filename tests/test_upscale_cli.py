"""``latent-upscaler upscale``: the batch command, run as a real subprocess
(``python -m gateway upscale …``) against a real server in this process (tiny model, or
the null engine where only the protocol matters), and with the engine in its own process.

Each test checks what a user would: the files written (decoded, exactly 2x), the exit
status, the ``--json`` lines, and on the server's side that no task ran twice.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from PIL import Image

from client.inputs import Naming, expand, is_output_name, output_name
from client.stream import _reachable
from engine.client import NullEngineClient
from gateway.config import GatewayConfig
from gateway.connection import Connection
from tests.conftest import TINY, FakeClock, HeldEngineClient, client, free_port, serving, wait_until

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[dict]:
        """Every stdout line, parsed (each must be JSON)."""
        return [orjson.loads(line) for line in self.stdout.splitlines()]

    def by_status(self, status: str) -> dict[str, dict]:
        return {line["input"]: line for line in self.lines if line["status"] == status}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "upscale", *args]


_started: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def _kill_leftovers():
    """A command a failed test left running is killed, by its PID."""
    yield
    while _started:
        process = _started.pop()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start(*args: str, stdin: bool = False, env: dict | None = None) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *command(*args),
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _started.append(process)
    return process


async def finish(process: asyncio.subprocess.Process, stdin: bytes | None = None, timeout=120) -> Run:
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    return Run(process.returncode, out.decode(), err.decode())


async def upscale(*args: str, stdin: bytes | None = None, timeout: float = 120) -> Run:
    return await finish(await start(*args, stdin=stdin is not None), stdin, timeout)


def over(server, *args: str) -> tuple[str, ...]:
    """The flags that point the command at ``server``."""
    return ("--url", server.url, "--api-key", KEY, *args)


def save(path: Path, size: tuple[int, int], color=(200, 30, 30), mode: str = "RGB", fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "RGBA" else (*color, 120)).save(path, format=fmt)


def mixed_folder(root: Path) -> dict[str, tuple[str, tuple[int, int], str]]:
    """Images of several sizes and formats (one broken, plus files a walk must pass over).
    Returns input → (output, output size, output format), relative to ``root``."""
    save(root / "a.png", (40, 24))
    save(root / "sub" / "b.jpg", (33, 17), (20, 130, 30))
    save(root / "sub" / "deeper" / "c.webp", (24, 40), (20, 30, 130), mode="RGBA")
    save(root / "d.bmp", (20, 20), (120, 30, 130))
    save(root / "sub" / "e.gif", (17, 29), (90, 90, 10))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    (root / "notes.txt").write_text("not an image")
    save(root / ".hidden.png", (16, 16))
    return {
        "a.png": ("a.2x.png", (80, 48), "PNG"),
        "sub/b.jpg": ("sub/b.2x.jpg", (66, 34), "JPEG"),
        "sub/deeper/c.webp": ("sub/deeper/c.2x.webp", (48, 80), "WEBP"),
        "d.bmp": ("d.2x.png", (40, 40), "PNG"),
        "sub/e.gif": ("sub/e.2x.png", (34, 58), "PNG"),
    }


def check_outputs(root: Path, expected: dict, out: Path | None = None) -> None:
    """Every expected output decodes whole at exactly 2x, in its format."""
    for _, (output, size, fmt) in expected.items():
        with Image.open((out or root) / output) as image:
            image.load()
            assert (image.size, image.format) == (size, fmt), output


def outputs_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".2x." in p.name}


@pytest.fixture
async def tiny_server():
    async with serving(GatewayConfig(port=0, engine=TINY)) as server:
        yield server


# Naming and walking (no server)


def test_output_names_and_where_they_go(tmp_path):
    assert output_name("photo.png", "PNG") == "photo.2x.png"
    assert output_name("photo.JPEG", "JPG") == "photo.2x.JPEG"  # its own extension kept
    assert output_name("scan.tiff", "PNG") == "scan.2x.png"
    assert output_name("photo.png", "WEBP") == "photo.2x.webp"
    assert is_output_name("photo.2x.png") and not is_output_name("photo.png")
    beside = Naming()
    assert beside.job(Path("x/photo.bmp")).output == Path("x/photo.2x.png")
    out = Naming(tmp_path / "out", "JPG")
    assert out.job(Path("x/photo.png")).output == tmp_path / "out" / "photo.2x.jpg"
    assert out.job(Path("root/a/b/p.png"), Path("root")).output == tmp_path / "out" / "a" / "b" / "p.2x.jpg"


def test_a_walk_skips_outputs_hidden_files_and_the_out_folder(tmp_path):
    expected = mixed_folder(tmp_path)
    save(tmp_path / "a.2x.png", (80, 48))  # an earlier output
    save(tmp_path / "out" / "z.png", (8, 8))  # inside --out
    jobs = list(expand([str(tmp_path)], Naming(tmp_path / "out")))
    found = {str(job.source.relative_to(tmp_path)) for job in jobs}
    assert found == {*expected, "broken.png"}
    assert {str(job.output.relative_to(tmp_path / "out")) for job in jobs if job.source.name == "b.jpg"} == {
        "sub/b.2x.jpg"
    }


# Against a server


async def test_a_folder_through_a_server_then_a_rerun_skips_it(tiny_server, tmp_path):
    expected = mixed_folder(tmp_path)
    run = await upscale(str(tmp_path), *over(tiny_server, "--steps", "2", "--json"))
    assert run.returncode == 1, run.stderr
    check_outputs(tmp_path, expected)
    assert outputs_under(tmp_path) == {output for output, _, _ in expected.values()}
    ok, failed = run.by_status("ok"), run.by_status("failed")
    assert {Path(p).relative_to(tmp_path).as_posix() for p in ok} == set(expected)
    assert all(isinstance(line["seed"], int) and line["cost"] > 0 for line in ok.values())
    [broken] = failed.values()
    assert broken["input"].endswith("broken.png") and broken["error"]["code"] == "invalidInputImage"
    assert "broken.png: invalidInputImage" in run.stderr  # listed at the end
    ran = tiny_server.gateway.engine.stats().succeeded

    rerun = await upscale(str(tmp_path), *over(tiny_server, "--steps", "2", "--json"))
    assert rerun.returncode == 1
    assert len(rerun.by_status("skipped")) == len(expected) and len(rerun.by_status("failed")) == 1
    assert tiny_server.gateway.engine.stats().succeeded == ran  # nothing upscaled again


async def test_dropped_connections_lose_nothing_and_write_nothing_twice(tiny_server, tmp_path):
    for i in range(12):
        save(tmp_path / f"{i:02}.png", (24 + i, 16), (10 * i, 60, 90))
    process = await start(str(tmp_path), *over(tiny_server, "--steps", "2", "--json", "--concurrency", "4"))
    drops = 0
    # Drop every socket (no close frame: as a network failure would) each time more
    # outputs have appeared, while the rest are in flight.
    for written in (1, 4, 8):
        await wait_until(lambda n=written: len(outputs_under(tmp_path)) >= n, timeout=60)
        for connection in list(tiny_server.connections):
            connection.ws.transport.abort()
            drops += 1
    run = await finish(process)
    assert run.returncode == 0, run.stderr
    assert drops >= 3 and "resuming" in run.stderr
    assert len(run.lines) == 12 and len(run.by_status("ok")) == 12  # one line per input
    assert outputs_under(tmp_path) == {f"{i:02}.2x.png" for i in range(12)}
    for i in range(12):
        assert Image.open(tmp_path / f"{i:02}.2x.png").size == (2 * (24 + i), 32)
    assert tiny_server.gateway.engine.stats().succeeded == 12  # none ran twice


async def test_results_of_an_expired_session_come_by_getresponse(tmp_path):
    """The socket drops and the session expires before the results exist: they are
    pushed to nobody, and the command fetches them with getResponse."""
    clock, engine = FakeClock(), HeldEngineClient()
    async with serving(engine=engine, clock=clock) as server:
        for i in range(6):
            save(tmp_path / f"{i}.png", (20, 10 + i))
        process = await start(str(tmp_path), *over(server, "--json"))
        await wait_until(lambda: len(engine.held) == 6)
        [old] = server.connections
        old.ws.transport.abort()
        await wait_until(lambda: old not in server.connections)  # detached (long before a reconnect)
        clock.advance(1000)  # past the session TTL: the resume gets a new session
        await wait_until(lambda: any(c is not old and c.session for c in server.connections))
        engine.release(stop_holding=True)
        run = await finish(process)
    assert run.returncode == 0, run.stderr
    assert "did not resume the session" in run.stderr
    assert len(run.by_status("ok")) == 6
    assert outputs_under(tmp_path) == {f"{i}.2x.png" for i in range(6)}
    assert engine.stats().succeeded == 6


async def test_a_frame_lost_with_the_connection_is_sent_again(tmp_path, monkeypatch):
    """The server never reads the first frame of tasks (the connection dies with it):
    getResponse says it does not know them, and they are sent again."""
    handle, lost = Connection.handle, []

    async def lose_first_upscale_frame(self, message):
        if not lost and b'"upscale"' in (message if isinstance(message, bytes) else message.encode()):
            lost.append(message)
            self.ws.transport.abort()
            return
        await handle(self, message)

    monkeypatch.setattr(Connection, "handle", lose_first_upscale_frame)
    engine = NullEngineClient()
    async with serving(engine=engine) as server:
        for i in range(5):
            save(tmp_path / f"{i}.png", (12 + i, 12))
        run = await upscale(str(tmp_path), *over(server, "--json"))
    assert lost and run.returncode == 0, run.stderr
    assert len(run.by_status("ok")) == 5 and engine.stats().succeeded == 5
    assert outputs_under(tmp_path) == {f"{i}.2x.png" for i in range(5)}


async def test_stdin_paths_json_lines_and_overwrite(null_server, tmp_path):
    save(tmp_path / "in" / "one.png", (10, 12))
    save(tmp_path / "in" / "deep" / "two.jpg", (14, 9))
    listing = f"{tmp_path}/in/one.png\n\n{tmp_path}/in/missing.png\n{tmp_path}/in/deep/two.jpg\n"
    out = tmp_path / "out"
    args = over(null_server, "-", "--out", str(out), "--json", "--format", "webp", "--seed", "42")
    run = await upscale(*args, stdin=listing.encode())
    assert run.returncode == 1, run.stderr
    lines = run.lines  # every line is JSON
    assert len(lines) == 3
    ok = run.by_status("ok")
    assert set(ok) == {f"{tmp_path}/in/one.png", f"{tmp_path}/in/deep/two.jpg"}
    for line in ok.values():
        assert line["seed"] == 42 and line["seconds"] >= 0 and line["output"].startswith(str(out))
    assert {p.name for p in out.iterdir()} == {"one.2x.webp", "two.2x.webp"}  # flat, by name
    assert Image.open(out / "two.2x.webp").size == (28, 18)
    [missing] = run.by_status("failed").values()
    assert missing["error"]["code"] == "missingFile" and missing["output"] is None

    again = await upscale(*args, "--overwrite", stdin=listing.encode())
    assert len(again.by_status("ok")) == 2 and not again.by_status("skipped")


async def test_large_outputs_are_fetched_from_their_url(null_server, tmp_path):
    """Outputs over a megapixel come as imageURL (not inside the result frame) and are
    fetched from the server; small ones come inline."""
    served, get = [], null_server.routes.get

    async def recording_get(path: str):
        served.append(path)
        return await get(path)

    null_server.routes.get = recording_get  # what the server answers over plain HTTP
    save(tmp_path / "big.png", (600, 500))
    save(tmp_path / "small.png", (30, 20))
    run = await upscale(str(tmp_path), *over(null_server, "--json"))
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "big.2x.png").size == (1200, 1000)
    assert Image.open(tmp_path / "small.2x.png").size == (60, 40)
    [image_path] = served  # one fetch: the large output's
    assert image_path.startswith("/images/") and image_path.endswith(".png")


def test_image_urls_of_a_wildcard_host_are_fetched_from_the_socket_host():
    ws = "ws://gpu-box:8787/v1"
    assert _reachable("http://0.0.0.0:8787/images/x.png", ws) == "http://gpu-box:8787/images/x.png"
    assert _reachable("https://cdn.example/images/x.png", ws) == "https://cdn.example/images/x.png"


async def test_a_server_with_smaller_frames_gets_smaller_frames(tmp_path):
    """The server closes the connection on a frame over its limit (1009): the command
    sends smaller frames from then on, and fails only the input too big for any."""
    Image.frombytes("RGB", (200, 200), os.urandom(120_000)).save(tmp_path / "noise.png")  # ~160 KB as base64
    for i in range(6):
        save(tmp_path / f"{i}.png", (10 + i, 10))
    engine = NullEngineClient()
    async with serving(engine=engine, max_frame_bytes=64 * 2**10) as server:
        run = await upscale(str(tmp_path), *over(server, "--json"), timeout=60)
    assert run.returncode == 1, run.stderr
    assert len(run.by_status("ok")) == 6 and engine.stats().succeeded == 6
    [failed] = run.by_status("failed").values()
    assert failed["input"].endswith("noise.png") and failed["error"]["code"] == "inputTooLarge"


async def test_fail_fast_sends_nothing_after_a_failure(null_server, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    paths = [tmp_path / "bad.png"]
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        save(paths[-1], (10, 10))
    listing = "".join(f"{p}\n" for p in paths).encode()
    run = await upscale("-", *over(null_server, "--fail-fast", "--concurrency", "1"), stdin=listing)
    assert run.returncode == 1
    assert outputs_under(tmp_path) == set()


async def test_ctrl_c_finishes_what_was_sent_and_leaves_only_whole_files(tiny_server, tmp_path):
    total = 24
    for i in range(total):
        save(tmp_path / f"{i:02}.png", (20 + i, 20), (9 * i, 50, 50))
    args = over(tiny_server, "--steps", "2", "--concurrency", "2")
    process = await start(str(tmp_path), *args)
    await wait_until(lambda: len(outputs_under(tmp_path)) >= 1, timeout=60)
    process.send_signal(signal.SIGINT)
    run = await finish(process)
    assert run.returncode == 130, run.stderr
    written = outputs_under(tmp_path)
    assert 1 <= len(written) < total
    for name in written:  # complete files only: each decodes whole, at 2x
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.size == (2 * (20 + int(name[:2])), 40)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]

    rest = await upscale(str(tmp_path), *args, "--json")  # a rerun continues where it stopped
    assert rest.returncode == 0, rest.stderr
    assert len(rest.by_status("skipped")) == len(written)
    assert len(rest.by_status("ok")) == total - len(written)


# In-process (no --url)


async def test_in_process_gives_the_servers_bytes(tiny_server, tmp_path):
    """Without --url the engine runs in the command's own process; with the same seed
    its outputs are byte for byte what the server returns for the same task."""
    expected = mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    engine_flags = ("--model", "tiny", "--device", "cpu", "--dtype", "fp32")
    run = await upscale(str(tmp_path / "in"), "--out", str(out), "--steps", "2", *engine_flags)
    assert run.returncode == 1, run.stderr
    check_outputs(tmp_path / "in", expected, out)  # a folder's files keep their paths under --out
    assert "broken.png: invalidInputImage" in run.stderr

    # One image alone, as the server will run it (batch composition moves float rounding).
    alone = await upscale(
        str(tmp_path / "in" / "a.png"),
        "--out",
        str(out),
        "--overwrite",
        "--steps",
        "2",
        "--seed",
        "7",
        *engine_flags,
    )
    assert alone.returncode == 0, alone.stderr
    source = (tmp_path / "in" / "a.png").read_bytes()
    task = {
        "taskType": "upscale",
        "taskUUID": "5b1e6a52-64f1-4d87-a3a8-0f1c9d7b7f11",
        "inputImage": base64.b64encode(source).decode(),
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "settings": {"steps": 2, "seed": 7},
    }
    async with client(tiny_server) as c:
        [item] = (await c.run([task]))[task["taskUUID"]]
    assert base64.b64decode(item["imageBase64Data"]) == (out / "a.2x.png").read_bytes()


def test_in_process_rerun_with_nothing_to_do_loads_no_model(tmp_path):
    save(tmp_path / "a.png", (10, 10))
    save(tmp_path / "a.2x.png", (20, 20))
    # A model that does not exist: loading it would fail with exit 2.
    result = subprocess.run(
        command(str(tmp_path / "a.png"), "--model", str(tmp_path / "no-model"), "--json"),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["status"] == "skipped"


# Usage errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--quality", "5"), "--quality"),
        (("--steps", "0"), "--steps"),
        (("--url", "http://example.com"), "ws://"),
        (("--format", "gif"), "invalid choice"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    save(tmp_path / "a.png", (10, 10))
    result = subprocess.run(
        command(str(tmp_path / "a.png"), *args), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_input_or_an_unreachable_server_exits_2(tmp_path):
    save(tmp_path / "a.png", (10, 10))
    missing = subprocess.run(
        command(str(tmp_path / "nope.png")), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    url = f"ws://127.0.0.1:{free_port()}/v1"
    unreachable = subprocess.run(
        command(str(tmp_path / "a.png"), "--url", url), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert unreachable.returncode == 2 and "cannot connect" in unreachable.stderr


async def test_a_refused_api_key_exits_2(tmp_path):
    save(tmp_path / "a.png", (10, 10))
    async with serving(engine=NullEngineClient(), api_keys=("the-key",)) as server:
        run = await upscale(str(tmp_path / "a.png"), "--url", server.url, "--api-key", "wrong")
        assert run.returncode == 2 and "invalidApiKey" in run.stderr
        env = {**os.environ, "LATENT_UPSCALER_API_KEY": "the-key"}
        env_run = await start(str(tmp_path / "a.png"), "--url", server.url, env=env)
        assert (await finish(env_run)).returncode == 0  # the key from the environment
    assert Image.open(tmp_path / "a.2x.png").size == (20, 20)


def test_help_names_every_variable():
    from gateway.__main__ import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["upscale"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert "LATENT_UPSCALER_" in (action.help or ""), action.dest
    text = sub.format_help()
    for variable in ("LATENT_UPSCALER_URL", "LATENT_UPSCALER_API_KEY", "LATENT_UPSCALER_MODEL"):
        assert variable in text
