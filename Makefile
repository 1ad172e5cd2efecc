# Two commands: `make demo` and `make test`. Both create (or reuse) .venv in the checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU take the CPU build of torch, never a CUDA one.
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.tessera-installed

.PHONY: demo test test-compile install clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing torch from the index (CUDA build)"; \
	  $(PY) -m pip install -q --no-compile torch; \
	else \
	  $(PY) -m pip install -q --no-compile $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo: the shipped shapes-sd model (native 128 px) at 256x256, with displaced patch
# parallelism over 2 local ranks (row bands, stale activations after warm-up), compared
# with a serial run of the same seed. DEMO_SIZE/DEMO_STEPS change it.
DEMO_SIZE ?= 256
DEMO_STEPS ?= 20
DEMO_PROMPT ?= a red circle and a blue triangle on a dark background
demo: $(STAMP)
	$(VENV)/bin/tessera generate --model shapes-sd --prompt "$(DEMO_PROMPT)" \
	  --nproc 2 --strategy patch --no-cfg-split \
	  --height $(DEMO_SIZE) --width $(DEMO_SIZE) --steps $(DEMO_STEPS) \
	  --out outputs/demo.png --report outputs/demo.json --compare-serial

test: $(STAMP)
	$(PY) -m pytest -q tests

# The compile tests with inductor instead of the suite's aot_eager (minutes cold on 2 cores).
test-compile: $(STAMP)
	TESSERA_COMPILE_BACKEND=inductor $(PY) -m pytest -q tests/test_compile.py

# On a machine with NVIDIA GPUs: every strategy on CUDA/NCCL, isolated-rank measurements of the
# real-size SDXL UNet and PixArt-Sigma, projected speed-ups; under 8 minutes on one H100/H200.
# Writes outputs/gpu_check.json and .md; exit 1 if a check failed. CPU version (CI, tiny
# sizes): $(PY) -m benchmarks.gpu_check --cpu
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) outputs
