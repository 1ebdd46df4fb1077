"""Session-wide test set-up.

Without CUDA the Triton kernels run through Triton's interpreter; the variable must be
set before any kernel module is imported, which is why it lives in the root conftest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a busy 2-core machine are far faster without intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
