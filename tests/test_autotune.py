"""autotune.fastest: the fastest candidate per key, timed once; defaults where nothing may be timed."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones.ops import autotune


@pytest.fixture
def clock(monkeypatch):
    """A fake ``_seconds``: each candidate returns its name; ``clock.times[name]`` is the time it takes."""
    monkeypatch.setattr(autotune, "_PICKS", {})
    monkeypatch.delenv("ARENA_AUTOTUNE", raising=False)

    class Clock:
        times: dict[str, list[float]] = {}
        calls: list[str] = []

    def seconds(fn):
        name = fn()
        Clock.calls.append(name)
        times = Clock.times[name]
        return times[min(Clock.calls.count(name), len(times)) - 1]

    monkeypatch.setattr(autotune, "_seconds", seconds)
    return Clock


def runs(*names: str) -> dict:
    return {n: (lambda n=n: n) for n in names}


def test_picks_the_best_time_and_keeps_it(clock) -> None:
    clock.times = {"a": [1.0, 3.0, 3.0, 3.0], "b": [2.0, 1.5, 1.5, 2.5]}  # a's first call is not its best
    assert autotune.fastest("k", runs("a", "b"), default="a") == "a"
    # the first round, then rounds in alternating order (no candidate always runs after the other)
    rounds = [["b", "a"] if i % 2 == 0 else ["a", "b"] for i in range(autotune.ROUNDS)]
    assert clock.calls == ["a", "b"] + sum(rounds, [])
    clock.times = {"a": [9.0], "b": [1.0]}
    assert autotune.fastest("k", runs("a", "b"), default="a") == "a"  # kept: not timed again
    assert len(clock.calls) == 2 * (1 + autotune.ROUNDS)
    assert autotune.fastest("other key", runs("a", "b"), default="a") == "b"


def test_a_clearly_slower_candidate_is_timed_once(clock) -> None:
    clock.times = {"slow": [autotune.CLEAR_MARGIN * 1.01], "fast": [1.0]}
    assert autotune.fastest("k", runs("slow", "fast"), default="slow") == "fast"
    assert clock.calls == ["slow", "fast"]


def test_keys_are_per_thread_count(clock, set_threads) -> None:
    clock.times = {"a": [1.0], "b": [2.0]}
    autotune.fastest("k", runs("a", "b"), default="b")
    set_threads(2 if torch.get_num_threads() != 2 else 1)
    autotune.fastest("k", runs("a", "b"), default="b")
    assert len(clock.calls) == 4 * (1 + autotune.ROUNDS)


def test_defaults_where_nothing_is_timed(clock, monkeypatch) -> None:
    clock.times = {"a": [1.0], "b": [2.0]}
    with FlopCounterMode(display=False):  # a dispatch mode: timing would be counted as FLOPs
        assert autotune.fastest("k", runs("a", "b"), default="b") == "b"
    monkeypatch.setenv("ARENA_AUTOTUNE", "0")
    assert autotune.fastest("k", runs("a", "b"), default="b") == "b"
    monkeypatch.setenv("ARENA_AUTOTUNE", "1")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # Lightning's deterministic=True
    try:
        assert autotune.fastest("k", runs("a", "b"), default="b") == "b"
    finally:
        torch.use_deterministic_algorithms(before)
    assert clock.calls == []
    monkeypatch.setenv("ARENA_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="ARENA_AUTOTUNE must be '1'"):
        autotune.fastest("k", runs("a", "b"), default="b")
    monkeypatch.setenv("ARENA_AUTOTUNE", "1")
    with pytest.raises(ValueError, match="not one of the candidates"):
        autotune.fastest("k", runs("a", "b"), default="c")


def test_bucket_rounds_sizes_up_to_powers_of_two() -> None:
    assert [autotune.bucket(n) for n in (0, 1, 2, 3, 196, 256, 257, 25088)] == [1, 1, 2, 4, 256, 256, 512, 32768]


def test_candidates_run_without_autograd(monkeypatch) -> None:
    monkeypatch.setattr(autotune, "_PICKS", {})
    w = torch.ones(3, requires_grad=True)
    seen = []
    autotune.fastest("grad", {"x": lambda: seen.append((w * 2).requires_grad)}, default="x")
    assert seen and not any(seen)


@pytest.mark.parametrize("pick", ["direct", "transposed"])
def test_matmul_is_the_product_either_way_round(monkeypatch, pick: str) -> None:
    monkeypatch.setattr(autotune, "fastest", lambda key, runs, default: pick)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 44, generator=g), torch.randn(44, 12, generator=g)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):  # row- and column-major inputs
        out = autotune.matmul(x, y)
        assert out.is_contiguous() and out.shape == (300, 12)
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
