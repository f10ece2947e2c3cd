"""Choosing the next token: greedy by default, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How an answer is generated."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens (the stop token is not counted)."""
    temperature: float = 0.0
    """0 is greedy (argmax); above 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: no limit)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p (1.0: no limit)."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same answer."""
    ignore_stop: bool = False
    """Keep generating past the end-of-turn token (for benchmarks and parity tests)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def with_overrides(self, **overrides) -> SamplingConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


class TokenChooser:
    """Turns logits (vocab,) into a token id, holding the seeded generator for one answer."""

    def __init__(self, cfg: SamplingConfig, device: torch.device):
        self.cfg = cfg
        self.generator = None
        if cfg.temperature > 0:
            self.generator = torch.Generator(device=device)
            if cfg.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(cfg.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        cfg = self.cfg
        if cfg.temperature == 0:
            return int(logits.argmax())
        logits = logits.float() / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p; the first always stays.
            drop = (cumulative - sorted_logits.softmax(-1)) >= cfg.top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class Answer:
    """An answer being generated: what the session needs to close the turn however generation ends."""

    ids: list[int]
    """Generated token ids, without the stop token."""
    pending: int | None = None
    """The last generated token until it is fed to the model (a stopped answer still owes it to the cache)."""
    stop_reason: str = "max_new_tokens"
    """"stop_token", "max_new_tokens", "context_full" or "cancelled"."""


def stream_answer(answer: Answer, logits: torch.Tensor, step, cfg: SamplingConfig, tokenizer, stop_ids: set[int],
                  room: int, device: torch.device) -> Iterator[str]:
    """Generate into `answer` from the first token's logits (vocab,), yielding text as it is decoded.

    step(token) feeds a token and returns the next logits. room: answer tokens the context still holds. A
    half-decoded multi-byte character is held back until it completes. Closing the iterator early leaves
    `answer.stop_reason` "cancelled"; the caller closes the turn from `answer` either way.
    """
    chooser = TokenChooser(cfg, device)
    emitted = ""
    try:
        while True:
            token = chooser(logits)
            if token in stop_ids:
                answer.stop_reason = "stop_token"
                break
            answer.ids.append(token)
            answer.pending = token
            text = tokenizer.decode(answer.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                yield text[len(emitted):]
                emitted = text
            if len(answer.ids) >= min(cfg.max_new_tokens, room):
                answer.stop_reason = "max_new_tokens" if len(answer.ids) >= cfg.max_new_tokens else "context_full"
                break
            logits = step(token)
            answer.pending = None
        final = tokenizer.decode(answer.ids, skip_special_tokens=True)
        if final != emitted:
            yield final[len(emitted):]
    except GeneratorExit:
        answer.stop_reason = "cancelled"
        raise
