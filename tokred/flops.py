"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode`` that also counts attention on CPU.

torch's counter has formulas for the CUDA attention kernels only; on CPU
``aten._scaled_dot_product_flash_attention_for_cpu`` would count 0. We register the same formula for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = _cpu_flash_attention_flops
    return extra


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts attention on every device."""
    return FlopCounterMode(display=display, custom_mapping=_extra_formulas())


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs (multiply-add = 2) of one call of ``fn`` with no gradients."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()
