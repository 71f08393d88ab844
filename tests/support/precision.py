"""Which dtype each op ran in: a dispatch-mode recorder for the bf16 precision policy checks of
the written-out passes (products in bf16; softmax, norm statistics and reductions in float32)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addmv", "mv", "dot", "matmul"}
# softmax, RMSNorm / LayerNorm statistics and the reductions of the energies and the attention
# (under inference_mode the recorder sees composite ops undecomposed: softmax, not _softmax)
STATISTICS = {"_softmax", "softmax", "mean", "sum", "rsqrt", "native_layer_norm", "logsumexp"}
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class OpDtypes(TorchDispatchMode):
    """Records (op name, dtypes of its floating tensor inputs) for every op run inside (below
    autocast: the dtypes the kernels saw)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        dtypes = tuple(x.dtype for x in tensors if x.dtype in FLOATING)
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **kwargs)


def precision_violations(
    calls, low: torch.dtype, full_products: int, also_float32: frozenset = frozenset()
) -> list[str]:
    """The policy's violations among recorded calls: a product with an operand not in `low`
    (beyond `full_products` float32 ones, the energy heads), a statistic (or an op named in
    also_float32) with an operand not float32. Also fails when no product ran in `low`."""
    wrong, full, low_products = [], 0, 0
    for name, dtypes in calls:
        if name in PRODUCTS and dtypes:
            if all(dtype == low for dtype in dtypes):
                low_products += 1
            elif all(dtype == torch.float32 for dtype in dtypes):
                full += 1
            else:
                wrong.append(f"{name}{dtypes}")
        elif name in STATISTICS | also_float32 and any(dtype != torch.float32 for dtype in dtypes):
            wrong.append(f"{name}{dtypes}")
    if full != full_products:
        wrong.append(f"{full} float32 products, expected {full_products}")
    if not low_products:
        wrong.append(f"no product ran in {low}")
    return wrong


DEVICES = [  # the policy under CPU autocast, and under CUDA's (other lists) where a GPU is present
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
