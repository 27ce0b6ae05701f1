"""`make bench-peers`: imgen against the public implementations a user would pick instead, side by side.

    python bench/peers.py [--device cuda] [--repeats 15] [--row muse] [--out BENCHMARKS.md]

Each row builds imgen's network and a peer's at the same size (width, depth, heads, token count, batch,
dtype) and times, on the same fixed batch, one training step (forward + backward + AdamW step) and one
sampling step (the network's forward under no_grad plus the sampler's update, guidance batched where the
method guides; imgen's step recomputes the prompts' cross-attention keys and values as the peers do, though
its sampling loops compute them once per run). The sides alternate, step by step, so a drift of the machine's
speed hits all; the reported figure is the median over the repeats after warm-up. Peak memory is what a side's
steps add to the built side at their peak (optimizer state included for training), each side and kind of step
in a process of its own: torch's allocator peak on CUDA, the peak resident set (VmHWM, reset through
/proc/self/clear_refs) on the CPU. The peers are bench-only dependencies (`pip install -e '.[bench]'`),
never needed by the package or the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from run import synchronize, write_section  # run.py puts the repository on sys.path for imgen_cli
from torch import Tensor, nn

MIB = 2**20


@dataclass
class Side:
    """One implementation of a row, built and ready: each callable runs one whole step on a fixed batch."""

    name: str
    train_step: Callable[[], None]  # forward + backward + optimizer step
    sample_step: Callable[[], None]  # one sampler step: network forward(s) under no_grad + the update
    params: int  # trainable parameters of the network


@dataclass
class Row:
    """A comparison: imgen's side and one or more peers', built by `build(device, dtype)`."""

    name: str  # short, for --row
    config: str  # the exact shared configuration, in words, for the table
    imgen: Callable[[torch.device, torch.dtype], Side]
    peers: list[Callable[[torch.device, torch.dtype], Side]] = field(default_factory=list)


# --- what every side's builder uses, so the sides differ only in their networks and methods ---


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """bf16 autocast around every side's forwards alike (as imgen trains on a GPU); off at float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def train_step(loss: Callable[[], Tensor], params: list[nn.Parameter], device: torch.device, dtype: torch.dtype,
               *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
               module: nn.Module | None = None) -> Callable[[], None]:
    """One step as every side takes it: (`module` to train mode), the loss under autocast, backward, AdamW,
    gradients dropped."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, fused=device.type == "cuda")

    def step() -> None:
        if module is not None:
            module.train()
        with autocast(device, dtype):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sample_step(update: Callable[[], object], device: torch.device, dtype: torch.dtype,
                module: nn.Module | None = None) -> Callable[[], None]:
    """One sampler step: (`module` to eval mode), the update under no_grad and autocast."""

    def step() -> None:
        if module is not None:
            module.eval()
        with torch.no_grad(), autocast(device, dtype):
            update()

    return step


def side(name: str, params: list[nn.Parameter], loss: Callable[[], Tensor], update: Callable[[], object],
         device: torch.device, dtype: torch.dtype, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
         module: nn.Module | None = None) -> Side:
    """A side from its trainable parameters, its loss and its sampler update (see `train_step`, `sample_step`)."""
    return Side(name, train_step(loss, params, device, dtype, lr=lr, betas=betas, module=module),
                sample_step(update, device, dtype, module), count(params))


# --- measuring ---


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def reset_peak(device: torch.device) -> float:
    """Resets the peak counter; returns the current usage in bytes, the baseline of `peak_growth`."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux: VmHWM := VmRSS
    return _rss_kib("VmRSS:") * 1024.0


