# Two commands for a fresh machine: `make bench` (the main job) and `make test`.
# Each sets up what it needs (.venv with pinned torch, the C++/CUDA build) and reuses it when run again.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
# The venv's tools (ninja above all: torch's builds look for it on PATH alone) for the targets that build or run
# the package; the gpu-* targets keep the machine's own python3.
VENV_PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: FORCE all venv build test lint format bench bench-full clean gpu-build gpu-test gpu-sanitize gpu-equivalence gpu-bench gpu-check

all: build

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# What the build depends on besides the sources' times: another CUDA setting, toolkit or compiler rebuilds, and so
# does a source file added or deleted.
# The nvcc setup.py picks: CUDA_HOME's, CUDA_PATH's, PATH's, then /usr/local/cuda's.
NVCC := $(firstword $(if $(CUDA_HOME),$(wildcard $(CUDA_HOME)/bin/nvcc)) $(if $(CUDA_PATH),$(wildcard \
	$(CUDA_PATH)/bin/nvcc)) $(shell command -v nvcc) $(wildcard /usr/local/cuda/bin/nvcc))
BUILD_CONFIG := RESNET_FUSED_BUILD_CUDA=$(RESNET_FUSED_BUILD_CUDA) CUDA_HOME=$(CUDA_HOME) CUDA_PATH=$(CUDA_PATH) \
	RESNET_FUSED_CUDA_ARCHS=$(RESNET_FUSED_CUDA_ARCHS) CC=$(CC) CXX=$(CXX) nvcc=$(NVCC) \
	cuda=$(if $(NVCC),$(shell $(NVCC) --version 2>/dev/null | tail -1)) sources=$(sort $(SOURCES))

$(VENV)/.build-config: FORCE
	@mkdir -p $(VENV)
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@

$(VENV)/.built: export PATH := $(VENV_PATH)
$(VENV)/.built: $(VENV)/.installed $(VENV)/.build-config $(SOURCES)
	@echo "building resnet_fused (log: $(VENV)/build.log)"
	@$(PY) -m pip install -v --no-deps --no-build-isolation -e . > $(VENV)/build.log 2>&1 \
		|| (grep -n -E -B2 -A8 "FAILED:|error:|Error:" $(VENV)/build.log | head -80; echo ...; \
			tail -15 $(VENV)/build.log; exit 1)
	@grep -i -E "^ *resnet_fused:|warning|falling back" $(VENV)/build.log | sort -u | head -40 || true
	@grep -hoE "[0-9]+ bytes spill stores" $(VENV)/build.log | sort | uniq -c | sed 's/^/  ptxas (CUDA kernels x archs):/' || true
	touch $@

build: $(VENV)/.built

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Main suite, then the Triton kernels on CPU tensors under the interpreter (it must be set before triton loads,
# hence a second pytest process).
test: export PATH := $(VENV_PATH)
test: build lint
	$(PY) -m pytest -q -n 2 tests
	TRITON_INTERPRET=1 RESNET_FUSED_TEST_BACKENDS=triton $(PY) -m pytest -q -n 2 \
		tests/test_conv_bias_add_relu.py tests/test_double_backward.py $(wildcard tests/test_triton_*.py) \
		$(wildcard tests/test_nn_triton.py)

bench: export PATH := $(VENV_PATH)
bench: build
	$(PY) -m benchmarks.main

bench-full: export PATH := $(VENV_PATH)
bench-full: build
	$(PY) -m benchmarks.main --full

# On a machine with a CUDA GPU and its own torch (offline; torch is never installed): five steps of < 10 minutes
# each, results in benchmarks/results/gpu/. Without a GPU each step reports "skipped: no GPU".
GPU_PYTHON ?= python3
gpu-build:
	$(GPU_PYTHON) scripts/gpu_check.py build
gpu-test:
	$(GPU_PYTHON) scripts/gpu_check.py test
gpu-sanitize:
	$(GPU_PYTHON) scripts/gpu_check.py sanitize
gpu-equivalence:
	$(GPU_PYTHON) scripts/gpu_check.py equivalence
gpu-bench:
	$(GPU_PYTHON) scripts/gpu_check.py bench
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py all

# The CPU extension built out of tree with AddressSanitizer + UBSan, and the CPU correctness suite run against it
# (scripts/sanitize.py; CI runs its --quick selection from tests/test_sanitize.py). The first build takes minutes.
.PHONY: sanitize
sanitize: export PATH := $(VENV_PATH)
sanitize: $(VENV)/.installed
	$(PY) scripts/sanitize.py

clean:
	rm -rf build *.egg-info resnet_fused/*.so $(VENV)/.built
