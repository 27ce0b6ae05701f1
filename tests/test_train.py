import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from imgen_cli import registry
from imgen_cli.config import resolve
from imgen_cli.errors import RunError
from imgen_cli.runs import RunDir
from imgen_cli.train.checkpoint import TrainingState, resume
from imgen_cli.train.distributed import DistEnv
from imgen_cli.train.loop import make_optimizer, train, warmup_cosine

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115


def tiny_config(shards: Path, steps: int, family: str = "vqgan", **train: object):
    fam = registry.get(family)
    sets = [f"train.{k}={json.dumps(v)}" for k, v in {"batch_size": 4, "warmup_steps": 2, "log_every": 1,
                                                      "ckpt_every": 2, "sample_every": 2, "keep_last": 2,
                                                      **train}.items()]
    return resolve(family, fam.config_cls(), fam.presets(), preset="tiny",
                   sets=[*sets, "data.num_workers=0", "data.shuffle_buffer=8"],
                   flags={"data.shards": str(shards), "train.steps": steps})


def test_warmup_cosine_schedule() -> None:
    values = [warmup_cosine(s, total=110, warmup=10, min_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[110] == pytest.approx(0.1)
    assert values[60] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_training_writes_run_dir_and_resume_restores_everything(shapes_shards: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    result = train(tiny_config(shapes_shards, 4), run, ENV, QUIET)
    assert result.step == 4 and not result.stopped_early
    assert [c.step for c in run.checkpoints()] == [2, 4]  # keep_last=2 pruned nothing yet
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "l1", "l2", "lr", "grad_norm", "samples_per_s"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(2e-4 / 2 * 2)  # warm-up step 2 of 2 after the first update
    assert sorted(p.name for p in run.samples_dir.iterdir()) == ["step-000002.png", "step-000004.png"]

    # a fresh model + optimizer restored from the checkpoint equals what was saved
    cfg = tiny_config(shapes_shards, 4)
    ckpt = run.latest_checkpoint()
    from imgen_cli.train.ema import EMA

    model = registry.get("vqgan").build(cfg.model)
    ema = EMA(model, 0.999)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainingState(model, ema, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    restored = resume(run, state, ENV, print)
    assert restored.step == 4 and ema.updates == 4 and sched.last_epoch == 4
    saved_model, saved_ema = ckpt.load_weights(ema=False), ckpt.load_weights(ema=True)
    assert all(torch.equal(v, saved_model[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved_ema[k]) for k, v in ema.state_dict().items())
    assert any(not torch.equal(saved_model[k], saved_ema[k]) for k in saved_model)  # EMA is its own copy
    saved_opt = ckpt.load_train_state()["optimizer"]["state"]
    names = [n for n, _ in model.named_parameters()]
    assert set(saved_opt) == set(names)
    assert all(torch.equal(opt.state[p]["exp_avg"], saved_opt[n]["exp_avg"]) for n, p in model.named_parameters())

    # continuing the run picks up at step 4 and prunes down to keep_last=2
    more = train(tiny_config(shapes_shards, 6), run, ENV, QUIET)
    assert more.step == 6
    assert [c.step for c in run.checkpoints()] == [4, 6]
    assert [json.loads(x)["step"] for x in run.metrics_path.read_text().splitlines()][-2:] == [5, 6]


def test_partial_checkpoints_are_ignored(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    state = {"w": torch.ones(2)}
    run.save_checkpoint(10, state, state, {"step": 10}, keep_last=5)
    (run.checkpoint_root / ".tmp-step-000020").mkdir()  # killed while writing
    half = run.checkpoint_root / "step-000030"  # a directory missing its files
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")
    (run.checkpoint_root / "notes").mkdir()
    assert [c.step for c in run.checkpoints()] == [10]
    assert run.latest_checkpoint().load_train_state() == {"step": 10}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    state = {"w": torch.ones(2)}
    run.save_checkpoint(1, state, state, {"step": 1}, keep_last=3)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RunError, match="could not write checkpoint step 2 .*disk full.*step-000001"):
        run.save_checkpoint(2, state, state, {"step": 2}, keep_last=3)
    assert [c.step for c in run.checkpoints()] == [1]
    assert sorted(p.name for p in run.checkpoint_root.iterdir()) == ["step-000001"]  # no partial directory left


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(shapes_shards: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path / "run")
    train(tiny_config(shapes_shards, 2), run, ENV, QUIET)
    model_cls = registry.get("vqgan").model_cls()
    real_loss = model_cls.loss

    def poisoned(self, batch):  # noqa: ANN001
        out = real_loss(self, batch)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(model_cls, "loss", poisoned)
    with pytest.raises(RunError, match=r"loss became nan .* at step 3; the last good checkpoint is .*step-000002"):
        train(tiny_config(shapes_shards, 4), run, ENV, QUIET)
    assert [c.step for c in run.checkpoints()] == [2]


def _weights(run: RunDir) -> dict[str, torch.Tensor]:
    ckpt = run.latest_checkpoint()
    return {**ckpt.load_weights(ema=False), **{f"ema.{k}": v for k, v in ckpt.load_weights(ema=True).items()}}


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_run_resumes_to_the_same_weights(shapes_shards: Path, tmp_path: Path, workers: int) -> None:
    import signal

    settings = {"ckpt_every": 100, "sample_every": 100, "val_every": 0}
    cfg = tiny_config(shapes_shards, 6, **settings)
    cfg.data.num_workers = workers
    whole = RunDir(tmp_path / "whole")
    train(cfg, whole, ENV, QUIET)

    def preempt(info) -> None:  # noqa: ANN001
        if info.step == 3:
            signal.raise_signal(signal.SIGTERM)  # what a cluster scheduler sends

    parts = RunDir(tmp_path / "parts")
    first = train(cfg, parts, ENV, QUIET, on_step=preempt)
    assert first.stopped_early and first.step == 3 and [c.step for c in parts.checkpoints()] == [3]
    second = train(cfg, parts, ENV, QUIET)
    assert second.step == 6 and not second.stopped_early
    a, b = _weights(whole), _weights(parts)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    state_a = whole.latest_checkpoint().load_train_state()
    state_b = parts.latest_checkpoint().load_train_state()
    assert state_a["scheduler"] == state_b["scheduler"]
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert all(torch.equal(moments_a[n]["exp_avg_sq"], moments_b[n]["exp_avg_sq"]) for n in moments_a)


def test_fid_while_training_is_logged_and_a_resumed_run_logs_and_trains_the_same(shapes_shards: Path, clip_run: Path,
                                                                                   tmp_path: Path) -> None:
    import signal

    settings = {"ckpt_every": 100, "sample_every": 100, "eval_every": 2, "eval_n": 4, "eval_steps": 2,
                "eval_features": "clip", "eval_clip_model": str(clip_run)}
    cfg = tiny_config(shapes_shards, 4, "bitdiff", **settings)
    whole = RunDir(tmp_path / "whole")
    train(cfg, whole, ENV, QUIET)

    def preempt(info) -> None:  # noqa: ANN001
        if info.step == 3:
            signal.raise_signal(signal.SIGTERM)

    parts = RunDir(tmp_path / "parts")
    assert train(cfg, parts, ENV, QUIET, on_step=preempt).step == 3
    train(cfg, parts, ENV, QUIET)

    def fids(run: RunDir) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
        return [(r["step"], r["val_fid"]) for r in records if "val_fid" in r]

    plain = RunDir(tmp_path / "plain")  # the same run without FID
    train(tiny_config(shapes_shards, 4, "bitdiff", ckpt_every=100, sample_every=100), plain, ENV, QUIET)
    a, b, c = _weights(whole), _weights(parts), _weights(plain)
    assert all(torch.equal(a[k], c[k]) for k in a), "evaluating changed the training"
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained differently"
    assert [step for step, _ in fids(whole)] == [2, 4] and all(math.isfinite(f) for _, f in fids(whole))
    assert fids(parts) == fids(whole)  # the same numbers, bit for bit


def test_truncated_checkpoint_is_skipped_on_resume(shapes_shards: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    train(tiny_config(shapes_shards, 4, val_every=0), run, ENV, QUIET)
    latest = run.latest_checkpoint().path / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # the disk filled up mid-write of a copied run
    notes = []
    cfg = tiny_config(shapes_shards, 5, val_every=0)
    from imgen_cli.train.loop import _build

    model, ema, _ = _build(cfg, ENV)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    restored = resume(run, TrainingState(model, ema, opt, sched, torch.amp.GradScaler("cpu", enabled=False)),
                      ENV, notes.append)
    assert restored.step == 2
    assert "step-000004" in notes[0] and "unreadable" in notes[0]
    assert train(cfg, run, ENV, QUIET).step == 5


def test_nan_skip_policy_drops_the_update_then_gives_up(shapes_shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model_cls = registry.get("vqgan").model_cls()
    real_loss = model_cls.loss
    calls = {"n": 0}

    def sometimes_nan(self, batch):  # noqa: ANN001
        out = real_loss(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(model_cls, "loss", sometimes_nan)
    run = RunDir(tmp_path / "run")
    result = train(tiny_config(shapes_shards, 3, nan_policy="skip", val_every=0), run, ENV, QUIET)
    assert result.step == 3 and all(torch.isfinite(v).all() for v in _weights(run).values())

    monkeypatch.setattr(model_cls, "loss", lambda self, batch: {"loss": real_loss(self, batch)["loss"] * float("inf")})
    with pytest.raises(RunError, match="11 non-finite losses in a row"):
        train(tiny_config(shapes_shards, 20, nan_policy="skip", val_every=0), RunDir(tmp_path / "bad"), ENV, QUIET)


def test_activation_checkpointing_gives_the_same_training(shapes_shards: Path, tmp_path: Path) -> None:
    plain, recomputed = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    train(tiny_config(shapes_shards, 2, val_every=0), plain, ENV, QUIET)
    train(tiny_config(shapes_shards, 2, val_every=0, activation_checkpointing=True), recomputed, ENV, QUIET)
    a, b = _weights(plain), _weights(recomputed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_autocast_and_validation_on_cpu(shapes_shards: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    result = train(tiny_config(shapes_shards, 2, precision="bf16", val_every=1), run, ENV, QUIET)
    assert math.isfinite(result.last_loss)
    records = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and all(math.isfinite(r["val_loss"]) for r in val)
    assert all(r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 16) for r in records if "loss" in r)
    assert all(v.dtype == torch.float32 for v in _weights(run).values() if v.is_floating_point())  # fp32 master


def test_sigterm_to_the_cli_writes_a_checkpoint_and_exits_cleanly(shapes_shards: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "imgen_cli", "train", "--model", "vqgan", "--preset", "tiny", "--data",
           str(shapes_shards), "--out", str(run), "--steps", "100000", "--set", "train.batch_size=4",
           "--set", "train.log_every=1", "--set", "data.num_workers=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in err
    steps = [c.step for c in RunDir(run).checkpoints()]
    assert len(steps) == 1 and 1 <= steps[0] < 100000


def test_tensorboard_logging_and_its_missing_package_error(shapes_shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from imgen_cli.errors import UserError

    run = RunDir(tmp_path / "run")
    train(tiny_config(shapes_shards, 2, tensorboard=True, val_every=0), run, ENV, QUIET)
    events = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match="needs the tensorboard package: pip install tensorboard"):
        train(tiny_config(shapes_shards, 2, tensorboard=True), RunDir(tmp_path / "other"), ENV, QUIET)


def test_kill_9_then_the_same_command_resumes_to_the_same_weights(shapes_shards: Path, tmp_path: Path) -> None:
    """What `torchrun --max-restarts` does after a node dies: run the same command again."""
    import subprocess
    import sys
    import time

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "imgen_cli", "train", "--model", "vqgan", "--preset", "tiny", "--data",
                str(shapes_shards), "--out", str(run), "--steps", "60", "--set", "train.batch_size=4",
                "--set", "train.ckpt_every=2", "--set", "train.keep_last=3", "--set", "data.num_workers=0"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(command(whole), capture_output=True, timeout=120).returncode == 0
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(RunDir(killed).checkpoints()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.wait()
    survivors = [c.step for c in RunDir(killed).checkpoints()]
    assert survivors and survivors[-1] < 60, "the run finished before it could be killed"
    again = subprocess.run(command(killed), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming {killed} from step {survivors[-1]}" in " ".join(again.stderr.split())
    a, b = _weights(RunDir(whole)), _weights(RunDir(killed))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run diverged from the uninterrupted one"


def test_compiled_training_matches_eager(shapes_shards: Path, tmp_path: Path) -> None:
    eager, compiled = RunDir(tmp_path / "eager"), RunDir(tmp_path / "compiled")
    train(tiny_config(shapes_shards, 3, val_every=0), eager, ENV, QUIET)
    train(tiny_config(shapes_shards, 3, val_every=0, compile=True), compiled, ENV, QUIET)

    def losses(run: RunDir) -> list[float]:
        return [json.loads(x)["loss"] for x in run.metrics_path.read_text().splitlines()]

    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)


def test_init_starts_a_new_run_from_another_runs_weights(shapes_shards: Path, tmp_path: Path) -> None:
    """`--init RUN`: the new run's network is RUN's and its weights start as RUN's EMA weights (with a vanishing
    learning rate they stay there, where a fresh initialisation is far away); a network they do not fit, and
    `--init-raw` alone, are one sentence each."""
    from conftest import error_line, train_tiny
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from imgen_cli.cli import app

    base = train_tiny("bitdiff", shapes_shards, tmp_path / "base", steps=2)
    args = ["train", "--init", str(base), "--data", str(shapes_shards), "--steps", "1", "--set",
            "train.batch_size=8", "--set", "data.num_workers=0", "--set", "train.lr=1e-12", "--set",
            "train.warmup_steps=0"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft"), "--set", "model.cond_dropout=0.2"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["family"] == "bitdiff" and config["preset"] == "tiny" and config["model"]["cond_dropout"] == 0.2
    start = load_file(base / "checkpoints" / "step-000002" / "ema.safetensors")
    tuned = load_file(tmp_path / "ft" / "checkpoints" / "step-000001" / "model.safetensors")
    assert set(tuned) == set(start)
    assert all(torch.allclose(tuned[k].float(), start[k].float(), atol=1e-6) for k in start)
    resized = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "wide"), "--set", "model.width=48"])
    assert resized.exit_code == 2 and "its weights do not fit this network" in error_line(resized)
    # a recipe given with --recipe changes the network as --set does; the family's default recipe (cond_dropout
    # 0.1, a network from scratch) does not
    recipe = tmp_path / "few.toml"
    recipe.write_text('family = "bitdiff"\n[model]\ncond_dropout = 0.0\n[train]\nlr = 1e-12\n')
    again = ["train", "--init", str(tmp_path / "ft"), "--data", str(shapes_shards), "--steps", "1", "--set",
             "train.batch_size=8", "--set", "data.num_workers=0"]
    for out, extra, dropout in (("default", [], 0.2), ("recipe", ["--recipe", str(recipe)], 0.0)):
        result = CliRunner().invoke(app, [*again, *extra, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / out / "config.json").read_text())["model"]["cond_dropout"] == dropout
    recipe.write_text('family = "bitdiff"\n[model]\nwidth = 48\n')
    wider = CliRunner().invoke(app, [*again, "--recipe", str(recipe), "--out", str(tmp_path / "wider")])
    assert wider.exit_code == 2 and "its weights do not fit this network" in error_line(wider)
    alone = CliRunner().invoke(app, ["train", "--model", "bitdiff", "--init-raw", "--out", str(tmp_path / "r")])
    assert alone.exit_code == 2 and "--init-raw goes with --init" in error_line(alone)


def test_init_on_a_finer_token_grid_interpolates_the_position_tables(vq_run: Path, vq_shards: Path,
                                                                     tmp_path: Path) -> None:
    """A Muse started from a run on a 4x4 grid with model.grid=8 (a token grid twice as fine): every weight loads,
    the row and column tables are stretched along the positions (their ends kept, the rest interpolated), and
    the note says so."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from imgen_cli.cli import app
    from imgen_cli.train.checkpoint import init_weights

    base = tmp_path / "base"
    result = CliRunner().invoke(app, ["train", "--model", "muse", "--preset", "tiny", "--vq", str(vq_run), "--data",
                                      str(vq_shards), "--out", str(base), "--steps", "1", "--set",
                                      "train.batch_size=8", "--set", "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    source = str(base / "checkpoints" / "step-000001")
    start = load_file(Path(source) / "ema.safetensors")
    fam = registry.get("muse")
    saved = json.loads((base / "config.json").read_text())["model"]
    finer = fam.build(fam.config_cls()(**{**saved, "grid": 8, "vq": ""}))
    notes: list[str] = []
    loaded = init_weights(source, "ema", finer.state_dict(), finer.position_tables, notes.append)
    finer.load_state_dict(loaded)
    for key in ("embed.rows", "embed.cols"):
        old = start[key]
        x = torch.arange(8) * 3 / 7  # new position i sits at old position 3i/7 (the ends on the ends)
        low, frac = x.floor().long(), (x - x.floor())[:, None]
        expected = old[low] * (1 - frac) + old[(low + 1).clamp(max=3)] * frac
        assert loaded[key].shape == (8, old.shape[1]) and torch.allclose(loaded[key], expected, atol=1e-6)
    assert all(torch.equal(loaded[k], v) for k, v in start.items() if k not in ("embed.rows", "embed.cols"))
    assert "embed.rows: 4 -> 8 positions, interpolated" in notes[0]
    other = CliRunner().invoke(app, ["train", "--init", str(base), "--data", str(vq_shards), "--out",
                                     str(tmp_path / "wide"), "--steps", "1", "--set", "model.width=96"])
    assert other.exit_code == 2 and "do not fit this network" in other.output
