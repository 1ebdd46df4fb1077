"""Session-wide test set-up.

Without CUDA the Triton kernels run through Triton's interpreter; the variable must be
set before any kernel module is imported, which is why it lives in the root conftest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
