import os
import zlib

import pytest
import torch

# The Triton kernels run on CPU tensors under the interpreter where no GPU is present. The
# variable is read when a kernel is decorated, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request):
    """A fresh, reproducible seed per test: derived from the test's id, printed on failure."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value
