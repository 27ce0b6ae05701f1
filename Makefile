# imgen: `make demo` runs the whole pipeline on the CPU; `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the demo's generator: muse, or vqdiffusion with `make demo MODEL=vqdiffusion`
MODEL  ?= muse

.PHONY: install install-bench test demo lint bench bench-peers bench-gpu bench-finetune clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the bench-only extras (matplotlib, the peer implementations); never needed by the package or the tests
install-bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check imgen_cli tests bench

# The embedded default, end to end on the CPU (about 15 minutes on 2 cores): the shapes world -> shards -> a VQGAN
# tokenizer -> token shards -> the in-project CLIP evaluator -> Muse (or MODEL=vqdiffusion) -> samples -> metrics.
# At 32x32 (a 4x downsampling VQGAN with K=256, so still an 8x8 token grid): at 64x64 the tokenizer needs several
# times longer before its reconstructions, and so the generator's samples, show recognisable shapes. The generator
# is 192 wide (the small preset's 256 scored the same R-precision, 0.625 against 0.615, in 1.5x the time). Short runs:
# a tour, not the quality bars (those are `make bench`).
demo: install
	$(BIN)/imgen synth demo/coco --n 4000 --val 200 --size 32
	$(BIN)/imgen tokenize demo/coco --out demo/shards --size 32 --shard-size 500
	$(BIN)/imgen train --model vqgan --data demo/shards --out runs/demo/vqgan --steps 1200 \
		--set model.image_size=32 --set "model.channel_mult=[1,2,4]" --set model.codebook_size=256 \
		--set train.warmup_steps=100 --set train.sample_every=400 --set train.ckpt_every=400 --set train.log_every=100
	$(BIN)/imgen eval --ckpt runs/demo/vqgan --data demo/shards --recon --json runs/demo/vqgan/recon.json
	$(BIN)/imgen tokenize demo/coco --vq runs/demo/vqgan --out demo/shards_vq --shard-size 500
	$(BIN)/imgen train --model clip --data demo/shards --out runs/demo/clip --steps 300 \
		--set model.image_size=32 --set model.patch_size=4 \
		--set train.warmup_steps=50 --set train.sample_every=300 --set train.ckpt_every=300
	$(BIN)/imgen train --model $(MODEL) --vq runs/demo/vqgan --data demo/shards_vq --out runs/demo/$(MODEL) \
		--steps 1200 --set model.width=192 --set train.warmup_steps=100 --set train.sample_every=300 \
		--set train.ckpt_every=300
	$(BIN)/imgen sample "a red circle above a blue square" --ckpt runs/demo/$(MODEL) --n 8 --out runs/demo/samples
	$(BIN)/imgen eval --ckpt runs/demo/$(MODEL) --data demo/shards_vq --r-precision --clip-score --fid --features clip \
		--clip-model runs/demo/clip --n 200 --json runs/demo/$(MODEL)/eval.json
	@echo "demo done: runs/demo/samples/grid.png, training grids in runs/demo/*/samples/, metrics in runs/demo/*/*.json"

bench: install-bench
	$(BIN)/python bench/run.py --out BENCHMARKS.md

# imgen against diffusers, muse-maskgit-pytorch and bit-diffusion: one training and one sampling step each
bench-peers: install-bench
	$(BIN)/python bench/peers.py --out BENCHMARKS.md

# fine-tuning memory and speed: full against LoRA (ranks 4, 16, 64, with the text encoder) per family;
# on a GPU: `python bench/finetune.py --preset base --device cuda --batch 32 --out BENCHMARKS.md`
bench-finetune: install-bench
	$(BIN)/python bench/finetune.py --out BENCHMARKS.md

# on a GPU machine: every family at its base preset, 256x256, bf16
bench-gpu: install
	$(BIN)/python bench/gpu.py --out BENCHMARKS.md

clean:
	rm -rf demo runs/demo .pytest_cache
