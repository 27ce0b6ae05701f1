# imgen: `make demo` runs the whole pipeline on the CPU; `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check imgen_cli tests bench

# The embedded default, end to end on the CPU: synth -> tokenize -> train -> (sample, eval as families land).
demo: install
	$(BIN)/imgen synth demo/coco --n 2000 --val 200 --size 64
	$(BIN)/imgen tokenize demo/coco --out demo/shards --size 64 --shard-size 250
	$(BIN)/imgen train --model vqgan --data demo/shards --out runs/demo/vqgan --steps 800 \
		--set train.warmup_steps=100 --set train.sample_every=200 --set train.ckpt_every=200 --set train.log_every=50
	$(BIN)/imgen eval --ckpt runs/demo/vqgan --data demo/shards --recon --json runs/demo/vqgan/recon.json
	@echo "demo done: sample grids (originals above reconstructions) in runs/demo/vqgan/samples/"

bench: install
	$(BIN)/python bench/run.py --out BENCHMARKS.md

clean:
	rm -rf demo runs/demo .pytest_cache
