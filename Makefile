# Every target creates .venv and installs what it needs, so each works on a fresh machine
# that has only Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use `make TORCH=torch ...` (or your own env).
TORCH  ?= torch==2.13.0

.PHONY: run test gpu-check bench clean

$(VENV)/.installed: pyproject.toml
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

# On a CUDA machine: GPU tests and the kernel benchmark sweep (about 8 minutes).
gpu-check: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu tests
	$(PY) -m megalite.kernels.bench --out bench-results

clean:
	rm -rf $(VENV) runs bench-results
