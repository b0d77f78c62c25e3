# Every target creates .venv and installs what it needs, so each works on a fresh machine
# that has only Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use `make TORCH=torch ...` (or your own env).
TORCH  ?= torch==2.13.0

.PHONY: run test gpu-check bench clean mutation

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,triton]'
	touch $@

# Main job: pretrain the tiny GPT at tp=2, pp=2 on 4 CPU processes on the bundled corpus.
run: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 4 examples/pretrain_gpt.py \
		--tp 2 --pp 2 --model tiny --steps 300 --save-every 100 --save runs/tiny \
		--metrics-out runs/tiny/metrics.jsonl --log-interval 25

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# Mutation testing of the core modules with cosmic-ray, outside CI (docs/testing.md): a
# sample of mutants per module against a fast test subset, on a copy of the tree (~45-60 min).
mutation: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[mutation]'
	$(PY) scripts/mutation.py

# On a CUDA machine that already has torch and triton (no package registry needed): installs
# megalite into $(PYTHON) without dependencies, then the GPU tests, the kernel table,
# llama-1b's speed/MFU/memory beside Hugging Face's (if transformers is there), each part
# under its own time limit (about 8 minutes in all); figures in $(GPU_OUT)/. Without CUDA
# the same command runs what the CPU can: the GPU tests skip, the sweep and the llama
# comparison shrink to smoke checks (`make gpu-check PYTHON=.venv/bin/python`).
GPU_OUT ?= gpu-results
gpu-check:
	$(PYTHON) -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo \
		"gpu-check: the install needs setuptools >= 77 (pyproject's SPDX license) in $(PYTHON)"; exit 1; }
	mkdir -p $(GPU_OUT)
	-timeout 120 $(PYTHON) -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -n 15
	-timeout 210 $(PYTHON) -m megalite.kernels.bench --quick --budget-s 150 --compile-budget-s 100 \
		--out $(GPU_OUT)/kernels 2>&1 | tail -n 60
	-if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		timeout 150 $(PYTHON) examples/bench_llama.py --model llama-1b --steps 8 \
			--json $(GPU_OUT)/llama-1b.json; \
	else \
		timeout 150 $(PYTHON) examples/bench_llama.py --model tiny --seq-len 64 --steps 2 \
			--json $(GPU_OUT)/tiny-cpu.json; \
	fi
	@echo "gpu-check figures: $(GPU_OUT)/kernels/table.md, $(GPU_OUT)/*.json"

clean:
	rm -rf $(VENV) runs bench-results gpu-results
