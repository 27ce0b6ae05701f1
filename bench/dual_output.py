"""Dynamic Dual-Output on trained runs: where a dual-output model's samples go wrong, measured (issue 19).

Run in the bench workspace (`.bench-work/`, where `python bench/run.py` keeps the shapes world and the CLIP):

    python bench/dual_output.py gates runs/bitdiff-ddo --json gates.json
        R-precision, CLIP-space FID and CLIP score of one dual-output run sampled three ways on the same seeds:
        the gate as trained, r = 1 at the first call only (t = 1, where the eps branch's x0 estimate amplifies
        its error most), and r = 1 at every call (the x head alone).
    python bench/dual_output.py errors runs/bitdiff runs/bitdiff-ddo --json errors.json --plot errors.png
        every run's denoising errors on held-out val images across noise levels (`denoising_errors`: the
        estimate the samplers use, and for dual output the x head alone, the eps head alone and the mean gate),
        and the plot of the x heads' errors and the mean gate against t.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from imgen_cli import registry
from imgen_cli.data.shards import exact_loader, open_shards
from imgen_cli.eval.generative import EvalRequest, evaluate
from imgen_cli.sample import SamplingOptions, parse_steps
from imgen_cli.train.distributed import DistEnv

TIMES = (1.0, 0.995, 0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
GATE_RULES = ("as trained", "r = 1 at t = 1", "r = 1 everywhere")


def load(run: str) -> object:
    trained = registry.load_trained(run, "cpu", families=registry.generators())
    return trained.model.eval()


def force_gate(model: object, rule: str) -> None:
    """Make the model mix with r = 1 (its x head alone) at the first call (t = 1) or at every call: its gate logit
    is set to +inf before the model mixes, so the rest of the sampler (guidance, clipping, self-conditioning)
    is the model's own."""
    if rule == "as trained":
        return
    output_at = model.output_at

    def forced(x: torch.Tensor, x0_prev: torch.Tensor, t_now: float, text: object) -> tuple[torch.Tensor, float]:
        output, g = output_at(x, x0_prev, t_now, text)
        if rule == "r = 1 everywhere" or t_now >= 1.0:
            output = output.clone()
            output[:, -1] = float("inf")
        return output, g

    model.output_at = forced


@contextlib.contextmanager
def silent(label: str, total: int) -> Iterator:
    yield lambda k: None


def gates(args: argparse.Namespace) -> dict:
    rows = {}
    for rule in GATE_RULES:
        model = load(args.run)
        force_gate(model, rule)
        sampling = SamplingOptions(steps=parse_steps(args.steps), sampler="ddim", seed=0, batch_size=50)
        req = EvalRequest(fid=True, clip_score=True, r_precision=True, features="clip", clip_model="runs/clip",
                          n=args.n, sampling=sampling)
        report = evaluate(req, args.data, DistEnv(0, 0, 1, torch.device("cpu")), silent, print, model=model)
        rows[rule] = report["rows"]
        print(rule, [(r["steps"], round(r["r_precision"], 3), round(r["fid"], 3)) for r in report["rows"]],
              flush=True)
    return {"run": args.run, "n": args.n, "steps": args.steps, "rows": rows}


def val_batches(data: str, n: int) -> list[dict]:
    batches, seen = [], 0
    for batch in exact_loader(open_shards(data, "val"), 50):
        batches.append(batch)
        seen += len(batch["caption"])
        if seen >= n:
            break
    return batches


def errors(args: argparse.Namespace) -> dict:
    batches = val_batches(args.data, args.n)
    result = {}
    for run in args.runs:
        model = load(run)
        generator = torch.Generator().manual_seed(0)  # the same noise for every run
        per_batch = [model.denoising_errors(b["image"].float() / 255, b["caption"], TIMES, generator)
                     for b in batches]
        weights = [len(b["caption"]) for b in batches]
        rows = []
        for i, t in enumerate(TIMES):
            keys = per_batch[0][i].keys() - {"t", "gamma"}
            rows.append({"t": t, "gamma": per_batch[0][i]["gamma"],
                         **{k: sum(w * rows_[i][k] for w, rows_ in zip(weights, per_batch, strict=True)) / sum(weights)
                            for k in keys}})
        result[run] = rows
        print(run, [(r["t"], round(r.get("x_head", r["estimate"]), 4)) for r in rows], flush=True)
    return {"images": sum(len(b["caption"]) for b in batches), "times": TIMES, "runs": result}


def plot_errors(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn: list[list[float]] = []  # the v-prediction gates already drawn (one line per noise schedule)
    for run, rows in report["runs"].items():
        t = [r["t"] for r in rows]
        left.plot(t, [r.get("x_head", r["estimate"]) for r in rows], marker="o", label=f"{run}: x head")
        if "gate" in rows[0]:
            left.plot(t, [r["estimate"] for r in rows], marker=".", linestyle="--", label=f"{run}: mixture")
            left.plot(t, [r["eps_head"] for r in rows], marker="x", linestyle=":", label=f"{run}: eps head")
            right.plot(t, [r["gate"] for r in rows], marker="o", label=run)
            v_gate = [1 - r["gamma"] for r in rows]
            if v_gate not in drawn:
                drawn.append(v_gate)
                right.plot(t, v_gate, color="gray", linestyle=":", label=f"1 - gamma (v) of {run}'s schedule")
    left.set(yscale="log", xlabel="t", ylabel="x0 MSE (clipped), held-out val", title="denoising error")
    right.set(xlabel="t", ylabel="mean gate r (1 = x head)", title="the gate against t", ylim=(-0.02, 1.02))
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gate_parser = commands.add_parser("gates")
    gate_parser.add_argument("run")
    gate_parser.add_argument("--n", type=int, default=500)
    gate_parser.add_argument("--steps", default="5,10,25")
    error_parser = commands.add_parser("errors")
    error_parser.add_argument("runs", nargs="+")
    error_parser.add_argument("--n", type=int, default=200)
    error_parser.add_argument("--plot", type=Path)
    for sub in (gate_parser, error_parser):
        sub.add_argument("--data", default="shards")
        sub.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = gates(args) if args.command == "gates" else errors(args)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.command == "errors" and args.plot is not None:
        plot_errors(report, args.plot)


if __name__ == "__main__":
    main()
