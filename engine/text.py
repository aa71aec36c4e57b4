"""Prompt encoding with an LRU cache of (prompt, clip_skip) → (embeds, pooled)."""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Encodes prompts as the pipeline does: tokenized to the tokenizer's max length
    (77), ``hidden_states[-1 - clip_skip]`` as the sequence embedding and
    ``pooler_output`` as the pooled one. Repeated prompts come from the cache."""

    def __init__(self, tokenizer, text_encoder, *, device: torch.device, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, prompts: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (n, 77, D), pooled (n, P)) for ``prompts``, in order."""
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for prompt in prompts:
            key = (prompt, clip_skip)
            if key in self._cache:
                self._cache.move_to_end(key)
                found[prompt] = self._cache[key]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            found.update(self._encode_uncached(missing, clip_skip))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        pairs = [found[p] for p in prompts]
        return torch.cat([e for e, _ in pairs]), torch.cat([p for _, p in pairs])

    def _encode_uncached(
        self, prompts: list[str], clip_skip: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        out = self.text_encoder(ids, output_hidden_states=True)
        embeds = out.hidden_states[-1 - clip_skip]
        fresh = {p: (embeds[i : i + 1], out.pooler_output[i : i + 1]) for i, p in enumerate(prompts)}
        for prompt, value in fresh.items():
            self._cache[(prompt, clip_skip)] = value
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return fresh
