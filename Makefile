# The two commands of the README: `make demo` and `make test`. Each installs what it needs
# first; a second run finds everything in place and goes straight to work.
PYTHON ?= python3
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

.PHONY: demo test deps-demo deps-test build clean

# The main job on a small real shape: check the tensor-parallel block at world size 2 against
# the float64 reference (collectives counted), then time it beside transformers' experts.
DEMO_PRESET ?= qwen3-30b-a3b --scale 0.0625
demo: deps-demo build
	$(PYTHON) -m tpmoe verify --preset $(DEMO_PRESET) --world-size 2
	$(PYTHON) -m tpmoe bench --preset $(DEMO_PRESET) --tokens 1,16,128 --world-size 2 \
		--json benchmarks/out/demo.json --plot benchmarks/out/demo.png

test: deps-test build
	$(PYTHON) -m pytest -q tests

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
