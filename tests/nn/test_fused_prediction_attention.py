"""The prediction stream's fused route (nn/attention.py): one SDPA over the anchored context
equals the written-out scores + softmax, for strictly causal rows (R == Tc and R < Tc, offsets
0, 1, 2; offset 0 leaves row 0 without any context key) and for any rows through the mask, in
float32 (to its rounding) and float64; and the route's gate."""

from __future__ import annotations

import pytest
import torch
from support.tolerances import relative

from ebt.nn import attention
from ebt.nn.attention import fused_prediction_route, prediction_attention, prediction_mask

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH, HEADS, WIDTH = 2, 3, 8
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13}  # observed 6e-7 / 2e-15
CASES = [  # (rows R, context keys Tc, offset)
    (6, 6, 0),  # R == Tc, row 0 reads no context key
    (6, 6, 1),  # R == Tc (no step token)
    (6, 7, 2),  # a step token: Tc = R + 1
    (4, 9, 1),  # R < Tc
    (4, 9, 0),
]


def _problem(rows: int, keys: int, dtype: torch.dtype):
    """(rotated queries, queries, keys, values (B, H, R, hd) each; context (B, H, Tc, hd) x 2)."""
    shape = (BATCH, HEADS, rows, WIDTH)
    own = [torch.randn(shape, dtype=dtype) for _ in range(4)]
    context = tuple(torch.randn(BATCH, HEADS, keys, WIDTH, dtype=dtype) for _ in range(2))
    return own, context


def _both_routes(own, context, mask, causal_offset, monkeypatch):
    """(written-out, fused) attention (B, H, R, hd), the fused one asserted to have run."""
    calls = []
    original = attention.anchored_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "anchored_attention", counted)
    results = []
    for setting in ("off", "any"):
        monkeypatch.setattr(attention, "FUSED_PREDICTION_ATTENTION", setting)
        with torch.no_grad():
            results.append(prediction_attention(*own, context, mask, causal_offset))
    assert calls == [1]
    return results


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("rows", "keys", "offset"), CASES)
def test_fused_route_equals_the_written_out_attention(
    rows, keys, offset, dtype, causal, monkeypatch
):
    torch.manual_seed(rows * 100 + keys * 10 + offset)
    own, context = _problem(rows, keys, dtype)
    mask = prediction_mask(torch.arange(rows), keys, offset, dtype)  # (R, Tc)
    written, fused = _both_routes(own, context, mask, offset if causal else None, monkeypatch)
    assert fused.dtype == dtype and fused.shape == written.shape
    assert relative(fused, written) < TOLERANCE[dtype]
    if offset == 0:  # row 0 reads only its own key: its own value exactly (weight 1)
        torch.testing.assert_close(fused[:, :, 0], own[3][:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_route_follows_any_mask(dtype, monkeypatch):
    """Rows in any order (generation's newest row, a subset) go through the mask's pattern."""
    torch.manual_seed(3)
    own, context = _problem(3, 9, dtype)
    mask = prediction_mask(torch.tensor([7, 0, 4]), 9, 1, dtype)  # (R, Tc)
    written, fused = _both_routes(own, context, mask, None, monkeypatch)
    assert relative(fused, written) < TOLERANCE[dtype]


def test_the_fused_route_is_taken_only_where_nothing_is_differentiated(monkeypatch):
    """Default: on CUDA only; "any" forces it on CPU (tests); never with grad enabled (the fused
    kernels have no double backward); "off" never."""
    x = torch.zeros(1)
    assert attention.FUSED_PREDICTION_ATTENTION == "cuda"
    with torch.no_grad():
        assert not fused_prediction_route(x)  # a CPU tensor
    for setting, expected in (("any", True), ("off", False)):
        monkeypatch.setattr(attention, "FUSED_PREDICTION_ATTENTION", setting)
        with torch.no_grad():
            assert fused_prediction_route(x) == expected
        with torch.inference_mode():
            assert fused_prediction_route(x) == expected
        assert not fused_prediction_route(x)  # grad enabled
