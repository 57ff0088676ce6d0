"""Install what `make demo` / `make test` need, only what is missing (fast when all is there).

torch is pinned: on the project's machines `pip install torch==2.13.0` takes a local CPU
build, while an unpinned torch pulls gigabytes of CUDA packages.
"""
import argparse
import importlib.metadata as metadata
import subprocess
import sys

CORE = {"torch": "2.13.0", "triton": "3.9.0", "numpy": None, "ninja": None, "pybind11": None,
        "setuptools": None, "wheel": None}
# transformers: the newest release of the tested range (tpmoe/hf/version.py); kernels comes with
# it from 5.25. tests/hf/test_hf_families.py asserts the pinned release is the one installed.
HF = {"transformers": "5.25.0", "accelerate": "1.16.0"}
TEST = {"pytest": None, "hypothesis": None, **HF}
# The demo times transformers' own experts beside tpmoe's: it needs the same pinned release.
DEMO = {"tqdm": None, "matplotlib": None, **HF}


def missing(requirements):
    specs = []
    for name, pinned in requirements.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        # "2.13.0+cpu" satisfies a pin of "2.13.0": the local tag names the build, not the release.
        if installed is None or (pinned is not None and installed.split("+")[0] != pinned):
            specs.append(f"{name}=={pinned}" if pinned else name)
    return specs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--for", dest="purpose", choices=["demo", "test"], default="test")
    args = parser.parse_args()
    wanted = dict(CORE)
    wanted.update(TEST if args.purpose == "test" else {})
    wanted.update(DEMO)
    specs = missing(wanted)
    # torch first and alone, so that no other package's looser requirement picks a CUDA build.
    torch_specs = [s for s in specs if s.startswith("torch==")]
    other_specs = [s for s in specs if not s.startswith("torch==")]
    for group in (torch_specs, other_specs):
        if group:
            print("installing:", " ".join(group), flush=True)
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *group])


if __name__ == "__main__":
    main()
