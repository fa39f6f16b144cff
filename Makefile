# One-command entry points for a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that lies on the build machines' disk; an unpinned torch pulls a
# multi-GB CUDA build. Installed first so later requirements on torch are already met.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[all,test]'
	# pymatting compiles its numba kernels on first import (about a minute) and caches them on disk;
	# pay that once here, not in every worker and test.
	NUMBA_NUM_THREADS=1 $(BIN)/python -c "import pymatting"
	touch $@

demo: setup
	$(BIN)/subjectpairs demo --out demo

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/filter_bench.py
	$(BIN)/python benchmarks/pair_bench.py
	$(BIN)/python benchmarks/build_bench.py --progress
	$(BIN)/python benchmarks/backgrounds_bench.py
	$(BIN)/python benchmarks/loader_bench.py
	# segmentation and pair quality on real photos (DreamBench from ../shared, scikit-image)
	$(BIN)/python benchmarks/segmentation_bench.py
	$(BIN)/python benchmarks/quality_distributions.py
	# full size on a GPU; on a CPU a tiny-model smoke check (the GPU figures are in the README)
	$(BIN)/python benchmarks/train_bench.py --variants eager,channels_last
	$(BIN)/python benchmarks/pretrain_bench.py

clean:
	rm -rf $(VENV) demo benchmarks/.data .pytest_cache
