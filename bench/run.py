"""`make bench`: measure, then write the results into BENCHMARKS.md (each suite owns one marked section).

    python bench/run.py --out BENCHMARKS.md [--suite data]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgen_cli.data.shards import open_shards, train_loader  # noqa: E402
from imgen_cli.data.synthetic import write_coco_layout  # noqa: E402
from imgen_cli.data.tokenize import tokenize  # noqa: E402


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


SUITES = {"data": ("Data pipeline: synth, tokenize, streaming loader", bench_data)}


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
    args = parser.parse_args()
    for suite in args.suite or sorted(SUITES):
        title, fn = SUITES[suite]
        print(f"bench {suite} ...", flush=True)
        body = fn()
        print(body)
        write_section(args.out, suite, title, body, f"make bench  (python bench/run.py --suite {suite})")


if __name__ == "__main__":
    main()
