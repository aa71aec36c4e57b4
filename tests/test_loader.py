"""Model loading: the tiny model is built offline, deterministically, and loaded through
the real ``from_pretrained`` path; hub failures say what to do instead."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.loader import ModelLoadError, choose_dtype, ensure_builtin_model, load_pipeline


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


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="--model tiny"):
        load_pipeline(EngineConfig(model=os.fspath(tmp_path / "nope"), device="cpu"))


def test_dtype_choice():
    assert choose_dtype(None, torch.device("cpu")) == torch.float32
    assert choose_dtype(None, torch.device("cuda")) == torch.float16
    assert choose_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("fp8", torch.device("cpu"))
