"""Choosing the next token: repetition penalty, temperature, top-k, top-p, then greedy or seeded sampling.

Every function takes and returns float32 logits of shape (B, V) so each step can be tested on mock logits.
Filters set excluded tokens to -inf; softmax turns those into exact zeros, so `torch.multinomial` can never
pick a token outside the support (the tests check exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued. Defaults mirror the `[generate]` recipe section."""

    max_new_tokens: int = 200
    min_new_tokens: int = 0
    temperature: float = 0.8   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_window: int = 0       # 0 = the whole context counts
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 1234

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_recipe(cls, gen_config) -> SamplingParams:
        """Build from a recipe's `[generate]` section (any object with the same attribute names)."""
        values = {f.name: getattr(gen_config, f.name) for f in fields(cls) if hasattr(gen_config, f.name)}
        values["stop"] = tuple(values.get("stop", ()))
        return cls(**values)

    def with_overrides(self, **overrides) -> SamplingParams:
        """A copy with the given (non-None) values replaced; `greedy=True` means temperature 0."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides.pop("greedy", False):
            overrides["temperature"] = 0.0
        if "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        return replace(self, **overrides)


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """Discourage tokens already present in `context` (B, T): positive logits are divided by the penalty,
    negative ones multiplied, so a seen token always becomes less likely whatever the sign of its logit
    (the CTRL / Hugging Face form). Each token counts once, however often it occurs."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row; among logits tied with the k-th largest the lowest ids are
    kept (torch.topk alone picks arbitrary ones among ties)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    above, tied = logits > kth, logits == kth
    room = k - above.sum(dim=-1, keepdim=True)  # tied places left after the strictly larger logits
    keep = above | (tied & (tied.cumsum(dim=-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token is dropped when the mass of the tokens ranked above it already reaches p; the most likely
    token is therefore always kept, even when it alone exceeds p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, context: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """All filters in the usual order (penalty before temperature, so the penalty does not depend on it)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        if params.repetition_window > 0:
            context = context[:, -params.repetition_window:]
        logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def choose_next(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax when greedy, else a draw from the softmax."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(-1)


def make_rng(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator, so sampling is reproducible and independent of the global torch seed."""
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    return rng
