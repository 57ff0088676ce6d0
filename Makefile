# The commands of the README: `make demo` and `make test`, each installing what it needs first (a
# second run finds everything in place and goes straight to work), and `make gpu-check`.
PYTHON ?= python3
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

.PHONY: demo test gpu-check deps-demo deps-test build clean

# The main job on a small real shape: check the tensor-parallel block at world size 2 against
# the float64 reference (collectives counted), then time it beside transformers' experts.
DEMO_PRESET ?= qwen3-30b-a3b --scale 0.0625
demo: deps-demo build
	$(PYTHON) -m tpmoe verify --preset $(DEMO_PRESET) --world-size 2
	$(PYTHON) -m tpmoe bench --preset $(DEMO_PRESET) --tokens 1,16,128 --world-size 2 \
		--json benchmarks/out/demo.json --plot benchmarks/out/demo.png

test: deps-test build
	$(PYTHON) -m pytest -q tests

# One prepared command for a lent GPU (issue 14): versions, the CUDA build for sm_90, the CUDA
# tests and the kernel benchmark, each under its own time cap, the evidence under GPU_CHECK_OUT.
# It installs nothing (the machine's own torch and triton; no network there), so it depends on
# no deps-* target. Without CUDA the same steps run dry. tools/gpu_check.py says more.
GPU_CHECK_OUT ?= benchmarks/out/gpu-check
GPU_CHECK_ARCHIVE ?=
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(GPU_CHECK_ARCHIVE),--archive $(GPU_CHECK_ARCHIVE))

deps-demo:
	$(PYTHON) tools/ensure_deps.py --for demo

deps-test:
	$(PYTHON) tools/ensure_deps.py --for test

# Rebuild when a native source changed, or when the built extension cannot be imported
# (a fresh machine, a removed install).
build: .build-stamp
	@$(PYTHON) -c "import tpmoe._C" 2>/dev/null || { rm -f .build-stamp; $(MAKE) --no-print-directory .build-stamp; }

.build-stamp: $(NATIVE_SOURCES)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

clean:
	rm -rf build .build-stamp tpmoe/_C*.so *.egg-info
