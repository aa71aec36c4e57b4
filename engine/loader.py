"""Loading the model: always through ``StableDiffusionLatentUpscalePipeline.from_pretrained``.

Use :func:`load_pipeline` with an :class:`~engine.config.EngineConfig`; it returns a
:class:`LoadedModel` (the pipeline on its device, in eval mode, plus where it came from).
``config.model`` names what to load:

- a hub id (default ``stabilityai/sd-x2-latent-upscaler``, pinned to a revision that
  ships safetensors), or a local folder (a ``save_pretrained`` folder or hub snapshot);
- ``tiny``: a tiny model built offline and deterministically (components as in
  diffusers' own fast tests, the real scheduler config, an offline CLIP BPE tokenizer),
  for tests and smoke runs;
- ``small``: the real architecture with narrower channels and random weights, where
  compute dominates as it does for the real model (CPU benchmarks);
- ``full-random``: the real architecture at full size with random weights (GPU
  benchmarks without hub access; 1.4 GB on disk).

Built-in models are written with ``save_pretrained`` to a cache folder (atomically, so
concurrent processes never see half a model) and loaded back like real weights; see
:func:`ensure_builtin_model`. Every failure to load is a :class:`ModelLoadError` whose
message says what to do instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import DEFAULT_MODEL, DEFAULT_REVISION, EngineConfig

if TYPE_CHECKING:
    from diffusers import StableDiffusionLatentUpscalePipeline

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "cache_root",
    "choose_device",
    "choose_dtype",
    "ensure_builtin_model",
    "load_pipeline",
]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "small", "full-random")
_CONFIGS = Path(__file__).parent / "configs"
# Part of each built-in model's folder name: bump one when its recipe changes, so that
# a cache built by an older recipe is never mistaken for the current one.
_BUILD_VERSIONS = {"tiny": "v1", "small": "v2", "full-random": "v1"}
# Building seeds torch's global generator, which threads share: one build at a time.
_BUILD_LOCK = threading.Lock()
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALTERNATIVES = (
    "Use a local copy instead: --model /path/to/local/folder (a folder written by save_pretrained, "
    "or a hub snapshot of stabilityai/sd-x2-latent-upscaler), "
    "or --model tiny for the small offline test model."
)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do instead."""


@dataclass
class LoadedModel:
    """What :func:`load_pipeline` returns. Read the components off ``pipeline``."""

    pipeline: StableDiffusionLatentUpscalePipeline  # on ``device``, in ``dtype``, eval, no grads
    path: str  # the folder or hub id actually loaded
    device: torch.device
    dtype: torch.dtype


