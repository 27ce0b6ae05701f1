"""`make bench`: measure, then write the results into BENCHMARKS.md (each suite owns one marked section).

    python bench/run.py --out BENCHMARKS.md [--suite data]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgen_cli.data.shards import open_shards, train_loader  # noqa: E402
from imgen_cli.data.synthetic import write_coco_layout  # noqa: E402
from imgen_cli.data.tokenize import tokenize  # noqa: E402
from imgen_cli.nn.transformer import TransformerStack, stack_flops_per_token  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def bench_data() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = 2000
        start = time.perf_counter()
        write_coco_layout(tmp / "coco", n_train=n, n_val=200, size=64, seed=0)
        synth_s = time.perf_counter() - start
        rows.append(("synth 64x64, 1 process", f"{(n + 200) / synth_s:.0f} images/s"))
        for workers in (1, 2):
            start = time.perf_counter()
            tokenize(tmp / "coco", tmp / f"shards{workers}", size=64, workers=workers, shard_size=250)
            seconds = time.perf_counter() - start
            rows.append((f"tokenize 64x64, --workers {workers}", f"{(n + 200) / seconds:.0f} images/s"))
        shards = open_shards(str(tmp / "shards1"), "train")
        for workers in (0, 1, 2):
            steps = 100
            loader = train_loader(shards, 32, steps + 5, num_workers=workers, shuffle_buffer=500)
            batches = iter(loader)
            for _ in range(5):  # worker start-up and shuffle-buffer fill are not throughput
                next(batches)
            start = time.perf_counter()
            for _ in range(steps):
                next(batches)
            seconds = time.perf_counter() - start
            del batches, loader  # stop the workers before the shards' directory goes away
            rows.append((f"train loader, batch 32 of 64x64, num_workers {workers}",
                         f"{steps / seconds:.1f} batches/s ({32 * steps / seconds:.0f} images/s)"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"| what | throughput |\n|---|---|\n{table}\n"


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 20) -> float:
    """Measured dense matmul FLOP/s: the denominator of MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(device_name: str = "cpu") -> str:
    """Training step (forward + backward + AdamW) of the shared transformer block stack at two widths."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    peak = matmul_rate(device, dtype or torch.float32)
    seq, depth, batch = 64, 4, 32  # an 8x8 token grid, as the shapes recipes use
    rows = []
    for width in (256, 512):
        torch.manual_seed(0)
        stack = TransformerStack(width, depth, heads=width // 64).to(device)
        opt = torch.optim.AdamW(stack.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randn(batch, seq, width, device=device)
        times = []
        for i in range(13):
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = stack(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= 3:  # the first steps allocate and pick kernels
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        flops = stack_flops_per_token(width, depth, seq) * seq * batch
        params = sum(p.numel() for p in stack.parameters()) / 1e6
        rows.append(f"| {width} | {depth} | {params:.1f}M | {batch} x {seq} | {batch / step:.1f} | "
                    f"{batch * seq / step:.0f} | {flops / step / 1e9:.1f} | {100 * flops / step / peak:.0f}% |")
    precision = "bf16 autocast" if dtype else "fp32"
    return (f"Measured matmul rate ({precision}, 2048^3): {peak / 1e9:.1f} GFLOP/s. MFU = model FLOPs "
            "(6 x matmul parameters + attention, per token) / step time / that rate.\n\n"
            "| width | depth | params | batch x tokens | samples/s | tokens/s | model GFLOP/s | MFU |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


WORK = Path(__file__).resolve().parent.parent / ".bench-work"  # the shapes world and runs the quality suites share
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "shapes"


def imgen(*args: str) -> float:
    """Run one imgen command in the bench workspace, as a user would; returns its wall time in seconds."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgen_cli", *args], cwd=WORK, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def shapes_world() -> None:
    """8,000 train and 500 val images of the shapes world at 64x64, tokenized (made once, then reused)."""
    WORK.mkdir(exist_ok=True)
    if not (WORK / "shards" / "manifest.json").is_file():
        imgen("synth", "coco", "--n", "8000", "--val", "500", "--size", "64", "--workers", "2")
        imgen("tokenize", "coco", "--out", "shards", "--shard-size", "500")


