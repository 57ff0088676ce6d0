"""`import tpmoe` works without the built extension; the call that needs it says how to build it."""
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


def test_import_without_native_extension_then_clear_error():
    result = run_python(
        "import torch, tpmoe\n"
        "from tpmoe._native import NativeExtensionMissing\n"
        "try:\n"
        "    tpmoe.route(torch.randn(4, 6), 2)\n"
        "except NativeExtensionMissing as error:\n"
        "    print('MESSAGE', error)\n")
    assert result.returncode == 0, result.stderr
    assert "MESSAGE" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_native_extension_registers_ops():
    import torch
    from tpmoe._native import native_ops
    ops = native_ops()
    assert hasattr(ops, "route") and hasattr(ops, "align")
    assert ops is torch.ops.tpmoe
