"""Model loading: the tiny model is built offline, deterministically, and loaded through
the real ``from_pretrained`` path; hub failures say what to do instead."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.loader import (
    ModelLoadError,
    cache_root,
    choose_device,
    choose_dtype,
    ensure_builtin_model,
    load_pipeline,
)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_tiny_is_deterministic_and_loads_from_a_folder(tmp_path):
    first = ensure_builtin_model("tiny", str(tmp_path / "a"))
    second = ensure_builtin_model("tiny", str(tmp_path / "b"))
    assert (first / "model_index.json").exists() and (first / "tokenizer" / "tokenizer_config.json").exists()
    a = load_pipeline(EngineConfig(model=str(first), device="cpu"))
    b = load_pipeline(EngineConfig(model=str(second), device="cpu"))
    for part in ("unet", "vae", "text_encoder"):
        assert digest(getattr(a.pipeline, part)) == digest(getattr(b.pipeline, part)), part
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    ids = a.pipeline.tokenizer("the cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == a.pipeline.tokenizer.bos_token_id


def test_builtin_name_uses_the_cache(tmp_path):
    loaded = load_pipeline(EngineConfig(model="tiny", device="cpu", cache_dir=str(tmp_path)))
    assert loaded.path == str(tmp_path / "tiny-v1")


def test_unreachable_hub_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(EngineConfig(model="stabilityai/sd-x2-latent-upscaler", device="cpu"))
    message = str(err.value)
    assert "--model tiny" in message and "local" in message
    assert time.perf_counter() - start < 60


def test_unknown_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(EngineConfig(model="nobody-here/no-such-upscaler", device="cpu"))
    message = str(err.value)
    assert "hub could not be reached" in message and "not found" in message
    assert "--model tiny" in message and "--model /path/to/local/folder" in message
    assert time.perf_counter() - start < 60


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_pipeline(EngineConfig(model=os.fspath(tmp_path / "nope"), device="cpu"))
    assert "--model tiny" in str(err.value)


def test_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load the model folder"):
        load_pipeline(EngineConfig(model=os.fspath(tmp_path), device="cpu"))


def test_concurrent_builds_agree(tmp_path):
    """Threads building into one cache: one rename wins, the weights are the usual ones."""
    folders: list = []
    threads = [
        threading.Thread(
            target=lambda: folders.append(ensure_builtin_model("tiny", str(tmp_path / "shared")))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 1 and len(folders) == 3
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["tiny-v1"]  # no staging left
    shared = load_pipeline(EngineConfig(model=str(folders[0]), device="cpu")).pipeline
    alone = load_pipeline(
        EngineConfig(model="tiny", device="cpu", cache_dir=str(tmp_path / "alone"))
    ).pipeline
    assert digest(shared.unet) == digest(alone.unet)


def test_tiny_tokenizer_and_text_encoder_agree_on_eos(tmp_path):
    pipe = load_pipeline(EngineConfig(model="tiny", device="cpu", cache_dir=str(tmp_path))).pipeline
    tok, text = pipe.tokenizer, pipe.text_encoder
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)  # highest ids
    assert (text.config.bos_token_id, text.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    ids = tok(
        ["the cat", "a photograph of an astronaut riding a horse"],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (2, 77)
    assert len(tok("the cat").input_ids) < len("the cat") + 2  # merges make words fewer pieces
    with torch.inference_mode():
        out = text(ids, output_hidden_states=True)
        final = text.final_layer_norm(out.hidden_states[-1])
    first_eos = (ids == tok.eos_token_id).int().argmax(-1)
    for row in range(2):
        torch.testing.assert_close(out.pooler_output[row], final[row, first_eos[row]])


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_UPSCALER_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert cache_root("~/elsewhere") == cache_root("~/elsewhere").expanduser()
    monkeypatch.delenv("LATENT_UPSCALER_CACHE")
    assert cache_root().parts[-2:] == (".cache", "latent-upscaler")


def test_small_has_the_real_layout():
    from engine.loader import _architecture, _load_config

    unet, vae, text = _architecture("small")
    real = _load_config("unet")
    for key in (
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "time_embedding_type",
        "in_channels",
    ):
        assert unet[key] == real[key], key
    assert unet["time_cond_proj_dim"] == 128 + text["hidden_size"]
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert vae["scaling_factor"] == json.loads(json.dumps(_load_config("vae")))["scaling_factor"]


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match="unknown built-in model"):
        ensure_builtin_model("huge")


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        choose_device("gpu-please")
    if not torch.cuda.is_available():
        assert choose_device(None).type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_dtype_choice(caplog):
    assert choose_dtype(None, torch.device("cpu")) == torch.float32
    assert choose_dtype(None, torch.device("cuda")) == torch.float16
    assert choose_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert choose_dtype("fp32", torch.device("cpu")) == torch.float32
    assert not caplog.records
    assert choose_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "bf16 on the CPU is slow" in caplog.text  # many times slower than fp32 without AMX
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("fp8", torch.device("cpu"))
