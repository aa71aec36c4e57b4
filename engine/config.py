"""Engine settings: one frozen dataclass, grouped by concern, every default named."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODEL", "DEFAULT_REVISION", "VAE_OVERLAP", "EngineConfig"]

DEFAULT_MODEL = "stabilityai/sd-x2-latent-upscaler"
# The first revision of the hub repository that ships safetensors weights.
DEFAULT_REVISION = "1f2883b22f62cfb29323770ba9cfdcf601757bd3"
VAE_OVERLAP = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    # Model
    model: str = DEFAULT_MODEL  # hub id, local folder, or "tiny" / "small" / "full-random"
    revision: str | None = None  # hub revision; None means DEFAULT_REVISION for DEFAULT_MODEL
    device: str | None = None  # None: CUDA when present, else CPU
    dtype: str | None = None  # "fp32", "fp16", "bf16"; None: fp16 on CUDA, fp32 on CPU
    cache_dir: str | None = None  # where the tiny/small models are built; None: ~/.cache/latent-upscaler

    # Batching
    max_batch_rows: int = 16  # UNet rows per call (a CFG request takes two)
    # "continuous" (step-level) or "static" (a batch runs to completion; its results go out together)
    mode: str = "continuous"
    group_policy: str = "deadline"  # which shape group a call serves: "deadline" or "round-robin"
    static_batch_delay: float = 0.05  # static mode: seconds to wait for same-size requests
    vae_batch_pixels: int = 4 * 1024 * 1024  # output pixels per batched VAE decode (bounds memory)
    # Whether VAE work may run while a UNet step runs: "on", "off", or "auto" (on for a
    # CPU, where they share the cores; off for CUDA, where they would compete for device
    # memory and the GPU runs one of them at a time anyway).
    vae_overlap: str = "auto"

    # Limits
    max_queue: int = 1024  # requests admitted but not finished; beyond → rateLimitExceeded
    max_input_pixels: int = 2048 * 2048
    min_input_side: int = 8
    max_steps: int = 100

    # Caches and threads
    text_cache_size: int = 256  # (prompt, clip_skip) encodings kept
    codec_threads: int = 2
    # torch intra-op threads on the CPU, for each of the two threads that run the model
    # (UNet steps and VAE decodes overlap). None: half the cores, so that together they
    # fill the machine without oversubscribing it (OpenMP threads that lose their core
    # spin at barriers, which costs far more than it gains).
    torch_threads: int | None = None

    def overlaps_vae(self, device_type: str) -> bool:
        """Whether VAE calls may overlap UNet calls on a device of ``device_type``."""
        if self.vae_overlap not in VAE_OVERLAP:
            raise ValueError(f"unknown vae_overlap {self.vae_overlap!r}: use one of {', '.join(VAE_OVERLAP)}")
        if self.vae_overlap == "auto":
            return device_type != "cuda"
        return self.vae_overlap == "on"

    def cpu_threads(self, cores: int | None) -> int:
        """torch intra-op threads on a CPU with ``cores`` cores."""
        return self.torch_threads or max(1, (cores or 2) // 2)