def choose_device(name: str | None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``…), or CUDA when available, else CPU.

    Raises ValueError for a name torch does not know or a CUDA device that is absent.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32/fp16/bf16; by default fp16 on CUDA and fp32 elsewhere.

    Half precision on the CPU is allowed, with a warning: it is fast only on CPUs with
    native bf16 (AVX-512 BF16, AMX); elsewhere a full-size UNet step runs many times
    slower than in fp32. Anything else is a ValueError.
    """
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}")
    if name != "fp32" and device.type == "cpu":
        logger.warning(
            "%s on the CPU is slow unless the CPU has native bf16 (AVX-512 BF16, AMX)%s; "
            "prefer fp32 here and half precision on a GPU",
            name,
            " and fp16 is imprecise" if name == "fp16" else "",
        )
    return _DTYPES[name]


def load_pipeline(config: EngineConfig) -> LoadedModel:
    """Load ``config.model`` onto its device in its dtype, building a built-in one first.

    Raises ValueError for a bad device or dtype, :class:`ModelLoadError` when the model
    cannot be found, fetched or read.
    """
    from diffusers import StableDiffusionLatentUpscalePipeline
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # huggingface_hub's switch, which
        diffusers_logging.disable_progress_bar()  # diffusers' loading bar ignores (JSON logs set it)
    device = choose_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(config.cpu_threads(os.cpu_count()))
    source, kwargs = _resolve(config)
    logger.info("loading %s (%s, %s)", source, device, str(dtype).removeprefix("torch."))
    started = time.perf_counter()
    try:
        pipeline = StableDiffusionLatentUpscalePipeline.from_pretrained(
            source, **_dtype_kwarg(dtype), **kwargs
        )
    except Exception as exc:  # hub, file-system and format errors all come in many types
        raise ModelLoadError(_load_failure_message(source, kwargs, exc)) from exc
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.eval().requires_grad_(False)
    logger.info("loaded %s in %.1f s", source, time.perf_counter() - started)
    return LoadedModel(pipeline, source, device, dtype)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); older ones lack it.
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _resolve(config: EngineConfig) -> tuple[str, dict[str, Any]]:
    """(what to pass to ``from_pretrained``, its extra keyword arguments)."""
    if config.model in BUILTIN_MODELS:
        return str(ensure_builtin_model(config.model, config.cache_dir)), {}
    folder = Path(config.model).expanduser()
    if folder.is_dir():
        return str(folder), {}
    if _looks_like_path(config.model):
        raise ModelLoadError(f"model folder {config.model!r} does not exist. {_ALTERNATIVES}")
    revision = config.revision or (DEFAULT_REVISION if config.model == DEFAULT_MODEL else None)
    return config.model, {"revision": revision, "use_safetensors": True}


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a separator is a path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model.replace("/", "")


def _load_failure_message(source: str, kwargs: dict[str, Any], exc: Exception) -> str:
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "revision" not in kwargs:  # a local folder
        return f"could not load the model folder {source!r} ({detail}). {_ALTERNATIVES}"
    return (
        f"could not load {source!r} from the Hugging Face hub: the hub could not be reached, "
        f"or the model (revision {kwargs['revision'] or 'main'}) was not found there ({detail}). "
        f"{_ALTERNATIVES}"
    )


# Built-in models


def cache_root(cache_dir: str | None = None) -> Path:
    """Where built-in models live: ``cache_dir``, else ``$LATENT_UPSCALER_CACHE``, else
    ``~/.cache/latent-upscaler``."""
    chosen = cache_dir or os.environ.get("LATENT_UPSCALER_CACHE") or "~/.cache/latent-upscaler"
    return Path(chosen).expanduser()


def ensure_builtin_model(name: str, cache_dir: str | None = None) -> Path:
    """The folder of built-in model ``name`` (one of :data:`BUILTIN_MODELS`), building it
    first if missing. Pass the folder to ``from_pretrained`` or :func:`load_pipeline`.

    Safe to call from several processes at once: each builds into a private temporary
    folder and renames it into place; the first rename wins, the others are discarded.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTIN_MODELS)}")
    root = cache_root(cache_dir)
    folder = root / f"{name}-{_BUILD_VERSIONS[name]}"
    if (folder / "model_index.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the %s model into %s", name, folder)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build(name).save_pretrained(staging, safe_serialization=True)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built %s in %.1f s", name, time.perf_counter() - started)
    return folder


def _build(name: str) -> StableDiffusionLatentUpscalePipeline:
    """Built-in model ``name`` in memory, with the same weights on every call."""
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
    with _BUILD_LOCK:
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
    # small: the real layout (K-blocks, 4 layers per block, Fourier time embedding),
    # narrower: one UNet call on a 1×8×32×32 latent costs ≈ 100 ms of CPU time in fp32
    # (≈ 50 ms on two cores), so like the real model it is compute-bound, unlike tiny.
    unet.update(
        attention_head_dim=24,  # K-blocks read this as the size of a head: 2 and 4 heads
        block_out_channels=[48, 48, 96, 96],
        time_cond_proj_dim=128 + 128,  # 64 ones + 64 zeros + the pooled text embedding
        cross_attention_dim=128,
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
