import importlib.util
import os
import sys

import pytest
import torch

# The Triton kernels run on CPU tensors under the interpreter where no GPU is present. The
# variable is read when a kernel is decorated, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared helpers (tests/support) import as `support.*` from every test folder, whatever
# --import-mode pytest runs with; spawned ranks inherit this sys.path.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from support import seed_of  # noqa: E402

# Where the `triton` marker's tests can run: the package, and a GPU or the interpreter (unset
# only if TRITON_INTERPRET=0 was asked for on a machine without a GPU).
TRITON_SKIP_REASON = (
    "the Triton path needs the triton package (pip install tpmoe[triton])"
    if importlib.util.find_spec("triton") is None else
    None if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else
    "needs a GPU or TRITON_INTERPRET=1 (set by conftest.py when no GPU)")


def pytest_collection_modifyitems(config, items):
    if TRITON_SKIP_REASON is None:
        return
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(pytest.mark.skip(reason=TRITON_SKIP_REASON))


@pytest.fixture
def seed(request):
    """A fresh, reproducible seed per test: derived from the test's id, printed on failure."""
    value = seed_of(request.node.nodeid)
    torch.manual_seed(value)
    return value
