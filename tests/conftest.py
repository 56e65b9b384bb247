"""Shared by every test module. The shared references and builders are in tests/reference.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from reference import ...`, whatever the import mode

if not torch.cuda.is_available():
    # Triton's interpreter runs kernels.py's kernel on CPU tensors; Triton reads this when the kernel is
    # defined, so it is set here, before any test module imports kernels (subprocesses inherit it)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread avoids OpenMP spin-wait stalls on a busy 2-core CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
