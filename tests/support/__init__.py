"""What the test folders share: cases, tolerances, the gloo runner, the tiny HF models, the launch
counter (one module each), and the checkout's root, which the tests read README.md, tools/,
benchmarks/ and examples/ from. Importable from every folder: tests/conftest.py puts tests/ on
sys.path (pytest's default rootdir-relative import), and spawned ranks inherit it."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