def fresh_run(name: str) -> str:
    import shutil

    shutil.rmtree(WORK / "runs" / name, ignore_errors=True)
    return f"runs/{name}"


def bench_vqgan() -> str:
    """The tokenizer quality bar: recipes/shapes/vqgan.toml on the shapes world at 64x64, as a user runs it."""
    import json

    shapes_world()
    train_s = imgen("train", "--model", "vqgan", "--recipe", str(RECIPES / "vqgan.toml"), "--data", "shards",
                    "--out", fresh_run("vq"))
    imgen("eval", "--ckpt", "runs/vq", "--data", "shards", "--recon", "--n", "500", "--json", "recon.json")
    report = json.loads((WORK / "recon.json").read_text())
    config = json.loads((WORK / "runs/vq/config.json").read_text())
    m = report["metrics"]
    return (f"`imgen synth coco --n 8000 --val 500 && imgen tokenize coco && imgen train --model vqgan` "
            f"(recipes/shapes/vqgan.toml: preset {config['preset']}, channels {config['model']['channels']}, "
            f"K={config['model']['codebook_size']}, {config['train']['steps']} steps of batch "
            f"{config['train']['batch_size']}), then `imgen eval --recon` on the 500 val images (EMA weights).\n\n"
            "| training time | val PSNR | val SSIM | codebook usage | perplexity | target |\n"
            "|---|---|---|---|---|---|\n"
            f"| {train_s / 60:.1f} min | {m['psnr']:.2f} dB | {m['ssim']:.4f} | {100 * m['codebook_usage']:.1f}% | "
            f"{m['codebook_perplexity']:.0f} | <= 20 min, >= 30 dB, >= 50% |\n")


def real_val_folder() -> tuple[str, str]:
    """The val images as PNG files plus a prompts file: `imgen eval --images` then scores the real data."""
    from torchvision.utils import save_image

    from imgen_cli.data.shards import exact_loader

    folder = WORK / "real-val"
    if not folder.is_dir():
        folder.mkdir()
        prompts = []
        for batch in exact_loader(open_shards(str(WORK / "shards"), "val"), 100):
            for image, caption in zip(batch["image"], batch["caption"], strict=True):
                save_image(image.float() / 255, folder / f"{len(prompts):05d}.png")
                prompts.append(caption)
        (WORK / "real-val-prompts.txt").write_text("\n".join(prompts) + "\n")
    return "real-val", "real-val-prompts.txt"


def bench_clip() -> str:
    """The evaluator's bar: the in-project CLIP (recipes/shapes/clip.toml) ranks real val captions."""
    import json

    shapes_world()
    train_s = imgen("train", "--model", "clip", "--recipe", str(RECIPES / "clip.toml"), "--data", "shards",
                    "--out", fresh_run("clip"))
    folder, prompts = real_val_folder()
    imgen("eval", "--images", folder, "--prompts", prompts, "--data", "shards", "--r-precision", "--clip-score",
          "--clip-model", "runs/clip", "--json", "clip-real.json")
    report = json.loads((WORK / "clip-real.json").read_text())
    config = json.loads((WORK / "runs/clip/config.json").read_text())
    real = report["real"]
    return (f"`imgen train --model clip --recipe recipes/shapes/clip.toml` (preset {config['preset']}, "
            f"{config['train']['steps']} steps of batch {config['train']['batch_size']}) on the shapes world "
            f"(8,000 train images, 64x64), then `imgen eval --images VAL --r-precision --clip-score` on the "
            f"{report['real_images']} real val images with their own captions.\n\n"
            "| training time | R-precision (R=10) | CLIP score | chance | target |\n|---|---|---|---|---|\n"
            f"| {train_s / 60:.1f} min | {real['r_precision']:.3f} | {real['clip_score']:.1f} | 0.100 | "
            "<= 15 min, >= 0.9 |\n")


