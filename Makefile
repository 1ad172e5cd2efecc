# Two commands: `make demo` and `make test`. Both create (or reuse) .venv in the checkout.
PYTHON ?= python3
# VENV=path uses another virtual environment (installed into unless its stamp is newer than pyproject.toml)
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU take the CPU build of torch, never a CUDA one.
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.tessera-installed

.PHONY: demo test test-compile test-cluster install clean gpu-check

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

# The demo (launch/demo.py): the shipped shapes-sd model (native 128 px) at its native size,
# then at DEMO_SIZE (default twice native) as plain tiles and with asg over 2 local ranks, and
# patch; one captioned PNG (outputs/demo.png), a table with each run's speed-up and fidelity
# against the same request on one rank (outputs/demo.md, printed) and outputs/demo.json.
DEMO_SIZE ?= 256
DEMO_STEPS ?= 20
DEMO_PROMPT ?= a red circle on a dark background
demo: $(STAMP)
	$(VENV)/bin/tessera demo --model shapes-sd --prompt "$(DEMO_PROMPT)" --nproc 2 \
	  --size $(DEMO_SIZE) --steps $(DEMO_STEPS) --out-dir outputs

test: $(STAMP)
	$(PY) -m pytest -q tests

# The two-node Ray cluster test (a second `ray start` node on loopback; ~45 s), kept out of
# `make test` so the suite stays under 12 minutes on 2 cores.
test-cluster: $(STAMP)
	$(PY) -m pytest -q tests/test_ray.py -m cluster

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
