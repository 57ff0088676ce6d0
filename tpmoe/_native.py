"""Access to the built extension `tpmoe._C`, with a clear message where it is missing.

`import tpmoe` never needs the extension; the first call that does goes through
`native_ops()`, which loads it (registering `torch.ops.tpmoe.*`) or says how to build it.
"""
import importlib

_BUILD_HINT = (
    "the native extension tpmoe._C is not built. Build it with "
    "`pip install --no-build-isolation -e .` in the tpmoe checkout (or `make build`); "
    "TPMOE_SKIP_NATIVE=1 skips it on purpose."
)
_loaded = None


class NativeExtensionMissing(ImportError):
    pass


def native_available() -> bool:
    try:
        native_ops()
    except NativeExtensionMissing:
        return False
    return True


def native_ops():
    """Loads tpmoe._C once and returns `torch.ops.tpmoe`."""
    global _loaded
    if _loaded is None:
        try:
            importlib.import_module("tpmoe._C")
        except ImportError as error:
            raise NativeExtensionMissing(f"{_BUILD_HINT} (import failed: {error})") from error
        import torch

        _loaded = torch.ops.tpmoe
    return _loaded
