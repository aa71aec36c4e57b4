"""The engine against diffusers' own pipeline: fidelity, batch invariance, real batching,
sizes, reproducibility, cancellation and fault isolation (tiny model, fp32, CPU)."""

from __future__ import annotations

import io
import queue
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionLatentUpscalePipeline
from PIL import Image

from engine.api import EngineError, ErrorCode, OutputFormat, UpscaleRequest, UpscaleResult
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.loader import ensure_builtin_model
from tests.engine_helpers import Collector, CountingUNet, make_png, png_to_array, submit_burst

CONFIG = EngineConfig(model="tiny", device="cpu", dtype="fp32", max_batch_rows=16)


@pytest.fixture(scope="module")
def tiny_path():
    return ensure_builtin_model("tiny")


@pytest.fixture(scope="module")
def stock(tiny_path):
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(str(tiny_path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def core():
    core = EngineCore.load(CONFIG)
    core.runner.unet = CountingUNet(core.runner.unet)
    yield core
    core.shutdown()


def run(core: EngineCore, requests: list[UpscaleRequest]) -> tuple[dict, Collector]:
    collector = Collector()
    submit_burst(core, requests)
    core.start(collector)
    return collector.wait([r.request_id for r in requests]), collector


def request(rid: str, png: bytes, **kw) -> UpscaleRequest:
    return UpscaleRequest(request_id=rid, image=png, output_format=OutputFormat.PNG, **kw)


def stock_output(stock, png: bytes, req: UpscaleRequest) -> np.ndarray:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = stock(
        prompt=req.prompt,
        image=image,
        num_inference_steps=req.steps,
        guidance_scale=req.cfg_scale,
        negative_prompt=req.negative_prompt or None,
        generator=torch.Generator("cpu").manual_seed(req.seed),
    ).images[0]
    return np.asarray(out).astype(np.int16)


FIDELITY_CASES = [
    dict(prompt="a red fox in the snow", cfg_scale=0.0, steps=3, seed=1),
    dict(prompt="a red fox in the snow", cfg_scale=1.0, steps=5, seed=2),
    dict(
        prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", cfg_scale=7.5, steps=4, seed=3
    ),
]


@pytest.mark.parametrize("case", FIDELITY_CASES, ids=["cfg0", "cfg1-prompt", "cfg7.5-negative"])
def test_matches_the_stock_pipeline(core, stock, case):
    png = make_png(128, 64, seed=case["seed"])
    req = request("r", png, **case)
    results, _ = run(core, [req])
    result = results["r"]
    assert isinstance(result, UpscaleResult), result
    ours = png_to_array(result.image)
    theirs = stock_output(stock, png, req)
    assert ours.shape == theirs.shape == (128, 256, 3)
    assert np.abs(ours - theirs).max() <= 2


def burst() -> list[UpscaleRequest]:
    specs = [
        (64, 64, dict(prompt="a cat", cfg_scale=0.0, steps=3, seed=11)),
        (64, 64, dict(prompt="a dog", cfg_scale=1.0, steps=6, seed=12)),
        (64, 64, dict(prompt="a bird", negative_prompt="ugly", cfg_scale=5.0, steps=4, seed=13)),
        (128, 64, dict(prompt="a tree", cfg_scale=7.5, steps=5, seed=14)),
        (128, 64, dict(prompt="a house", cfg_scale=0.5, steps=2, seed=15)),
        (128, 64, dict(prompt="", cfg_scale=1.0, steps=7, seed=16, clip_skip=1)),
    ]
    return [request(f"b{i}", make_png(w, h, seed=i), **kw) for i, (w, h, kw) in enumerate(specs)]


def test_burst_is_batched_and_batch_invariant(stock):
    requests = burst()
    # Each request alone, in its own engine.
    alone = {}
    for req in requests:
        solo = EngineCore.load(CONFIG)
        try:
            alone[req.request_id] = run(solo, [req])[0][req.request_id]
        finally:
            solo.shutdown()
    # All together.
    core = EngineCore.load(CONFIG)
    core.runner.unet = counter = CountingUNet(core.runner.unet)
    events = []
    core.observers.add(events.append)
    try:
        together, _ = run(core, requests)
        stats = core.snapshot()
    finally:
        core.shutdown()
    # The engine's own counters and observer events agree with the wrapped UNet.
    assert (stats.unet_calls, stats.unet_rows) == (len(counter.calls), sum(r for _, r in counter.calls))
    assert stats.succeeded == len(requests) and stats.failed == 0, stats
    assert (stats.waiting, stats.denoising, stats.decoding) == (0, 0, 0), stats
    assert stats.encoded == stats.decoded == len(requests), stats
    unet_events = [e for e in events if type(e).__name__ == "UnetCall"]
    assert [e.rows for e in unet_events] == [r for _, r in counter.calls]
    done = {e.request_id: e for e in events if type(e).__name__ == "RequestDone"}
    assert set(done) == {r.request_id for r in requests}
    assert all(e.outcome == "success" and 0 <= e.first_step <= e.denoised <= e.finished for e in done.values())
    for req in requests:
        a, b = alone[req.request_id], together[req.request_id]
        assert isinstance(a, UpscaleResult) and isinstance(b, UpscaleResult)
        assert np.abs(png_to_array(a.image) - png_to_array(b.image)).max() <= 2, req.request_id
    # Batching is real: per size group, no more UNet calls than its largest step count.
    calls = counter.calls_by_shape()
    assert calls == {(16, 16): 6, (16, 32): 7}, calls
    assert max(rows for _, rows in counter.calls) > 2
    # One request of the burst also matches the stock pipeline.
    guided = requests[2]
    theirs = stock_output(stock, guided.image, guided)
    assert np.abs(png_to_array(together[guided.request_id].image) - theirs).max() <= 2


def test_any_size_gives_exactly_twice_and_seed_reproduces(core):
    png = make_png(37, 53, seed=5)
    reqs = [
        request("a", png, seed=42, steps=2),
        request("b", png, seed=42, steps=2),
        request("c", png, seed=43, steps=2),
    ]
    results, _ = run(core, reqs)
    images = {k: png_to_array(v.image) for k, v in results.items()}
    assert images["a"].shape == (106, 74, 3)
    assert (results["a"].width, results["a"].height) == (74, 106)
    # Same seed: the same image (up to float noise of their batch positions).
    assert np.abs(images["a"] - images["b"]).max() <= 1
    assert np.abs(images["a"] - images["c"]).max() > 10


def test_alpha_is_kept_for_png(core):
    png = make_png(40, 24, seed=3, mode="RGBA")
    results, _ = run(core, [request("a", png, steps=2)])
    out = Image.open(io.BytesIO(results["a"].image))
    assert out.mode == "RGBA" and out.size == (80, 48)


def test_progress_is_reported_in_order(core):
    results, collector = run(core, [request("p", make_png(64, 64), steps=4, want_progress=True)])
    assert isinstance(results["p"], UpscaleResult)
    assert collector.progress["p"] == [1, 2, 3, 4]


def test_a_request_can_ask_only_for_the_end_of_its_denoising(core):
    """``want_denoised`` (a cluster worker's capacity signal): one Progress, at the last
    step, and none at all for a request that asks for nothing."""
    requests = [request("d", make_png(64, 64), steps=4, want_denoised=True), request("n", make_png(64, 64), steps=3)]
    results, collector = run(core, requests)
    assert all(isinstance(r, UpscaleResult) for r in results.values())
    assert collector.progress["d"] == [4]
    assert "n" not in collector.progress


def test_cancelled_request_frees_its_rows(core):
    long = request("long", make_png(64, 64), steps=60)
    short = request("short", make_png(64, 64, seed=2), steps=3)
    collector = Collector()
    submit_burst(core, [long, short])
    core.start(collector)
    collector.wait(["short"])
    core.abort(["long"])
    result = collector.wait(["long"])["long"]
    assert isinstance(result, EngineError) and result.code is ErrorCode.ABORTED
    assert core.runner.states == {}
    assert len(core.scheduler) == 0
    assert core.runner.unet.calls_by_shape()[(16, 16)] < 60
    # The engine still works afterwards.
    core.add_request(request("after", make_png(64, 64), steps=2))
    assert isinstance(collector.wait(["after"])["after"], UpscaleResult)


def test_fault_in_one_request_fails_only_it(core):
    poison_embeds, _ = core.runner.text.encode(["poison"], 0)

    def fault(sample, timestep, encoder_hidden_states, **kwargs):
        for row in encoder_hidden_states:
            if torch.equal(row, poison_embeds[0]):
                raise RuntimeError("injected fault")

    core.runner.unet.fault = fault
    requests = [request(f"ok{i}", make_png(64, 64, seed=i), steps=3, prompt=f"fine {i}") for i in range(3)]
    requests.insert(1, request("bad", make_png(64, 64, seed=9), steps=3, prompt="poison"))
    results, _ = run(core, requests)
    assert isinstance(results["bad"], EngineError) and results["bad"].code is ErrorCode.INTERNAL
    for i in range(3):
        assert isinstance(results[f"ok{i}"], UpscaleResult)


def test_bad_images_fail_alone(core):
    reqs = [
        request("garbage", b"not an image at all"),
        request("tiny", make_png(4, 4)),
        request("fine", make_png(64, 64), steps=2),
    ]
    results, collector = run(core, reqs)
    assert results["garbage"].code is ErrorCode.INVALID_IMAGE
    assert results["tiny"].code is ErrorCode.IMAGE_TOO_SMALL
    assert isinstance(results["fine"], UpscaleResult)
    assert all(len(v) == 1 for v in collector.terminal.values())


def test_queue_limit_refuses_admission():
    core = EngineCore.load(EngineConfig(model="tiny", device="cpu", dtype="fp32", max_queue=2))
    try:
        png = make_png(64, 64)
        assert core.add_request(request("1", png))
        assert core.add_request(request("2", png))
        assert not core.add_request(request("3", png))
    finally:
        core.shutdown()


def test_static_mode_runs_batches_to_completion_and_returns_their_results_together():
    config = EngineConfig(model="tiny", device="cpu", dtype="fp32", mode="static", static_batch_delay=0.0)
    core = EngineCore.load(config)
    core.runner.unet = counter = CountingUNet(core.runner.unet)
    handed_to_decode = []

    class Inbox(queue.SimpleQueue):
        def put(self, job, *args, **kwargs):
            if job and job[0] == "decode":
                handed_to_decode.append(sorted(r.request_id for r in job[1]))
            super().put(job, *args, **kwargs)

    core._vae_inbox = Inbox()
    try:
        reqs = [request(f"s{i}", make_png(64, 64, seed=i), steps=s) for i, s in enumerate([2, 5, 3])]
        results, _ = run(core, reqs)
    finally:
        core.shutdown()
    assert all(isinstance(r, UpscaleResult) for r in results.values())
    assert counter.calls_by_shape() == {(16, 16): 5}
    assert handed_to_decode == [["s0", "s1", "s2"]]  # the 2- and 3-step ones waited for the 5-step one


def test_out_of_memory_shrinks_the_batch_and_loses_nothing(core, monkeypatch):
    def fault(sample, timestep, **kwargs):
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    core.runner.unet.fault = fault
    requests = [request(f"m{i}", make_png(64, 64, seed=i), steps=2) for i in range(5)]
    results, collector = run(core, requests)
    assert all(isinstance(r, UpscaleResult) for r in results.values())
    assert all(len(v) == 1 for v in collector.terminal.values())
    assert core.scheduler.max_rows <= 2
    # Once calls that fill the shrunk budget run without running out of memory, it grows back.
    monkeypatch.setattr("engine.scheduler.GROW_AFTER", 2)
    core.runner.unet.fault = None
    submit_burst(core, [request(f"g{i}", make_png(64, 64, seed=i), steps=3) for i in range(6)])
    assert all(isinstance(r, UpscaleResult) for r in collector.wait([f"g{i}" for i in range(6)]).values())
    assert core.scheduler.max_rows > 2


def test_a_fault_in_vae_encode_or_decode_fails_only_that_request(core):
    """VAE batches run on their own thread and isolate faults like UNet batches do."""
    prepare, decode = core.runner.prepare, core.runner.decode

    def faulty_prepare(requests, inputs):
        if any(r.request_id == "bad-encode" for r in requests):
            raise RuntimeError("injected encode fault")
        return prepare(requests, inputs)

    def faulty_decode(requests):
        if any(r.request_id == "bad-decode" for r in requests):
            raise RuntimeError("injected decode fault")
        return decode(requests)

    core.runner.prepare, core.runner.decode = faulty_prepare, faulty_decode
    ids = ["ok0", "bad-encode", "ok1", "bad-decode", "ok2"]
    requests = [request(rid, make_png(64, 64, seed=i), steps=2) for i, rid in enumerate(ids)]
    results, collector = run(core, requests)
    assert results["bad-encode"].code is ErrorCode.INTERNAL
    assert results["bad-decode"].code is ErrorCode.INTERNAL
    assert all(isinstance(results[f"ok{i}"], UpscaleResult) for i in range(3))
    assert all(len(v) == 1 for v in collector.terminal.values())
    assert core.runner.states == {}
    # The VAE thread lives on.
    core.add_request(request("after", make_png(64, 64), steps=2))
    assert isinstance(collector.wait(["after"])["after"], UpscaleResult)


def test_decoding_never_holds_up_the_unet(core):
    """While a finished request's VAE decode is held, its batch-mates keep stepping."""
    release = threading.Event()
    decode = core.runner.decode

    def held_decode(requests):
        if any(r.request_id == "short" for r in requests):
            assert release.wait(60)
        return decode(requests)

    core.runner.decode = held_decode
    collector = Collector()
    submit_burst(
        core, [request("short", make_png(64, 64), steps=1), request("long", make_png(64, 64), steps=6)]
    )
    core.start(collector)
    deadline = time.monotonic() + 60
    while core.runner.unet.calls_by_shape().get((16, 16), 0) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.runner.unet.calls_by_shape()[(16, 16)] == 6  # "long" took every step meanwhile
    assert "short" not in collector.terminal
    release.set()
    results = collector.wait(["short", "long"])
    assert all(isinstance(r, UpscaleResult) for r in results.values())


def test_without_vae_overlap_a_decode_and_a_step_take_turns():
    """``vae_overlap="off"`` (the CUDA default): no UNet step runs while a decode does,
    so the two never compete for device memory."""
    from dataclasses import replace

    core = EngineCore.load(replace(CONFIG, vae_overlap="off"))
    core.runner.unet = CountingUNet(core.runner.unet)
    decode = core.runner.decode
    steps_during_decodes = []

    def slow_decode(requests):
        before = core.runner.unet.calls_by_shape().get((16, 16), 0)
        time.sleep(0.3)  # long enough for several tiny UNet steps, were they allowed
        result = decode(requests)
        steps_during_decodes.append(core.runner.unet.calls_by_shape().get((16, 16), 0) - before)
        return result

    core.runner.decode = slow_decode
    try:
        results, _ = run(
            core, [request("short", make_png(64, 64), steps=1), request("long", make_png(64, 64), steps=6)]
        )
    finally:
        core.shutdown()
    assert all(isinstance(r, UpscaleResult) for r in results.values())
    assert steps_during_decodes and set(steps_during_decodes) == {0}
    assert core.runner.states == {}


def test_a_dead_vae_thread_fails_every_request_and_is_reported(core):
    deaths = []

    def explode(*args, **kwargs):
        raise RuntimeError("injected VAE thread fault")

    core._in_chunks = explode
    collector = Collector()
    submit_burst(core, [request(f"v{i}", make_png(64, 64, seed=i), steps=2) for i in range(3)])
    core.start(collector, on_death=lambda: deaths.append(True))
    results = collector.wait([f"v{i}" for i in range(3)])
    assert all(r.code is ErrorCode.INTERNAL for r in results.values())
    assert all(len(v) == 1 for v in collector.terminal.values())
    assert deaths == [True] and not core.alive
    core.shutdown()
    assert core.runner.states == {}


def test_shutdown_says_whether_the_runner_is_free():
    """A thread that outlives the timeout keeps the runner: shutdown returns False and
    leaves the state alone (a restart then waits); once it stops, True and a clean runner."""
    core = EngineCore.load(CONFIG)
    release, decoding = threading.Event(), threading.Event()
    decode = core.runner.decode

    def held_decode(requests):
        decoding.set()
        assert release.wait(60)
        return decode(requests)

    core.runner.decode = held_decode
    collector = Collector()
    submit_burst(core, [request("held", make_png(64, 64), steps=1)])
    core.start(collector)
    assert decoding.wait(60)
    assert core.shutdown(timeout=0.2) is False
    assert "held" in core.runner.states
    release.set()
    assert core.shutdown(timeout=60) is True
    assert core.runner.states == {}
    assert collector.wait(["held"])["held"].code is ErrorCode.ABORTED
    assert collector.queue.empty()  # and nothing after it


def test_device_turns_are_handed_over_in_the_order_asked():
    """The model thread asks again as soon as it lets go; the VAE thread, which asked
    first, still goes first."""
    from engine.core import _Turns

    turns, order = _Turns(), []
    with turns:
        waiter = threading.Thread(target=lambda: [turns.__enter__(), order.append("vae"), turns.__exit__()])
        waiter.start()
        deadline = time.monotonic() + 10
        while turns._next_ticket < 2 and time.monotonic() < deadline:  # the VAE thread is waiting
            time.sleep(0.001)
    with turns:
        order.append("unet")
    waiter.join(10)
    assert order == ["vae", "unet"]