def tokenizer_and_evaluator(tokenizer: bool = True) -> None:
    """What the generator suites stand on, made once: the recipe tokenizer and token shards (token families
    only: the pixel suites read the plain shards) and the CLIP."""
    shapes_world()
    if tokenizer and not (WORK / "runs" / "vq" / "checkpoints").is_dir():
        imgen("train", "--model", "vqgan", "--recipe", str(RECIPES / "vqgan.toml"), "--data", "shards",
              "--out", fresh_run("vq"))
    if tokenizer and not (WORK / "shards_vq" / "manifest.json").is_file():
        imgen("tokenize", "coco", "--vq", "runs/vq", "--out", "shards_vq", "--shard-size", "500")
    if not (WORK / "runs" / "clip" / "checkpoints").is_dir():
        imgen("train", "--model", "clip", "--recipe", str(RECIPES / "clip.toml"), "--data", "shards",
              "--out", fresh_run("clip"))


def generator_table(report: dict) -> str:
    rows = "".join(f"| {r['steps']} | {r['r_precision']:.3f} | {r['fid']:.2f} | {r['clip_score']:.2f} | "
                   f"{1000 * r['seconds_per_image']:.1f} ms |\n" for r in report["rows"])
    real = report["real"]
    return ("| sampler steps | R-precision (R=10) | CLIP-space FID | CLIP score | sampling time per image |\n"
            "|---|---|---|---|---|\n" + rows +
            f"| real val images | {real['r_precision']:.3f} | 0 | {real['clip_score']:.2f} | |\n")


def token_generator_suite(family: str, sweep: str, default_guidance: float, sampling: str = "") -> str:
    """A token family's recipe trained on the pre-encoded shapes tokens, then scored across sampler steps."""
    import json

    tokenizer_and_evaluator()
    train_s = imgen("train", "--model", family, "--recipe", str(RECIPES / f"{family}.toml"), "--vq", "runs/vq",
                    "--data", "shards_vq", "--out", fresh_run(family))
    imgen("eval", "--ckpt", f"runs/{family}", "--data", "shards_vq", "--r-precision", "--clip-score", "--fid",
          "--features", "clip", "--clip-model", "runs/clip", "--n", "500", "--steps", sweep,
          "--json", f"{family}-eval.json")
    report = json.loads((WORK / f"{family}-eval.json").read_text())
    config = json.loads((WORK / f"runs/{family}/config.json").read_text())
    return (f"`imgen train --model {family} --recipe recipes/shapes/{family}.toml --vq runs/vq --data shards_vq` "
            f"(preset {config['preset']}, {config['train']['steps']} steps of batch {config['train']['batch_size']}, "
            f"tokens pre-encoded by the recipe tokenizer) took **{train_s / 60:.1f} min**. Then `imgen eval --ckpt "
            f"runs/{family} --r-precision --clip-score --fid --features clip --n 500 --steps {sweep}` ({sampling}"
            f"guidance {report['settings']['guidance'] or f'default {default_guidance}'}, in-project CLIP "
            f"`runs/clip`, prompts = the val captions, batch 50; the time per image includes the tokenizer's "
            f"decoder). Target: R-precision >= 0.6 in <= 30 min of training.\n\n" + generator_table(report))


def bench_muse() -> str:
    """Issue 6's bar: recipes/shapes/muse.toml trained <= 30 min on the CPU (tokenizer excluded), R-precision
    of its samples with the in-project CLIP, CLIP-space FID, and sampling time per image across step counts."""
    return token_generator_suite("muse", "4,8,12,16", 4.0)


def bench_vqdiffusion() -> str:
    """Issue 7's bar: recipes/shapes/vqdiffusion.toml trained <= 30 min on the CPU (tokenizer excluded),
    R-precision of its samples with the in-project CLIP, and the speed-quality table at 100/50/25/10 steps."""
    return token_generator_suite("vqdiffusion", "100,50,25,10", 3.0,
                                 "T = 100, the exact strided posterior with stride round(100 / steps), so 100, 51, "
                                 "26 and 11 network calls, no truncation; ")


# the Dynamic Dual-Output ablation on one training budget and seed: (run, row, training flags)
BITDIFF_HEADS = (
    ("bitdiff", "x0 head", []),
    ("bitdiff-eps", "eps head", ["--set", "model.prediction=eps"]),
    ("bitdiff-ddo", "dual output", ["--set", "model.dual_output=true"]),
    ("bitdiff-ddo-paper", "dual output, the paper's gate",
     ["--set", "model.dual_output=true", "--set", "model.gate_start=even", "--set", "model.eps_head=shared"]),
)


