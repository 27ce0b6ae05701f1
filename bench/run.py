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
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
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
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = stack(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
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


def bench_vqgan() -> str:
    """The tokenizer quality bar: recipes/shapes/vqgan.toml on the shapes world at 64x64, as a user runs it."""
    import json
    import subprocess

    imgen = [sys.executable, "-m", "imgen_cli"]
    with tempfile.TemporaryDirectory() as tmp:
        def run(*args: str) -> float:
            start = time.perf_counter()
            subprocess.run([*imgen, *args], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start

        run("synth", "coco", "--n", "8000", "--val", "500", "--size", "64", "--workers", "2")
        run("tokenize", "coco", "--out", "shards", "--shard-size", "500")
        recipe = Path(__file__).resolve().parent.parent / "recipes" / "shapes" / "vqgan.toml"
        train_s = run("train", "--model", "vqgan", "--recipe", str(recipe), "--data", "shards", "--out", "runs/vq")
        run("eval", "--ckpt", "runs/vq", "--data", "shards", "--recon", "--n", "500", "--json", "recon.json")
        report = json.loads((Path(tmp) / "recon.json").read_text())
        config = json.loads((Path(tmp) / "runs/vq/config.json").read_text())
    m = report["metrics"]
    return (f"`imgen synth coco --n 8000 --val 500 && imgen tokenize coco && imgen train --model vqgan` "
            f"(recipes/shapes/vqgan.toml: preset {config['preset']}, channels {config['model']['channels']}, "
            f"K={config['model']['codebook_size']}, {config['train']['steps']} steps of batch "
            f"{config['train']['batch_size']}), then `imgen eval --recon` on the 500 val images (EMA weights).\n\n"
            "| training time | val PSNR | val SSIM | codebook usage | perplexity | target |\n"
            "|---|---|---|---|---|---|\n"
            f"| {train_s / 60:.1f} min | {m['psnr']:.2f} dB | {m['ssim']:.4f} | {100 * m['codebook_usage']:.1f}% | "
            f"{m['codebook_perplexity']:.0f} | <= 20 min, >= 30 dB, >= 50% |\n")


SUITES = {
    "data": ("Data pipeline: synth, tokenize, streaming loader", bench_data),
    "train": ("Training throughput: shared transformer block stack", bench_train),
    "vqgan": ("Tokenizer quality: VQGAN on the shapes world, 64x64", bench_vqgan),
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
    for suite in args.suite or sorted(SUITES):
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
