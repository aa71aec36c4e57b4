"""The per-row math of the 2x latent upscaler, stateless, in the order it happens.

This is ``StableDiffusionLatentUpscalePipeline.__call__`` (diffusers) taken apart so
that every quantity is per row: rows of one UNet call may belong to different
requests, at different steps of different schedules (MODEL.md, "What can share one
UNet call"). Nothing here keeps a scheduler's ``_step_index``; each request carries its
own σ table and step index, and the Euler update takes per-row σ.

Numbering follows MODEL.md, "One request, step by step".
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "GuidanceMode",
    "SigmaSchedule",
    "apply_guidance",
    "denoised",
    "euler_step",
    "guidance_mode",
    "image_condition",
    "scale_input",
    "sigma_schedule",
    "timestep_condition",
    "unet_timestep",
]

_SCHEDULER_CONFIG = Path(__file__).parent / "configs" / "scheduler.json"


# 1. Text: the guidance mode decides which prompts are encoded, and how many rows.


@dataclass(frozen=True, slots=True)
class GuidanceMode:
    """Which prompts a request encodes, one UNet row each, in the pipeline's order."""

    prompts: tuple[str, ...]
    scale: float

    @property
    def rows(self) -> int:
        return len(self.prompts)

    @property
    def guided(self) -> bool:
        return self.rows == 2


def guidance_mode(prompt: str, negative_prompt: str, cfg_scale: float) -> GuidanceMode:
    """g == 0: the prompt is replaced by ""; 0 < g ≤ 1: one row with the prompt;
    g > 1: two rows ``[negative or "", prompt]`` and classifier-free guidance."""
    if cfg_scale == 0:
        return GuidanceMode(("",), cfg_scale)
    if cfg_scale <= 1:
        return GuidanceMode((prompt,), cfg_scale)
    return GuidanceMode((negative_prompt or "", prompt), cfg_scale)


# 3. Conditioning on the low-resolution latent and the pooled text embedding.


def image_condition(latent: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsample of the image latent. The noise level is fixed at 0, so the
    pipeline's ``inv_noise_level`` factor is exactly 1."""
    return F.interpolate(latent, scale_factor=2, mode="nearest")


def timestep_condition(pooled: torch.Tensor) -> torch.Tensor:
    """``cat(ones(64), zeros(64), pooled)`` per row: the noise-level embedding (level 0)
    followed by the pooled text embedding."""
    rows = pooled.shape[0]
    ones = torch.ones(rows, 64, dtype=pooled.dtype, device=pooled.device)
    zeros = torch.zeros(rows, 64, dtype=pooled.dtype, device=pooled.device)
    return torch.cat([ones, zeros, pooled], dim=1)


# 4. The σ table of a request: what ``EulerDiscreteScheduler.set_timesteps(n)`` gives.


@dataclass(frozen=True, slots=True)
class SigmaSchedule:
    """σ for steps 0..n (n+1 values; the loop runs n steps and ends at ``sigmas[n]``)."""

    sigmas: torch.Tensor  # fp32, CPU
    init_noise_sigma: float

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1


@functools.lru_cache(maxsize=256)
def sigma_schedule(steps: int, scheduler_config: str | None = None) -> SigmaSchedule:
    """σ table for ``steps`` denoising steps, computed by the real scheduler class from
    the model's scheduler config (a JSON string; default: the reference config)."""
    from diffusers import EulerDiscreteScheduler

    config = json.loads(scheduler_config) if scheduler_config else json.loads(_SCHEDULER_CONFIG.read_text())
    scheduler = EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps, device="cpu")
    sigmas = scheduler.sigmas[: steps + 1].to(torch.float32).clone()
    return SigmaSchedule(sigmas=sigmas, init_noise_sigma=float(scheduler.init_noise_sigma))


# 5. One denoising step, per row.


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c_in · x with c_in = 1/sqrt(σ²+1) (``scale_model_input``); σ has shape (rows,)."""
    return x / ((_col(sigma) ** 2 + 1) ** 0.5)


def unet_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep input: log(σ)/4 (Karras et al. 2022, table 1)."""
    return torch.log(sigma) * 0.25


def denoised(x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x/(σ²+1) + σ/sqrt(σ²+1) · F — the pipeline's preconditioning (Karras table 1).

    ``model_output`` is the UNet's first four channels (the fifth, a variance, is unused).
    """
    s = _col(sigma)
    return (1 / (s**2 + 1)) * x + (s / ((s**2 + 1) ** 0.5)) * model_output


def apply_guidance(x0: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a request's two rows ``[uncond, cond]``."""
    uncond, cond = x0.chunk(2)
    return uncond + scale * (cond - uncond)


def euler_step(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """x ← x + (x − x0)/σ · (σ_next − σ), in fp32 (``EulerDiscreteScheduler.step`` with
    ``prediction_type="original_sample"`` and no churn)."""
    s, s_next = _col(sigma), _col(sigma_next)
    x = x.to(torch.float32)
    derivative = (x - x0.to(torch.float32)) / s
    return x + derivative * (s_next - s)


def _col(v: torch.Tensor) -> torch.Tensor:
    """A (rows,) tensor as (rows, 1, 1, 1), to broadcast over latents."""
    return v.reshape(-1, 1, 1, 1)