def bench_bitdiff() -> str:
    """Issue 8's bars: recipes/shapes/bitdiff.toml (pixels at 32x32) trained <= 30 min on the CPU, R-precision of
    its samples with the in-project CLIP; and issue 19's Dynamic Dual-Output ablation: the same budget with the
    eps head, with dual output as imgen trains it and as the paper does, all evaluated at 5, 10 and 25 DDIM
    steps, with the heads' denoising errors and the mean gate against t (bench/dual_output.py)."""
    import json
    import subprocess

    tokenizer_and_evaluator(tokenizer=False)
    rows, config = [], None
    for name, label, extra in BITDIFF_HEADS:
        train_s = imgen("train", "--model", "bitdiff", "--recipe", str(RECIPES / "bitdiff.toml"), "--data", "shards",
                        "--out", fresh_run(name), *extra)
        imgen("eval", "--ckpt", f"runs/{name}", "--data", "shards", "--r-precision", "--clip-score", "--fid",
              "--features", "clip", "--clip-model", "runs/clip", "--n", "500", "--steps", "5,10,25",
              "--sampler", "ddim", "--json", f"{name}-eval.json")
        report = json.loads((WORK / f"{name}-eval.json").read_text())
        config = json.loads((WORK / f"runs/{name}/config.json").read_text())
        rows += [(label, train_s, row) for row in report["rows"]]
    plot = Path(__file__).resolve().parent / "dual_output.png"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "dual_output.py"), "errors",
                    *(f"runs/{name}" for name, _, _ in BITDIFF_HEADS), "--json", "bitdiff-errors.json",
                    "--plot", str(plot)], cwd=WORK, check=True, stdout=subprocess.DEVNULL)
    table = "".join(f"| {label} | {train_s / 60:.1f} min | {row['steps']} | {row['r_precision']:.3f} | "
                    f"{row['fid']:.2f} | {row['clip_score']:.2f} | {1000 * row['seconds_per_image']:.1f} ms |\n"
                    for label, train_s, row in rows)
    errors = json.loads((WORK / "bitdiff-errors.json").read_text())["runs"]
    times = [r["t"] for r in errors["runs/bitdiff"]]
    error_rows = "".join(
        f"| {label}: {part} | " + " | ".join(f"{r[key]:.4f}" for r in errors[f"runs/{name}"]) + " |\n"
        for name, label, _ in BITDIFF_HEADS
        for part, key in ((("x0 MSE", "estimate"),) if "gate" not in errors[f"runs/{name}"][0] else
                          (("mixture MSE", "estimate"), ("x head MSE", "x_head"), ("eps head MSE", "eps_head"),
                           ("mean gate", "gate"))))
    real = report["real"]
    flags = "; ".join(f"{label}: `{' '.join(extra) or 'none'}`" for _, label, extra in BITDIFF_HEADS)
    return (f"`imgen train --model bitdiff --recipe recipes/shapes/bitdiff.toml --data shards` (preset "
            f"{config['preset']}, pixels at {config['model']['image_size']}x{config['model']['image_size']} as 24 "
            f"analog-bit channels, {config['train']['steps']} steps of batch {config['train']['batch_size']}), and "
            f"the same with each row's flags ({flags}); "
            f"then `imgen eval --r-precision --clip-score --fid --features clip --n 500 --steps 5,10,25 --sampler "
            f"ddim` (guidance {report['settings']['guidance'] or 'default 3.0'}, in-project CLIP `runs/clip`, "
            f"prompts = the val captions). Targets: R-precision >= 0.6 in <= 30 min of training; dual output at "
            f"least as good as the better single head at every step count, better at 5 and 10.\n\n"
            "| head | training time | DDIM steps | R-precision (R=10) | CLIP-space FID | CLIP score | time/image |\n"
            "|---|---|---|---|---|---|---|\n" + table +
            f"| real val images (64x64) | | | {real['r_precision']:.3f} | 0 | {real['clip_score']:.2f} | |\n"
            f"\nDenoising errors on 200 held-out val images (`python bench/dual_output.py errors`, one "
            f"noise draw per level, no self-conditioning input, estimates clipped as the sampler clips them):\n\n"
            f"| t | {' | '.join(f'{t:g}' for t in times)} |\n|---|{'---|' * len(times)}\n" + error_rows +
            "\n![the heads' errors and the gate against t](bench/dual_output.png)\n")


