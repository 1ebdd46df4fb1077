"""Paged-attention kernels (Triton) with their torch references (the oracle and CPU path).

Every public function validates its inputs, then dispatches: CUDA tensors run the Triton
kernel, CPU tensors the torch reference, unless ``use_triton=True`` forces the kernel
(under ``TRITON_INTERPRET=1`` on CPU). Decode is the exception on CPU: its reference
attends one sequence at a time, so CPU tensors take a batched torch path
(``decode_cpu.py``) and the reference stays the oracle. Per layer the caches are views
``pool[:, layer, 0]`` / ``pool[:, layer, 1]`` of a block-major pool
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``; kernels take strides.
"""

from .copy import RowCopy, copy_blocks, copy_blocks_ref, copy_rows
from .decode import choose_num_splits, paged_decode, paged_decode_ref
from .extend import paged_extend, paged_extend_ref
from .merge import merge_attn_states, merge_attn_states_ref
from .swap import SwapHandle, swap_blocks, swap_blocks_ref
from .write_kv import write_kv, write_kv_ref

__all__ = [
    "RowCopy",
    "SwapHandle",
    "choose_num_splits",
    "copy_blocks",
    "copy_blocks_ref",
    "copy_rows",
    "merge_attn_states",
    "merge_attn_states_ref",
    "paged_decode",
    "paged_decode_ref",
    "paged_extend",
    "paged_extend_ref",
    "swap_blocks",
    "swap_blocks_ref",
    "write_kv",
    "write_kv_ref",
]
