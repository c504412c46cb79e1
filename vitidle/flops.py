"""MACs through torch.utils.flop_counter, with a formula for the CPU fused-attention kernel.

FlopCounterMode knows the CUDA SDPA kernels but counts CPU's flash kernel as zero (deit_small:
4.24 GMACs fused vs 4.60 unfused). Mapping it to the same formula counts attention everywhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .engine.discover import evaluating, sample_input


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


aten = torch.ops.aten
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_macs(model: nn.Module, batch_size: int = 1) -> int:
    """Multiply-accumulates (FLOPs / 2) of one eval forward on `batch_size` images of the model's input size.

    >>> import timm
    >>> count_macs(timm.create_model("deit_tiny_patch16_224", depth=1)) > 0
    True
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    x = sample_input(model, batch_size)
    with evaluating(model), torch.no_grad():
        model(x)  # fills per-model caches (the scorer's W_qᵀ W_k): a one-time cost, not a per-image one
        with counter:
            model(x)
    return counter.get_total_flops() // 2
