import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from imgen_cli import registry
from imgen_cli.config import resolve
from imgen_cli.errors import RunError
from imgen_cli.runs import RunDir
from imgen_cli.train.distributed import DistEnv
from imgen_cli.train.loop import _resume, make_optimizer, train, warmup_cosine

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
QUIET = Console(file=open("/dev/null", "w"))  # noqa: SIM115


def tiny_config(shards: Path, steps: int, **train: object):
    fam = registry.get("vqgan")
    sets = [f"train.{k}={json.dumps(v)}" for k, v in {"batch_size": 4, "warmup_steps": 2, "log_every": 1,
                                                      "ckpt_every": 2, "sample_every": 2, "keep_last": 2,
                                                      **train}.items()]
    return resolve("vqgan", fam.config_cls(), fam.presets(), preset="tiny",
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
    step = _resume(ckpt, model, ema, opt, sched, ENV)
    assert step == 4 and ema.updates == 4 and sched.last_epoch == 4
    saved_model, saved_ema = ckpt.load_weights(ema=False), ckpt.load_weights(ema=True)
    assert all(torch.equal(v, saved_model[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved_ema[k]) for k, v in ema.state_dict().items())
    assert any(not torch.equal(saved_model[k], saved_ema[k]) for k in saved_model)  # EMA is its own copy
    saved_opt = ckpt.load_train_state()["optimizer"]
    assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in saved_opt["state"].items())

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
    with pytest.raises(OSError):
        run.save_checkpoint(2, state, state, {"step": 2}, keep_last=3)
    assert [c.step for c in run.checkpoints()] == [1]
    assert not (run.checkpoint_root / "step-000002").exists()


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
