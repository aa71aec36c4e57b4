"""Loading the model: always through ``StableDiffusionLatentUpscalePipeline.from_pretrained``.

``config.model`` names what to load:

- a hub id (default ``stabilityai/sd-x2-latent-upscaler``, pinned to a revision that
  ships safetensors), or a local folder (a ``save_pretrained`` folder or hub snapshot);
- ``tiny``: a tiny model built offline and deterministically (components as in
  diffusers' own fast tests, the real scheduler config, an offline CLIP BPE tokenizer),
  for tests and smoke runs;
- ``small``: the real architecture with narrower channels and random weights, where
  compute dominates as it does for the real model (CPU benchmarks);
- ``full-random``: the real architecture at full size with random weights (GPU
  benchmarks without hub access).

Built-in models are written with ``save_pretrained`` to a cache folder (atomically, so
concurrent processes never see half a model) and loaded back like real weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, DEFAULT_REVISION, EngineConfig

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "choose_device",
    "choose_dtype",
    "ensure_builtin_model",
    "load_pipeline",
]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "small", "full-random")
_CONFIGS = Path(__file__).parent / "configs"
_BUILD_VERSION = "v1"  # bump when a built-in model's recipe changes
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do instead."""


@dataclass
class LoadedModel:
    pipeline: object  # StableDiffusionLatentUpscalePipeline, on its device, in eval mode
    path: str  # the folder or hub id actually loaded
    device: torch.device
    dtype: torch.dtype


def choose_device(name: str | None) -> torch.device:
    """``name``, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32/fp16/bf16; by default fp16 on CUDA and fp32 elsewhere."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        logger.warning("fp16 on the CPU is slow and imprecise; prefer fp32 or bf16")
    return _DTYPES[name]


def load_pipeline(config: EngineConfig) -> LoadedModel:
    """Load ``config.model`` onto its device in its dtype. Raises :class:`ModelLoadError`."""
    from diffusers import StableDiffusionLatentUpscalePipeline

    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    source, kwargs = _resolve(config)
    logger.info("loading %s (%s, %s)", source, device, str(dtype).removeprefix("torch."))
    started = time.perf_counter()
    try:
        pipeline = StableDiffusionLatentUpscalePipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelLoadError(_load_failure_message(source, exc)) from exc
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.eval()
    logger.info("loaded %s in %.1f s", source, time.perf_counter() - started)
    return LoadedModel(pipeline, source, device, dtype)


def _resolve(config: EngineConfig) -> tuple[str, dict]:
    if config.model in BUILTIN_MODELS:
        return str(ensure_builtin_model(config.model, config.cache_dir)), {}
    if Path(config.model).expanduser().is_dir():
        return str(Path(config.model).expanduser()), {}
    revision = config.revision or (DEFAULT_REVISION if config.model == DEFAULT_MODEL else None)
    return config.model, {"revision": revision, "use_safetensors": True}


def _load_failure_message(source: str, exc: Exception) -> str:
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 2)[-1]
    what = f"folder {source!r}" if looks_local else f"model {source!r} from the Hugging Face hub"
    return (
        f"could not load {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        "If the hub cannot be reached from this machine, use a local copy instead: "
        "--model /path/to/sd-x2-latent-upscaler (a folder written by save_pretrained or a hub snapshot), "
        "or --model tiny for the small offline test model."
    )


# Built-in models


def ensure_builtin_model(name: str, cache_dir: str | None = None) -> Path:
    """The folder of built-in model ``name``, building it there first if missing."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTIN_MODELS)}")
    root = Path(
        cache_dir or os.environ.get("LATENT_UPSCALER_CACHE") or Path.home() / ".cache" / "latent-upscaler"
    )
    folder = root / f"{name}-{_BUILD_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the %s model into %s", name, folder)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build(name).save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built %s in %.1f s", name, time.perf_counter() - started)
    return folder


def _build(name: str):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _offline_tokenizer(Path(tmp))
    unet_cfg, vae_cfg, text_cfg = _architecture(name)
    text_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(tokenizer))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = EulerDiscreteScheduler.from_config(_load_config("scheduler"))
    return StableDiffusionLatentUpscalePipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
    )


def _load_config(part: str) -> dict:
    config = json.loads((_CONFIGS / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def _architecture(name: str) -> tuple[dict, dict, dict]:
    """(unet, vae, text encoder) keyword arguments for a built-in model."""
    unet, vae, text = _load_config("unet"), _load_config("vae"), _load_config("text_encoder")
    text.pop("model_type", None)
    if name == "full-random":
        return unet, vae, text
    if name == "tiny":  # diffusers' fast-test components for this pipeline
        unet.update(
            attention_head_dim=8,
            block_out_channels=[32, 32, 64, 64],
            time_cond_proj_dim=160,
            cross_attention_dim=32,
            layers_per_block=2,
        )
        vae.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32)
        text.update(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            projection_dim=512,
        )
        text["vocab_size"] = 1000
        text["max_position_embeddings"] = 77
        return unet, vae, text
    # small: the real layout, narrower. Compute-bound on a CPU like the real model.
    unet.update(
        attention_head_dim=32,
        block_out_channels=[96, 96, 192, 192],
        time_cond_proj_dim=128 + 128,
        cross_attention_dim=128,
        layers_per_block=2,
    )
    vae.update(block_out_channels=[32, 64, 128, 128], norm_num_groups=32)
    text.update(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, projection_dim=128
    )
    text["vocab_size"] = 1000
    return unet, vae, text


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


# A deterministic handful of merges, so that English words become a few tokens.
_MERGES = [
    "t h", "h e", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "o r", "th e</w>", "in g</w>",
    "o f</w>", "an d</w>", "t o</w>", "e s</w>", "e d</w>", "a r", "o u", "a t</w>",
]  # fmt: skip


def _offline_tokenizer(folder: Path):
    """A CLIP byte-level BPE tokenizer written from scratch: every byte (also with the
    end-of-word mark ``</w>``), the merges above, and the special tokens at the top."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in _MERGES)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
