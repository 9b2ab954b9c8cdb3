"""Update compression: wire format, top-k with error feedback, int8, byte accounting."""

from __future__ import annotations

import pytest
import torch

from fedrecon.efficient import (
    RESIDUAL_KEY,
    CompressionConfig,
    UpdateCompressor,
    compress_tensor,
    decompress_tensor,
)
from fedrecon.efficient.wire import decode, encode
from fedrecon.federated import FedAvg, MemoryStore, SiteUpdate


def _updates(start: dict[str, torch.Tensor], n: int = 3, seed: int = 0) -> list[SiteUpdate]:
    g = torch.Generator().manual_seed(seed)
    def move(v: torch.Tensor) -> torch.Tensor:
        return v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1

    return [SiteUpdate(f"s{i}", 0, {k: move(v) for k, v in start.items()}, "weights", 2 + i)
            for i in range(n)]


START = {"a": torch.zeros(40, 5), "b": torch.zeros(7), "steps": torch.tensor(3)}


@pytest.mark.parametrize("method", ["none", "topk", "int8", "topk_int8"])
def test_wire_round_trip(method: str) -> None:
    t = torch.randn(9, 4)
    e = compress_tensor(t, method, 0.25)
    from fedrecon.efficient.wire import Message

    blob = encode(Message({"site": "x"}, {"t": e}))
    back = decode(blob)
    assert back.header == {"site": "x"}
    out = decompress_tensor(back.tensors["t"])
    assert out.shape == t.shape and out.dtype == t.dtype
    if method == "none":
        torch.testing.assert_close(out, t)
    elif method == "int8":
        assert (out - t).abs().max() <= t.abs().max() / 127 * 0.5 + 1e-6
    else:
        assert torch.count_nonzero(out) == 9  # ceil(0.25 * 36)
        kept = out != 0
        assert t.abs()[~kept].max() <= t.abs()[kept].min()


def test_compressed_aggregate_converges_to_uncompressed_as_k_grows() -> None:
    updates = _updates(START)
    exact = FedAvg()
    exact.initialize(START, [u.site_id for u in updates])
    ref = exact.aggregate(0, updates).global_state
    errors = []
    for fraction in (0.05, 0.2, 0.5, 0.9, 1.0):
        comp = UpdateCompressor(CompressionConfig("topk", fraction, error_feedback=False))
        strat = FedAvg()
        strat.initialize(START, [u.site_id for u in updates])
        received = [comp.transmit(0, u, START)[0] for u in updates]
        got = strat.aggregate(0, received).global_state
        assert got["steps"] == ref["steps"]
        errors.append(float(sum((got[k] - ref[k]).norm() for k in ("a", "b"))))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_error_feedback_sends_everything_eventually_and_lives_in_the_store() -> None:
    """Sum of what was sent + the residual == sum of the true deltas (nothing is lost)."""
    store = MemoryStore()
    store.put("s0", {"local": {"dc": torch.ones(1)}})
    comp = UpdateCompressor({"method": "topk_int8", "fraction": 0.1})
    sent = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in START.items() if k != "steps"}
    true = {k: torch.zeros_like(v) for k, v in sent.items()}
    for r in range(5):
        u = _updates(START, 1, seed=r)[0]
        got, _ = comp.transmit(r, SiteUpdate("s0", r, u.tensors, "weights", 1), START, store)
        for k in sent:
            sent[k] += got.tensors[k]
            true[k] += u.tensors[k]
    private = store.get("s0")
    assert set(private) == {"local", RESIDUAL_KEY}  # the site's own state is kept
    for k in sent:
        torch.testing.assert_close(sent[k] + private[RESIDUAL_KEY][k], true[k], atol=1e-4, rtol=1e-4)
    assert "steps" not in private[RESIDUAL_KEY]


def test_bytes_are_the_message_length_and_shrink() -> None:
    u = _updates({"w": torch.zeros(1000)}, 1)[0]
    sizes = {}
    for method in ("none", "int8", "topk", "topk_int8"):
        seen = []
        comp = UpdateCompressor({"method": method, "fraction": 0.01},
                                on_message=lambda s, r, b: seen.append(b))
        _, n = comp.transmit(0, u, {"w": torch.zeros(1000)})
        assert n == len(seen[0])
        sizes[method] = n
    assert sizes["none"] > 4000 > sizes["int8"] > 1000 > sizes["topk"] > sizes["topk_int8"]


def test_config_from_dict_is_strict() -> None:
    assert CompressionConfig.from_dict({"method": "topk", "fraction": 1}).fraction == 1.0
    with pytest.raises(ValueError, match=r"\[compression\]: unknown key 'fracton'; did you mean 'fraction'"):
        CompressionConfig.from_dict({"fracton": 0.1})
    with pytest.raises(ValueError, match="'method' must be one of"):
        CompressionConfig.from_dict({"method": "zip"})
    with pytest.raises(ValueError, match=r"'fraction' must lie in \(0, 1\]"):
        CompressionConfig.from_dict({"fraction": 0.0})
    with pytest.raises(ValueError, match="'error_feedback' must be bool"):
        CompressionConfig.from_dict({"error_feedback": 1})
    with pytest.raises(ValueError, match="'fraction' must be float"):
        CompressionConfig.from_dict({"fraction": True})
