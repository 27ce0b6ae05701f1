"""`make bench-finetune`: memory and speed of fine-tuning, full against LoRA, per family (issue 22).

    python bench/finetune.py [--preset small] [--device cpu] [--batch 8] [--repeats 5] [--out BENCHMARKS.md]
    python bench/finetune.py --preset base --device cuda --batch 32     # the same table on a GPU

Each family's network is built at the preset (random weights: memory and speed do not depend on their values)
and trained on one fixed synthetic batch (64x64 images or an 8x8 grid of 1024 codes, two-word captions) in the
settings a user chooses between: the whole network with its text encoder, the whole network with the text
encoder frozen, and LoRA adapters (imgen_cli.nn.lora, through peft) of rank 4, 16 and 64 on the attention and MLP
layers, rank 16 also on the text encoder's attention projections. A step is the family's loss, backward and an
AdamW step over what trains; the time is the median over the repeats after two warm-up steps, and the peak memory
is what the steps add to the built network at their peak (optimizer state included), each setting in a process
of its own (bench/peers.py's measure: the allocator's peak on CUDA, the peak resident set on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from peers import MIB, peak_growth, reset_peak, timed
from run import synchronize, write_section  # run.py puts the repository on sys.path for imgen_cli

from imgen_cli import registry
from imgen_cli.config import build_dataclass
from imgen_cli.nn import lora

FAMILIES = ("muse", "vqdiffusion", "bitdiff", "diffit")
# (label, LoRA rank, adapters on the text encoder too, text encoder frozen)
SETTINGS = (("full", 0, False, False), ("full, text frozen", 0, False, True), ("LoRA 4", 4, False, True),
            ("LoRA 16", 16, False, True), ("LoRA 64", 64, False, True), ("LoRA 16 + text", 16, True, True))
TOKENS = (1024, 8)  # codes and grid side of the token families' synthetic batch (the shapes tokenizer's)
IMAGE_SIZE = 64


def build(family: str, preset: str, setting: tuple, device: torch.device, batch: int) -> tuple:
    """The network in one setting, its optimizer over what trains, and its fixed batch."""
    _, rank, text, frozen = setting
    fam = registry.get(family)
    values = dict(fam.presets()[preset])
    if fam.needs_vq_tokens:
        values.update(codebook_size=TOKENS[0], grid=TOKENS[1])
    model = fam.build(build_dataclass(fam.config_cls(), values, "model"))
    if frozen:
        model.text_encoder.requires_grad_(False)
    if rank:
        lora.add_adapters(model, rank, 0.0, text=text)
    model = model.to(device).train()
    generator = torch.Generator().manual_seed(0)
    data = {"caption": ["a red circle", "a blue square"] * (batch // 2)}
    if fam.needs_vq_tokens:
        data["tokens"] = torch.randint(0, TOKENS[0], (batch, TOKENS[1], TOKENS[1]), generator=generator).to(device)
    else:
        data["image"] = torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator,
                                      dtype=torch.uint8).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    return model, optimizer, data, sum(p.numel() for p in trained), sum(p.numel() for p in model.parameters())


def step_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: dict, device: torch.device):
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak(family: str, preset: str, index: int, device: torch.device, batch: int) -> float:
    """Bytes three steps of one setting add at their peak to the built network (run in a process of its own)."""
    torch.manual_seed(0)
    step = step_of(*build(family, preset, SETTINGS[index], device, batch)[:3], device)
    baseline = reset_peak(device)
    for _ in range(3):
        step()
    return peak_growth(device, baseline)


def measure(family: str, preset: str, index: int, device: torch.device, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model, optimizer, data, trained, total = build(family, preset, SETTINGS[index], device, batch)
    step = step_of(model, optimizer, data, device)
    for _ in range(2):
        step()
    seconds = statistics.median(timed(step, device) for _ in range(repeats))
    command = [sys.executable, __file__, "--peak", family, str(index), "--preset", preset, "--device", str(device),
               "--batch", str(batch)]
    bytes_ = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
    return {"family": family, "setting": SETTINGS[index][0], "trained": trained, "total": total,
            "step_s": seconds, "peak_mib": bytes_ / MIB}


def table(rows: list[dict]) -> str:
    lines = ["| family | setting | trained parameters | step time | peak memory added |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['setting']} | {r['trained'] / 1e6:.2f}M of {r['total'] / 1e6:.2f}M | "
                     f"{1000 * r['step_s']:.0f} ms | {r['peak_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--family", action="append", choices=FAMILIES)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--peak", nargs=2, metavar=("FAMILY", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    if args.peak:
        print(peak(args.peak[0], args.preset, int(args.peak[1]), device, args.batch))
        return
    rows = []
    for family in args.family or FAMILIES:
        for index in range(len(SETTINGS)):
            rows.append(measure(family, args.preset, index, device, args.batch, args.repeats))
            synchronize(device)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.out:
        body = (f"Preset {args.preset}, batch {args.batch}, {device.type}; full = every weight trains (AdamW), "
                f"LoRA R = rank-R adapters on the attention and MLP layers (alpha = R), + text = on the text encoder's "
                f"attention projections too. Median of {args.repeats} steps after 2 warm-up steps; peak = what three "
                f"steps add to the built network, in a process of its own.\n\n" + table(rows))
        write_section(args.out, f"finetune-{device.type}", f"Fine-tuning memory and speed ({device.type})", body,
                      f"python bench/finetune.py --preset {args.preset} --device {args.device} --batch {args.batch}")


if __name__ == "__main__":
    main()