def peak_growth(device: torch.device, baseline: float) -> float:
    synchronize(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return _rss_kib("VmHWM:") * 1024.0 - baseline


def timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Measured:
    name: str
    params: int
    train_s: float
    sample_s: float
    train_peak: float  # bytes
    sample_peak: float


def measure(sides: list[Side], device: torch.device, repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median seconds of (train step, sample step) per side, interleaved: every repeat runs each side's train
    step, then each side's sample step."""
    for s in sides:
        for _ in range(warmup):
            s.train_step()
            s.sample_step()
    train = {s.name: [] for s in sides}
    sample = {s.name: [] for s in sides}
    for _ in range(repeats):
        for s in sides:
            train[s.name].append(timed(s.train_step, device))
        for s in sides:
            sample[s.name].append(timed(s.sample_step, device))
    return {s.name: (statistics.median(train[s.name]), statistics.median(sample[s.name])) for s in sides}


def peak_of(row: Row, index: int, kind: str, device: torch.device, dtype: torch.dtype, steps: int) -> float:
    """Bytes the `kind` (train | sample) steps of one side add at their peak to the built side (optimizer state
    included for train). Run in a process of its own (`peak_in_subprocess`): on the CPU, memory another side
    freed stays resident and would hide this side's growth."""
    build = ([row.imgen] + row.peers)[index]
    torch.manual_seed(0)
    side = build(device, dtype)
    step = side.train_step if kind == "train" else side.sample_step
    baseline = reset_peak(device)
    for _ in range(steps):
        step()
    return peak_growth(device, baseline)


def peak_in_subprocess(row: Row, index: int, kind: str, device: torch.device, warmup: int) -> float:
    """`peak_of` over warmup + 1 steps, in a fresh process."""
    command = [sys.executable, __file__, "--peak", row.name, str(index), kind, "--device", str(device),
               "--warmup", str(warmup)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def table(results: list[tuple[Row, list[Measured]]]) -> str:
    lines = ["| row | implementation | params | train step | sample step | peak mem train / sample | "
             "imgen / peer, train | imgen / peer, sample |", "|---|---|---|---|---|---|---|---|"]
    for row, measured in results:
        ours = measured[0]
        for m in measured:
            ratio = ("" if m is ours else
                     f"**{ours.train_s / m.train_s:.2f}** | **{ours.sample_s / m.sample_s:.2f}**")
            lines.append(f"| {row.name} | {m.name} | {m.params / 1e6:.2f}M | {1000 * m.train_s:.1f} ms | "
                         f"{1000 * m.sample_s:.1f} ms | {m.train_peak / MIB:.0f} / {m.sample_peak / MIB:.0f} MiB | "
                         f"{ratio or ' | '} |")
    configs = "\n".join(f"- **{row.name}**: {row.config}" for row, _ in results)
    return "\n".join(lines) + "\n\nConfigurations (identical on both sides):\n\n" + configs + "\n"


def all_rows() -> list[Row]:
    from peer_continuous import ROWS as continuous
    from peer_token import ROWS as token

    return token + continuous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--row", action="append", help="only these rows (by name)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, help="write the table into this BENCHMARKS.md section")
    parser.add_argument("--peak", nargs=3, metavar=("ROW", "SIDE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for r in all_rows() if not args.row or r.name in args.row]
    if args.peak:
        name, index, kind = args.peak
        row = next(r for r in rows if r.name == name)
        print(peak_of(row, int(index), kind, device, dtype, args.warmup + 1))
        return
    results = []
    for row in rows:
        torch.manual_seed(0)
        sides = [row.imgen(device, dtype)] + [build(device, dtype) for build in row.peers]
        print(f"{row.name}: {', '.join(s.name for s in sides)}", flush=True)
        seconds = measure(sides, device, args.repeats, args.warmup)
        results.append((row, [Measured(s.name, s.params, *seconds[s.name],
                                       *(peak_in_subprocess(row, i, kind, device, args.warmup)
                                         for kind in ("train", "sample")))
                              for i, s in enumerate(sides)]))
        del sides
    body = (f"Median of {args.repeats} interleaved repeats after {args.warmup} warm-up steps, {dtype} on "
            f"{device.type} ({torch.get_num_threads()} threads). Ratios below 1.0: imgen is faster.\n\n"
            + table(results))
    print(body)
    if args.out:
        command = "python bench/peers.py" + (f" --device {args.device}" if args.device != "cpu" else "")
        write_section(args.out, f"peers-{device.type}", f"imgen against the public implementations ({device.type})",
                      body, command)


if __name__ == "__main__":
    main()