def bench_diffit() -> str:
    """Issue 9's bar: recipes/shapes/diffit.toml (pixels at 32x32) trained <= 30 min on the CPU, R-precision of its
    samples at 50 DDIM steps with the in-project CLIP, and the sampling time per image."""
    import json

    tokenizer_and_evaluator(tokenizer=False)
    train_s = imgen("train", "--model", "diffit", "--recipe", str(RECIPES / "diffit.toml"), "--data", "shards",
                    "--out", fresh_run("diffit"))
    imgen("eval", "--ckpt", "runs/diffit", "--data", "shards", "--r-precision", "--clip-score", "--fid", "--features",
          "clip", "--clip-model", "runs/clip", "--n", "500", "--steps", "5,10,25,50", "--sampler", "ddim",
          "--json", "diffit-eval.json")
    report = json.loads((WORK / "diffit-eval.json").read_text())
    config = json.loads((WORK / "runs/diffit/config.json").read_text())
    return (f"`imgen train --model diffit --recipe recipes/shapes/diffit.toml --data shards` (preset "
            f"{config['preset']}, pixels at {config['model']['image_size']}x{config['model']['image_size']}, EDM "
            f"training, {config['train']['steps']} steps of batch {config['train']['batch_size']}) took "
            f"**{train_s / 60:.1f} min**. Then `imgen eval --ckpt runs/diffit --r-precision --clip-score --fid "
            f"--features clip --n 500 --steps 5,10,25,50 --sampler ddim` (DDIM = EDM's Euler step on the rho = 7 grid, "
            f"guidance {report['settings']['guidance'] or 'default 3.0'}, in-project CLIP `runs/clip`, prompts = "
            f"the val captions, batch 50). Target: R-precision >= 0.6 at 50 DDIM steps in <= 30 min of training.\n\n"
            + generator_table(report) +
            "\nParameter counts against the paper (tests/test_diffit.py, exact): DiffiT-XL/2 at 256px 561,330,144 "
            "(19,935,760 per block), at 512px 563,562,464, with 30 blocks 601,201,664, counting the paper's "
            "1001-row label table, which imgen's text path replaces.\n")


SCALING_FAMILIES = ("muse", "vqdiffusion", "bitdiff", "diffit-latent", "diffit")
SCALING_GRIDS, SCALING_STEPS, FIXED_STEPS, FIXED_GRID, SCALING_BATCH = (8, 16, 32), (4, 8, 16, 32), 8, 16, 4


HELD_OUT = "red circle"  # the colour-shape pair the fine-tuning suite's base never sees


def held_out_world() -> None:
    """The fine-tuning suite's data and base, made once: the shapes world without any red circle (its Muse base,
    recipes/shapes/muse.toml on the recipe tokenizer's codes), and ten red-circle images with 50 val captions."""
    tokenizer_and_evaluator()
    if not (WORK / "shards_vq_norc" / "manifest.json").is_file():
        imgen("synth", "coco-norc", "--n", "8000", "--val", "500", "--without", HELD_OUT)
        imgen("tokenize", "coco-norc", "--vq", "runs/vq", "--out", "shards_vq_norc", "--shard-size", "500")
    if not (WORK / "rc10_vq" / "manifest.json").is_file():
        imgen("synth", "rc10", "--n", "10", "--val", "50", "--only", HELD_OUT, "--seed", "1")
        imgen("tokenize", "rc10", "--vq", "runs/vq", "--out", "rc10_vq")
    if not (WORK / "runs" / "muse-norc" / "checkpoints").is_dir():
        imgen("train", "--model", "muse", "--recipe", str(RECIPES / "muse.toml"), "--vq", "runs/vq", "--data",
              "shards_vq_norc", "--out", fresh_run("muse-norc"))


