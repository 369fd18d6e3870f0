"""Pricing and usage read off upstream responses (pure logic of the model proxy)."""

from __future__ import annotations

import json

import pytest

from gateway.services.metering.budgets import add_usage
from gateway.services.metering.prices import ModelPrice, PriceTable, Usage
from gateway.services.metering.usage import StreamMeter, message_usage


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


STREAM = b"".join(
    [
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "model": "claude-sonnet-4-5-20250929",
                    "usage": {
                        "input_tokens": 1200,
                        "cache_creation_input_tokens": 300,
                        "cache_read_input_tokens": 5000,
                        "output_tokens": 1,
                        "cache_creation": {"ephemeral_1h_input_tokens": 100},
                    },
                },
            },
        ),
        _sse("ping", {"type": "ping"}),
        _sse(
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
        ),
        _sse(
            "message_delta",
            {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 420}},
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]
)


def test_longest_prefix_wins_and_unknown_models_get_the_fallback() -> None:
    table = PriceTable({"claude-sonnet-4-5": ModelPrice(input=2, output=10)})
    assert table.price_of("claude-sonnet-4-5-20250929").input == 2
    assert table.price_of("claude-sonnet-4-20250514").input == 3
    assert table.price_of("claude-haiku-4-5").output == 5
    assert table.price_of("someone-elses-model").output == 75


def test_cost_prices_every_counter_with_the_cache_defaults() -> None:
    table = PriceTable()
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_read_input_tokens=1_000_000,
        cache_creation_1h_tokens=400_000,
    )
    # sonnet: 3 in + 15 out + 0.6 M x 3.75 (5 min write) + 0.4 M x 6 (1 h write) + 0.3 read
    assert table.cost("claude-sonnet-4-5", usage) == pytest.approx(3 + 15 + 2.25 + 2.4 + 0.3)
    assert table.cost("claude-sonnet-4-5", Usage()) == 0


def test_the_meter_reads_usage_from_any_chunking_of_a_stream() -> None:
    for size in (1, 7, 64, len(STREAM)):
        meter = StreamMeter()
        for i in range(0, len(STREAM), size):
            meter.feed(STREAM[i : i + size])
        assert meter.stopped and meter.finished
        assert meter.model == "claude-sonnet-4-5-20250929"
        assert meter.usage() == Usage(
            input_tokens=1200,
            output_tokens=420,
            cache_creation_input_tokens=300,
            cache_read_input_tokens=5000,
            cache_creation_1h_tokens=100,
        )


def test_a_cut_stream_estimates_output_from_the_bytes_seen() -> None:
    cut = STREAM[: STREAM.index(b"event: message_delta")]
    meter = StreamMeter()
    meter.feed(cut)
    assert not meter.finished and not meter.stopped
    usage = meter.usage()
    assert usage.input_tokens == 1200
    assert usage.output_tokens == len(cut) // 4


def test_the_meter_bounds_its_buffer_and_ignores_garbage() -> None:
    meter = StreamMeter(max_event_bytes=1024)
    meter.feed(b"data: " + b"x" * 5000)
    meter.feed(b"\n\n" + _sse("message_delta", {"type": "message_delta", "usage": []}))
    meter.feed(b"event: message_start\ndata: {not json\n\n")
    meter.feed(_sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": -5}}))
    assert meter.usage().output_tokens == 0
    assert meter.finished


def test_message_usage_of_a_json_message() -> None:
    body = json.dumps(
        {"model": "claude-haiku-4-5", "usage": {"input_tokens": 10, "output_tokens": 3}}
    ).encode()
    assert message_usage(body) == (Usage(input_tokens=10, output_tokens=3), "claude-haiku-4-5")
    assert message_usage(b"not json") == (Usage(), None)
    assert message_usage(b"[1]") == (Usage(), None)


def test_usage_is_summed_per_counter() -> None:
    total = add_usage({"input_tokens": 10, "service_tier": "standard"}, Usage(input_tokens=5))
    total = add_usage(total, Usage(cache_read_input_tokens=7, output_tokens=2))
    assert total == {
        "input_tokens": 15,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 7,
    }
