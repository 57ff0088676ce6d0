"""`import tpmoe` works without the built extension, and so does every call: the plain-PyTorch
twins run, after one warning that says how to build it."""
import subprocess
import sys

BLOCK_NATIVE = """
import importlib.abc, sys
class BlockNative(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tpmoe._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, BlockNative())
"""


def run_python(code):
    return subprocess.run([sys.executable, "-c", BLOCK_NATIVE + code], capture_output=True, text=True, timeout=120)


def test_without_native_extension_everything_runs_after_one_warning():
    # Routing, the experts and the whole block, forward and backward, twice: the plain-PyTorch
    # twins run, and the one warning names the missing extension and the build command.
    result = run_python(
        "import warnings\n"
        "import torch, tpmoe\n"
        "from tpmoe._native import NativeFallbackWarning\n"
        "config = tpmoe.MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2)\n"
        "block = tpmoe.MoEBlock.from_full(config, tpmoe.random_moe_weights(config))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        weights, ids = tpmoe.route(torch.randn(5, 4), 2)\n"
        "        tpmoe.align(ids, 4)\n"
        "        tpmoe.fused_experts(torch.randn(5, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6), ids, weights)\n"
        "        x = torch.randn(5, 8, requires_grad=True)\n"
        "        block(x).sum().backward()\n"
        "        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0\n"
        "fallbacks = [w for w in caught if issubclass(w.category, NativeFallbackWarning)]\n"
        "print('WARNINGS', len(fallbacks))\n"
        "print('MESSAGE', fallbacks[0].message)\n")
    assert result.returncode == 0, result.stderr
    assert "WARNINGS 1" in result.stdout, result.stdout
    assert "tpmoe._C is not built" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_native_extension_registers_ops():
    import torch
    from tpmoe._native import native_ops
    ops = native_ops()
    assert hasattr(ops, "route") and hasattr(ops, "align")
    assert ops is torch.ops.tpmoe



def test_readme_map_names_files_that_exist():
    """The README's "Where things are" table: every path it names is in the repository."""
    import os
    import re
    from support import ROOT as root
    with open(os.path.join(root, "README.md")) as handle:
        section = handle.read().split("## Where things are", 1)[1]
    paths = [path for path in re.findall(r"`([\w./-]+)`", section) if "/" in path and "*" not in path]
    assert len(paths) > 20, paths
    missing = [path for path in paths if not os.path.exists(os.path.join(root, path))]
    assert not missing, f"README names paths that do not exist: {missing}"