def held_out_scores(run: str) -> dict[str, float]:
    """A run on the new prompt (the 50 val captions of the ten images' world, each naming a red circle, 8 samples
    each: R-precision, CLIP score, pair accuracy) and on the old pairs (500 val captions of the base's world:
    R-precision, CLIP-space FID)."""
    import json
    import shutil
    import subprocess

    captions = json.loads((WORK / "rc10" / "annotations" / "captions_val2017.json").read_text())
    first: dict[int, str] = {}
    for annotation in captions["annotations"]:
        first.setdefault(annotation["image_id"], annotation["caption"])
    prompts = [first[image["id"]] for image in captions["images"]]
    name = run.rpartition("/")[2]
    shutil.rmtree(WORK / "samples" / name, ignore_errors=True)
    imgen("sample", *prompts, "--ckpt", run, "--n", "8", "--steps", "12", "--out", f"samples/{name}")
    imgen("eval", "--images", f"samples/{name}", "--prompts", f"samples/{name}/prompts.txt", "--data", "shards",
          "--r-precision", "--clip-score", "--clip-model", "runs/clip", "--json", f"{name}-new.json")
    pair = subprocess.run([sys.executable, str(Path(__file__).parent / "pair_accuracy.py"), f"samples/{name}",
                           "--clip", "runs/clip", "--pair", HELD_OUT], cwd=WORK, check=True, capture_output=True,
                          text=True)
    imgen("eval", "--ckpt", run, "--data", "shards_vq_norc", "--n", "500", "--steps", "12", "--r-precision",
          "--clip-score", "--fid", "--features", "clip", "--clip-model", "runs/clip", "--json", f"{name}-old.json")
    new = json.loads((WORK / f"{name}-new.json").read_text())["rows"][0]
    old = json.loads((WORK / f"{name}-old.json").read_text())["rows"][0]
    return {"new_r": new["r_precision"], "pair": next(iter(json.loads(pair.stdout).values())),
            "new_clip": new["clip_score"], "old_r": old["r_precision"], "old_fid": old["fid"]}


def bench_finetune_heldout() -> str:
    """Issue 22's measurement: the Muse base that never saw a red circle, fine-tuned on ten images of one with
    recipes/shapes/muse-few-images.toml (LoRA 8 and full), draws the new pair better and the old pairs as well."""
    held_out_world()
    tune = ["train", "--init", "runs/muse-norc", "--recipe", str(RECIPES / "muse-few-images.toml"), "--data",
            "rc10_vq", "--set", "data.prior=shards_vq_norc", "--set", "train.sample_every=5000"]
    runs = {"base (never saw a red circle)": "runs/muse-norc"}
    for label, extra, name in (("LoRA 8, lr 1e-4 (the recipe)", ["--lora", "8"], "ft-lora8"),
                               ("full, lr 1e-5", ["--set", "train.lr=1e-5"], "ft-full")):
        seconds = imgen(*tune, *extra, "--out", fresh_run(name))
        runs[f"{label}, {seconds:.0f} s"] = f"runs/{name}"
    rows = "".join(f"| {label} | {s['new_r']:.3f} | {s['pair']:.3f} | {s['new_clip']:.1f} | {s['old_r']:.3f} | "
                   f"{s['old_fid']:.3f} |\n" for label, s in ((k, held_out_scores(v)) for k, v in runs.items()))
    return ("Base: `imgen synth coco-norc --n 8000 --val 500 --without \"red circle\"`, tokenized with the recipe "
            "tokenizer, `imgen train --model muse --recipe recipes/shapes/muse.toml --vq runs/vq --data "
            "shards_vq_norc` (made once, then reused). Ten images: `imgen synth rc10 --n 10 --val 50 --only \"red "
            "circle\" --seed 1`, tokenized the same way. Fine-tunes: `imgen train --init runs/muse-norc --recipe "
            "recipes/shapes/muse-few-images.toml --data rc10_vq --set data.prior=shards_vq_norc` with `--lora 8` or "
            "`--set train.lr=1e-5` (300 steps of batch 8, half from the base's shards; the time is the whole "
            "command). New prompt: `imgen sample` of the 50 val captions of rc10, 8 images each at 12 steps, "
            "`imgen eval --images --r-precision --clip-score` (R = 10) and `bench/pair_accuracy.py` (the pair's "
            "colour or shape swapped: 9 hard distractors, chance 0.1); old pairs: `imgen eval --ckpt RUN --data "
            "shards_vq_norc --n 500 --steps 12 --r-precision --clip-score --fid --features clip`. One standard "
            "error is about 0.02 in each R-precision and in pair accuracy.\n\n"
            "| run | new prompt: R-precision | new prompt: pair accuracy | new prompt: CLIP score | "
            "old pairs: R-precision | old pairs: CLIP-FID |\n|---|---|---|---|---|---|\n" + rows)


