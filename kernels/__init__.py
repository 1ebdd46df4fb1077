"""Paged-attention kernels (Triton) with their torch references (the oracle and CPU path)."""
