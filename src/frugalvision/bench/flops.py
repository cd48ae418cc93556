"""FLOP formulas for the fused CPU kernels that ``torch.utils.flop_counter`` does not know.

Without them, FLOP counts on CPU silently drop every fused attention (the CPU flash-attention kernel) and every
oneDNN fused linear/conv (bias + activation or residual add in the GEMM epilogue) that inference paths use.
:func:`register_fused_cpu_flops` runs when :mod:`frugalvision.bench` is imported, so any ``FlopCounterMode``
sees them from then on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import flop_counter as fc

__all__ = ["register_fused_cpu_flops"]


def register_fused_cpu_flops() -> None:
    """Register the formulas once (idempotent; a no-op for ops this torch build lacks).

    Example:
        >>> register_fused_cpu_flops()
        >>> torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry
        True
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in fc.flop_registry:

        @fc.register_flop_formula(op)
        def _sdpa(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    mk = getattr(torch.ops, "mkldnn", None)
    if mk is None or not hasattr(mk, "_linear_pointwise") or not hasattr(mk, "_convolution_pointwise"):
        return
    if mk._linear_pointwise not in fc.flop_registry:

        @fc.register_flop_formula(mk._linear_pointwise)
        def _lin(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            x_shape, w_shape = (args[0], args[2]) if len(args) == 5 else (args[0], args[1])  # .binary has `other`
            return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]

    if mk._convolution_pointwise not in fc.flop_registry:

        @fc.register_flop_formula(mk._convolution_pointwise)
        def _conv(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            x_shape, w_shape = (args[0], args[2]) if len(args) == 13 else (args[0], args[1])
            return fc.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)