def scaling_model(name: str, grid: int) -> torch.nn.Module:
    """A family's CPU preset (`small`, untrained: speed does not depend on the weights) whose output is a
    (8 grid)^2-pixel image: the token families, Bit Diffusion's token mode and latent DiffiT on the g x g grid
    of the small vqgan (f = 8, decoder included in the time), image-space DiffiT on the pixels themselves."""
    from imgen_cli import registry
    from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS
    from imgen_cli.models.vqgan import VQGAN, VQGANConfig

    family = registry.get(name)
    torch.manual_seed(0)
    preset = dict(family.presets()["small"])
    if name == "diffit":
        return family.build(family.config_cls()(**{**preset, "image_size": 8 * grid})).eval()
    tokenizer = VQGAN(VQGANConfig(**{**VQ_PRESETS["small"], "image_size": 8 * grid})).eval()
    if name == "bitdiff":
        preset.update(codebook_size=tokenizer.codebook_size, grid=grid)
    return family.model_cls()(family.config_cls()(**preset), tokenizer).eval()


def seconds_per_image(model: torch.nn.Module, steps: int, **speed: bool) -> float:
    from imgen_cli.sample import Speed

    prompts = ["a red circle above a blue square"] * SCALING_BATCH
    with Speed(**speed).applied(model):
        model.generate(prompts[:1], steps=1, generator=torch.Generator().manual_seed(0))  # allocate, pick kernels
        start = time.perf_counter()
        model.generate(prompts, steps=steps, generator=torch.Generator().manual_seed(0))
        return (time.perf_counter() - start) / SCALING_BATCH


