"""Runs the model: owns the components, the device tensors and the per-request state.

The runner decides nothing. The core tells it which requests to prepare (text and VAE
encoding), which rows ride in the next UNet call (a ``ScheduledBatch``) and which to
decode; each method is one batched model call over what it was given, and commits its
results to the per-request state only once the whole call has succeeded, so that the
core may retry any subset after a fault.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import sampler
from .request import Request
from .scheduler import ScheduledBatch
from .text import PromptEncoder

__all__ = ["ModelRunner", "PreparedInput", "RowState"]


@dataclass(slots=True)
class PreparedInput:
    """A decoded input image, padded to multiples of 32 px, ready for the VAE."""

    pixels: np.ndarray  # H×W×3 float32 in [0, 1], sides multiples of 32
    height: int  # the original size, before padding
    width: int
    alpha: object | None  # PIL alpha channel kept aside, or None


@dataclass(slots=True)
class RowState:
    """What one request needs on the device between steps."""

    x: torch.Tensor  # (1, 4, 2h, 2w) fp32: the sample being denoised
    image_cond: torch.Tensor  # (1, 4, 2h, 2w) model dtype: upsampled image latent
    embeds: torch.Tensor  # (rows, 77, D) model dtype
    timestep_cond: torch.Tensor  # (rows, 128 + P) model dtype
    sigmas: torch.Tensor  # (steps + 1,) fp32 on the device
    guidance: sampler.GuidanceMode
    prepared: PreparedInput


class ModelRunner:
    def __init__(self, pipeline, *, device: torch.device, dtype: torch.dtype, text_cache_size: int = 256):
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.device = device
        self.dtype = dtype
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.text = PromptEncoder(
            pipeline.tokenizer, pipeline.text_encoder, device=device, capacity=text_cache_size
        )
        self._scheduler_config = _config_json(pipeline.scheduler.config)
        self.states: dict[str, RowState] = {}

    # Steps 1–4 of MODEL.md: text, image latent, conditioning, σ table and initial noise.

    @torch.inference_mode()
    def prepare(self, requests: list[Request], inputs: list[PreparedInput]) -> None:
        """Encode prompts and images of same-size ``requests`` in batched calls and
        create their state. Draws from each request's own generator in the pipeline's
        order: the VAE posterior sample first, then the initial noise."""
        modes = [
            sampler.guidance_mode(r.api.prompt, r.api.negative_prompt, r.api.cfg_scale) for r in requests
        ]
        texts = [self._encode_text(r, m) for r, m in zip(requests, modes)]
        pixels = torch.from_numpy(np.stack([p.pixels for p in inputs])).permute(0, 3, 1, 2)
        pixels = (2.0 * pixels - 1.0).to(self.device, self.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        new_states = {}
        for i, (request, mode, (embeds, pooled)) in enumerate(zip(requests, modes, texts)):
            generator = torch.Generator("cpu").manual_seed(request.api.seed)
            mean, std = posterior.mean[i : i + 1], posterior.std[i : i + 1]
            latent = (mean + std * self._randn(mean.shape, generator)) * self.scaling_factor
            schedule = sampler.sigma_schedule(request.api.steps, self._scheduler_config)
            h, w = latent.shape[2:]
            noise = self._randn((1, latent.shape[1], 2 * h, 2 * w), generator)
            new_states[request.request_id] = RowState(
                x=noise.to(torch.float32) * schedule.init_noise_sigma,
                image_cond=sampler.image_condition(latent).to(self.dtype),
                embeds=embeds.to(self.dtype),
                timestep_cond=sampler.timestep_condition(pooled).to(self.dtype),
                sigmas=schedule.sigmas.to(self.device),
                guidance=mode,
                prepared=inputs[i],
            )
            request.rows = mode.rows
        self.states.update(new_states)

    def _encode_text(self, request: Request, mode: sampler.GuidanceMode) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.encode(list(mode.prompts), request.api.clip_skip)

    def _randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Noise drawn on the CPU from the request's generator (as ``randn_tensor`` does
        for a CPU generator), in the model dtype, then moved to the device."""
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    # Step 5: one UNet call over the batch's rows, then each request's own update.

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> None:
        """Advance every request of ``batch`` by one denoising step (one UNet call)."""
        states = [self.states[r.request_id] for r in batch.requests]
        rows = [s.guidance.rows for s in states]
        sigma = torch.cat([s.sigmas[r.step_index].expand(n) for s, r, n in zip(states, batch.requests, rows)])
        x = torch.cat([s.x.expand(n, -1, -1, -1) for s, n in zip(states, rows)])
        model_input = torch.cat(
            [
                sampler.scale_input(x, sigma).to(self.dtype),
                torch.cat([s.image_cond.expand(n, -1, -1, -1) for s, n in zip(states, rows)]),
            ],
            dim=1,
        )
        output = self.unet(
            model_input,
            sampler.unet_timestep(sigma),
            encoder_hidden_states=torch.cat([s.embeds for s in states]),
            timestep_cond=torch.cat([s.timestep_cond for s in states]),
        ).sample[:, :4]
        x0 = sampler.denoised(x, output.to(torch.float32), sigma)
        updated = []
        start = 0
        for state, request, n in zip(states, batch.requests, rows):
            row_x0 = x0[start : start + n]
            if state.guidance.guided:
                row_x0 = sampler.apply_guidance(row_x0, state.guidance.scale)
            i = request.step_index
            updated.append(
                sampler.euler_step(state.x, row_x0, state.sigmas[i : i + 1], state.sigmas[i + 1 : i + 2])
            )
            start += n
        for state, new_x in zip(states, updated):  # commit only after the whole call succeeded
            state.x = new_x

    # Step 6: decode.

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> list[np.ndarray]:
        """VAE-decode same-size requests in one call; H×W×3 float arrays in [0, 1],
        cropped to exactly twice each input's original size."""
        states = [self.states[r.request_id] for r in requests]
        latents = torch.cat([s.x for s in states]).to(self.dtype) / self.scaling_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [img[: 2 * s.prepared.height, : 2 * s.prepared.width] for img, s in zip(images, states)]

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)


def _config_json(config) -> str:
    import json

    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True)


def timed(fn, *args):
    """(result, seconds) of ``fn(*args)``, synchronising the device for honest times."""
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
