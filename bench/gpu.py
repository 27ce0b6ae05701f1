"""The GPU path, measured: every family at its base preset and 256x256 output, in bf16.

    python bench/gpu.py [--device cuda] [--batch 32] [--out BENCHMARKS.md]
    python bench/gpu.py --device cpu --size tiny   # the script's own check, on any machine

For each family: training samples/s (forward + backward + fused AdamW under bf16 autocast, median of timed
steps after warm-up) and MFU = the step's model FLOPs (counted by torch.utils.flop_counter on one real step:
matmuls, convolutions and attention, forward and backward) / step time / the measured bf16 matmul rate of
this device; then sampling latency per image at batch 1 and batch 16 with the family's default steps and
guidance (prompt context cached, bf16 autocast). The token families train on pre-encoded tokens (random
ids: speed does not depend on them) of the base vqgan (256 px -> 16x16 codes); latent DiffiT (preset B-2,
patch 1, the coco256 recipe) on that vqgan's latents; Bit Diffusion and DiffiT on 256x256 pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import matmul_rate, synchronize, write_section  # noqa: E402

from imgen_cli import registry  # noqa: E402
from imgen_cli.models.vqgan import PRESETS as VQ_PRESETS  # noqa: E402
from imgen_cli.models.vqgan import VQGAN, VQGANConfig  # noqa: E402
from imgen_cli.sample import Speed  # noqa: E402

# family -> (preset, overrides); "tiny" sizes make the CPU self-check run in seconds
SIZES = {
    "base": {"vqgan": ("base", {}), "muse": ("base", {}), "vqdiffusion": ("base", {}),
             "bitdiff": ("base", {}), "diffit": ("base", {}), "diffit-latent": ("B-2", {"patch": 1})},
    "tiny": {"vqgan": ("tiny", {}), "muse": ("tiny", {}), "vqdiffusion": ("tiny", {}), "bitdiff": ("tiny", {}),
             "diffit": ("tiny", {}), "diffit-latent": ("tiny", {"patch": 1})},
}
CAPTION = "a red circle above a blue square"


def build(name: str, size: str, device: torch.device) -> tuple[torch.nn.Module, VQGAN]:
    """The family's network at the chosen size, with the vqgan of the same size (its tokenizer, if it has one)."""
    family = registry.get(name)
    preset, overrides = SIZES[size][name]
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(**VQ_PRESETS[size if size == "tiny" else "base"])).eval()
    cfg = family.config_cls()(**{**family.presets()[preset], **overrides})
    if name in ("muse", "vqdiffusion", "diffit-latent"):
        model = family.model_cls()(cfg, vq)
    else:
        model = family.build(cfg)
    return model.to(device), vq.to(device)


def training_batch(name: str, model: torch.nn.Module, vq: VQGAN, batch: int, device: torch.device) -> dict:
    g = torch.Generator(device).manual_seed(0)
    captions = [CAPTION] * batch
    if name in ("muse", "vqdiffusion"):
        side = model.grid
        return {"tokens": torch.randint(0, model.codebook_size, (batch, side, side), generator=g, device=device),
                "caption": captions}
    side = vq.cfg.image_size if name in ("vqgan", "diffit-latent") else model.cfg.image_size
    return {"image": torch.rand(batch, 3, side, side, generator=g, device=device), "caption": captions}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model.loss(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(name: str, model: torch.nn.Module, vq: VQGAN, batch: int, device: torch.device,
                     steps: int) -> tuple[float, float]:
    """(samples/s, model FLOPs of one step)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type == "cuda")
    data = training_batch(name, model, vq, batch, device)
    for _ in range(3):
        train_step(model, optimizer, data, device)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, optimizer, data, device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, data, device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    del optimizer
    return batch / statistics.median(times), float(counter.get_total_flops())


def sampling_latency(model: torch.nn.Module, batch: int, device: torch.device) -> float:
    """Seconds per image for one batch of `batch` prompts at the family's default steps and guidance."""
    model.eval()
    prompts = [CAPTION] * batch
    speed = Speed(bf16=True)
    with speed.applied(model):
        model.generate(prompts[:1], generator=torch.Generator(device).manual_seed(0))  # kernels, allocator
        synchronize(device)
        start = time.perf_counter()
        model.generate(prompts, generator=torch.Generator(device).manual_seed(0))
        synchronize(device)
    return (time.perf_counter() - start) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=32, help="training batch per step")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up)")
    parser.add_argument("--family", action="append", help="only these families")
    parser.add_argument("--out", type=Path, help="write the table into this BENCHMARKS.md section")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or check the script with "
                 "--device cpu --size tiny.")
    # the product large enough to saturate a GPU; a small one keeps the CPU self-check quick
    peak = matmul_rate(device, torch.bfloat16, *((4096, 50) if device.type == "cuda" else (512, 5)))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name in args.family or list(SIZES[args.size]):
        model, vq = build(name, args.size, device)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        samples_per_s, flops = measure_training(name, model, vq, args.batch, device, args.steps)
        mfu = flops * samples_per_s / args.batch / peak
        latency = ("", "") if name == "vqgan" else (f"{1000 * sampling_latency(model, 1, device):.0f} ms",
                                                    f"{1000 * sampling_latency(model, 16, device):.1f} ms")
        rows.append(f"| {name} | {SIZES[args.size][name][0]} | {params / 1e6:.1f}M | {args.batch} | "
                    f"{samples_per_s:.1f} | {flops / args.batch / 1e9:.1f} | {100 * mfu:.1f}% | {latency[0]} | "
                    f"{latency[1]} |")
        print(rows[-1], flush=True)
        del model, vq
        if device.type == "cuda":
            torch.cuda.empty_cache()
    body = (f"Device: {device_name}. Measured bf16 matmul rate: {peak / 1e12:.2f} TFLOP/s. bf16 autocast, "
            f"fused AdamW; training FLOPs per sample counted by torch.utils.flop_counter on a real step "
            f"(forward + backward). Sampling at each family's default steps and guidance.\n\n"
            "| family | preset | params | batch | train samples/s | GFLOP / sample | MFU | latency/image, batch 1 | "
            "latency/image, batch 16 |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if args.out:
        write_section(args.out, f"gpu-{args.size}", f"GPU path: every family at {args.size} size, bf16",
                      body, " ".join(["python bench/gpu.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
