"""What the test folders share: cases, tolerances, the gloo runner, the tiny HF models, the launch
counter (one module each), and the checkout's root, which the tests read README.md, tools/,
benchmarks/ and examples/ from. Importable from every folder: tests/conftest.py puts tests/ on
sys.path (pytest's default rootdir-relative import), and spawned ranks inherit it."""
import os
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def seed_of(nodeid: str) -> int:
    """The seed of the test `nodeid` (what the `seed` fixture gives it): a hash of the id as it
    read before the tests moved into folders (tests/<file>::<test>), so that each test keeps the
    inputs it has always been checked on."""
    path, _, test = nodeid.partition("::")
    return zlib.crc32(f"tests/{os.path.basename(path)}::{test}".encode())