def bench_scaling() -> str:
    """Issue 10's scaling table: sampling time per image against the output resolution (token grid 8, 16, 32
    at f = 8) at fixed steps, and against the steps at the 16 x 16 grid, for every generator family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_grid = {name: [seconds_per_image(scaling_model(name, g), FIXED_STEPS) for g in SCALING_GRIDS]
               for name in SCALING_FAMILIES}
    options = {"no context cache": dict(cache_context=False), "context cache": {}, "bf16": dict(bf16=True)}
    by_steps, by_option = {}, {}
    for name in SCALING_FAMILIES:
        model = scaling_model(name, FIXED_GRID)
        by_steps[name] = [seconds_per_image(model, k) for k in SCALING_STEPS]
        by_option[name] = [seconds_per_image(model, FIXED_STEPS, **speed) for speed in options.values()]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in SCALING_FAMILIES:
        left.plot([8 * g for g in SCALING_GRIDS], by_grid[name], marker="o", label=name)
        right.plot(SCALING_STEPS, by_steps[name], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="output side, px (token grid x 8)", ylabel="s / image",
             title=f"{FIXED_STEPS} steps")
    right.set(xscale="log", yscale="log", xlabel="sampler steps", ylabel="s / image",
              title=f"{FIXED_GRID}x{FIXED_GRID} grid ({8 * FIXED_GRID} px)")
    for axes, ticks in ((left, [8 * g for g in SCALING_GRIDS]), (right, SCALING_STEPS)):
        axes.set_xticks(ticks, [str(v) for v in ticks])
        axes.minorticks_off()
        axes.grid(alpha=0.3)
    left.legend()
    figure.tight_layout()
    plot = Path(__file__).resolve().parent.parent / "bench" / "scaling.png"
    figure.savefig(plot, dpi=110)

    def table(columns: tuple, values: dict[str, list[float]], unit: str = "") -> str:
        return (f"| family | {' | '.join(f'{c}{unit}' for c in columns)} |\n|---|{'---|' * len(columns)}\n" +
                "".join(f"| {name} | {' | '.join(f'{1000 * v:.0f} ms' for v in row)} |\n"
                        for name, row in values.items()))

    return (f"Untrained `small` presets (speed does not depend on the weights), {SCALING_BATCH} prompts per batch, "
            f"guidance on (cond + uncond in one forward), prompt context cached, fp32, "
            f"{torch.get_num_threads()} threads; the time per image includes the text encoder and the vqgan "
            f"decoder. Muse, VQ-Diffusion, Bit Diffusion (token mode: bits of the tokens) and latent DiffiT run on "
            f"the g x g grid of the small vqgan (f = 8); image-space DiffiT on the (8g)^2 pixels. Plot: "
            f"`bench/scaling.png`.\n\nSampling time per image at {FIXED_STEPS} steps:\n\n"
            + table(tuple(8 * g for g in SCALING_GRIDS), by_grid, " px") +
            f"\nAt the {FIXED_GRID}x{FIXED_GRID} grid ({8 * FIXED_GRID} px):\n\n"
            + table(SCALING_STEPS, by_steps, " steps") +
            f"\nThe speed options of `imgen sample` at the {FIXED_GRID}x{FIXED_GRID} grid, {FIXED_STEPS} steps (the "
            f"same images with and without the context cache; bf16 = autocast on this CPU):\n\n"
            + table(tuple(options), by_option) + "\n![scaling](bench/scaling.png)\n")


SUITES = {
    "data": ("Data pipeline: synth, tokenize, streaming loader", bench_data),
    "train": ("Training throughput: shared transformer block stack", bench_train),
    "vqgan": ("Tokenizer quality: VQGAN on the shapes world, 64x64", bench_vqgan),
    "clip": ("Evaluator quality: the in-project CLIP on the shapes world", bench_clip),
    "muse": ("Muse on the shapes world: R-precision, CLIP-space FID, sampling time", bench_muse),
    "vqdiffusion": ("VQ-Diffusion on the shapes world: R-precision and the speed-quality table", bench_vqdiffusion),
    "bitdiff": ("Bit Diffusion on the shapes world, and the Dynamic Dual-Output ablation", bench_bitdiff),
    "diffit": ("Image-space DiffiT on the shapes world: R-precision at 50 DDIM steps", bench_diffit),
    "scaling": ("Sampling time against resolution and steps", bench_scaling),
    "finetune-heldout": ("Fine-tuning the shapes Muse on ten images of a held-out pair", bench_finetune_heldout),
}


def write_section(path: Path, suite: str, title: str, body: str, command: str) -> None:
    text = path.read_text() if path.exists() else "# imgen benchmarks\n\nEvery table says the command and machine.\n"
    stamp = datetime.date.today().isoformat()
    section = (f"<!-- bench:{suite} -->\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
               f"Date: {stamp}\n\n{body}<!-- /bench:{suite} -->")
    pattern = re.compile(rf"<!-- bench:{suite} -->.*?<!-- /bench:{suite} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--suite", choices=sorted(SUITES), action="append")
    parser.add_argument("--device", default="cpu", help="cuda: the train suite in bf16 on the GPU")
    args = parser.parse_args()
    for suite in args.suite or list(SUITES):  # in order: the tokenizer and the CLIP before the generators
        title, fn = SUITES[suite]
        print(f"bench {suite} on {args.device} ...", flush=True)
        if suite == "train":
            body = fn(args.device)
            key = suite if args.device == "cpu" else f"{suite}-{args.device.split(':')[0]}"
            title = f"{title} ({args.device})"
        else:
            body, key = fn(), suite
        print(body)
        command = f"python bench/run.py --suite {suite}" + (f" --device {args.device}" if args.device != "cpu" else "")
        write_section(args.out, key, title, body, command)


if __name__ == "__main__":
    main()
