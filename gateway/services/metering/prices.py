"""The price table: USD per million tokens for each model, by longest id prefix.

Defaults follow Anthropic's published list prices (platform.claude.com/docs/about-claude/pricing,
2026-11): input, output, 5-minute cache write (1.25 x input), 1-hour cache write (2 x input) and
cache read (0.1 x input). An operator overrides or extends them with ``CCGATE_PRICES`` (a JSON
object ``{"model-prefix": {"input": 3, "output": 15, ...}}``); a model that matches no prefix
is priced at the ``*`` entry (by default the most expensive family, so an unknown model never
looks cheap) and logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

FALLBACK = "*"


class ModelPrice(BaseModel):
    """USD per million tokens of one model family (cache prices default from ``input``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    """5-minute cache write; default 1.25 x input."""
    cache_write_1h: float | None = Field(default=None, ge=0)
    """1-hour cache write; default 2 x input."""
    cache_read: float | None = Field(default=None, ge=0)
    """Cache read; default 0.1 x input."""


def _p(inp: float, out: float) -> ModelPrice:
    return ModelPrice(input=inp, output=out)


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "claude-opus-4-5": _p(5, 25),
    "claude-opus-4-1": _p(15, 75),
    "claude-opus-4": _p(15, 75),
    "claude-sonnet-4": _p(3, 15),
    "claude-3-7-sonnet": _p(3, 15),
    "claude-haiku-4": _p(1, 5),
    "claude-3-5-haiku": _p(0.8, 4),
    "claude-3-haiku": _p(0.25, 1.25),
    FALLBACK: _p(15, 75),
}


@dataclass(frozen=True)
class Usage:
    """Token counts of one response (the Messages API ``usage`` fields)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    """Part of ``cache_creation_input_tokens`` written to the 1-hour cache."""

    def as_dict(self) -> dict[str, int]:
        """The four counters the API reports (the 1-hour split is a pricing detail)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        }


class PriceTable:
    """Prices by model id prefix (longest match wins, else ``*``)."""

    def __init__(self, overrides: dict[str, ModelPrice] | None = None) -> None:
        self._prices = DEFAULT_PRICES | (overrides or {})
        self._prefixes = sorted((k for k in self._prices if k != FALLBACK), key=len, reverse=True)
        self._warned: set[str] = set()

    def price_of(self, model: str) -> ModelPrice:
        """The price entry for ``model`` (the fallback, logged once per model, if none)."""
        for prefix in self._prefixes:
            if model.startswith(prefix):
                return self._prices[prefix]
        if model not in self._warned and len(self._warned) < 1000:
            self._warned.add(model)
            logger.warning("no price for model %r; priced at the %r entry", model, FALLBACK)
        return self._prices[FALLBACK]

    def cost(self, model: str, usage: Usage) -> float:
        """USD cost of ``usage`` on ``model``."""
        p = self.price_of(model)
        write = p.cache_write if p.cache_write is not None else p.input * 1.25
        write_1h = p.cache_write_1h if p.cache_write_1h is not None else p.input * 2
        read = p.cache_read if p.cache_read is not None else p.input * 0.1
        hour = min(usage.cache_creation_1h_tokens, usage.cache_creation_input_tokens)
        five = usage.cache_creation_input_tokens - hour
        micro = (
            usage.input_tokens * p.input
            + usage.output_tokens * p.output
            + five * write
            + hour * write_1h
            + usage.cache_read_input_tokens * read
        )
        return micro / 1_000_000

    def estimate(self, model: str, *, input_tokens: int, output_tokens: int) -> float:
        """USD a request may cost before it runs (input uncached, output at its cap)."""
        p = self.price_of(model)
        return (input_tokens * p.input + output_tokens * p.output) / 1_000_000
