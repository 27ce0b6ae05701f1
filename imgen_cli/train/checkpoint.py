"""Saving and restoring everything a run needs to continue exactly: weights, EMA, optimizer, LR
schedule, grad scaler, step and the RNG state of every rank.

State dicts go through torch.distributed.checkpoint's full-state-dict API, which works the same on
a plain module, a DDP replica and an FSDP2-sharded model: rank 0 writes one safetensors file per
weight set, so a run trained on 64 GPUs samples on one.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from imgen_cli.errors import UserError
from imgen_cli.nn import lora
from imgen_cli.runs import Checkpoint, RunDir
from imgen_cli.train.distributed import DistEnv, gather_objects
from imgen_cli.train.ema import EMA

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
TRAIN_STATE_KEYS = {"step", "optimizer", "scheduler", "scaler", "ema_updates", "world_size", "rng"}
_LOAD = StateDictOptions(full_state_dict=True)
_LOAD_ADAPTERS = StateDictOptions(full_state_dict=True, strict=False)  # the base is not in a LoRA checkpoint


@dataclass
class TrainingState:
    """The objects a checkpoint captures, besides the step."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    adapters_only: bool = False  # a LoRA run: checkpoints hold the adapters, the base comes from train.init


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy arrays do not load under weights_only=True; a tensor does
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run: RunDir, step: int, state: TrainingState, env: DistEnv, keep_last: int) -> Checkpoint | None:
    """Collective: every rank takes part (FSDP gathers shards, RNG states are gathered); rank 0 writes."""
    model_sd = get_model_state_dict(state.model, options=_FULL)
    ema_sd = get_model_state_dict(state.ema.module, options=_FULL)
    if state.adapters_only:
        model_sd, ema_sd = lora.adapter_state(model_sd), lora.adapter_state(ema_sd)
    optim_sd = get_optimizer_state_dict(state.model, state.optimizer, options=_FULL)
    rng = gather_objects(capture_rng(), env)  # every rank's, so each resumes its own stream
    checkpoint = None
    if env.is_main:
        train_state = {"step": step, "optimizer": optim_sd, "scheduler": state.scheduler.state_dict(),
                       "scaler": state.scaler.state_dict(), "ema_updates": state.ema.updates,
                       "world_size": env.world_size, "rng": rng}
        checkpoint = run.save_checkpoint(step, model_sd, ema_sd, train_state, keep_last)
    if env.distributed:
        dist.barrier()
    return checkpoint


def resume(run: RunDir, state: TrainingState, env: DistEnv, warn: Any) -> Checkpoint | None:
    """Restore from the newest checkpoint that reads back whole; unreadable ones are skipped with a warning."""
    for ckpt in reversed(run.checkpoints()):
        try:  # read everything before touching the live objects, so a bad file changes nothing
            model_sd, ema_sd = ckpt.load_weights(ema=False), ckpt.load_weights(ema=True)
            train_state = ckpt.load_train_state()
        except (SafetensorError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
            warn(f"checkpoint {ckpt.path} is unreadable ({type(err).__name__}: {err}); trying the one before")
            continue
        missing = TRAIN_STATE_KEYS - set(train_state) if isinstance(train_state, dict) else TRAIN_STATE_KEYS
        if missing:
            warn(f"checkpoint {ckpt.path} has a damaged train_state.pt (no {', '.join(sorted(missing))}); "
                 "trying the one before")
            continue
        options = _LOAD_ADAPTERS if state.adapters_only else _LOAD
        set_model_state_dict(state.model, model_sd, options=options)
        set_model_state_dict(state.ema.module, ema_sd, options=options)
        state.ema.updates = train_state["ema_updates"]
        set_optimizer_state_dict(state.model, state.optimizer, train_state["optimizer"], options=_LOAD)
        state.scheduler.load_state_dict(train_state["scheduler"])
        state.scaler.load_state_dict(train_state["scaler"])
        rngs = train_state["rng"]
        if len(rngs) == env.world_size:
            restore_rng(rngs[env.rank])
        else:  # another world size: the old per-rank streams cannot map over; start fresh distinct ones
            torch.manual_seed(int(train_state["step"]) * 1000 + env.rank)
        return Checkpoint(ckpt.path, int(train_state["step"]))
    return None


def init_weights(source: str, weights: str, own: dict[str, torch.Tensor], positions: tuple[str, ...] = (),
                 note: Any = None) -> dict[str, torch.Tensor]:
    """`train.init`: the weights ("ema" or "raw") of the checkpoint `source` for a network whose state dict is
    `own`. A position table of `positions` of another length is stretched to this network's (linear
    interpolation: a finer token grid); tensors this network has and the source lacks keep their initialisation,
    and the source's tensors this network lacks are left out, each listed through `note`. Any other tensor of
    another shape is a network the weights do not fit: one sentence."""
    import torch.nn.functional as F

    from imgen_cli.runs import resolve_run, weights_file

    _, ckpt = resolve_run(source, flag="--init")
    try:
        loaded = ckpt.load_weights(ema=weights == "ema")
    except (SafetensorError, OSError) as err:
        raise UserError(f"--init {source}: {weights_file(ckpt.path, weights == 'ema')} is damaged ({err}).") from None
    resized = sorted(k for k in own.keys() & loaded.keys() if own[k].shape != loaded[k].shape)
    stretchable = [k for k in resized if k in positions and own[k].dim() == 2 and own[k].shape[1] == loaded[k].shape[1]]
    unfit = sorted(set(resized) - set(stretchable))
    if unfit:
        raise UserError(f"--init {source}: its weights do not fit this network ({len(unfit)} of another shape, e.g. "
                        f"{unfit[0]} {tuple(loaded[unfit[0]].shape)} for {tuple(own[unfit[0]].shape)}); leave the "
                        f"model's shape as the run it starts from has it.")
    kept = {k: v for k, v in loaded.items() if k in own}
    for key in stretchable:
        table = loaded[key].float().T[None]  # [1, width, positions]
        kept[key] = F.interpolate(table, size=own[key].shape[0], mode="linear", align_corners=True)[0].T.to(own[key])
    report = [*(f"{k}: {loaded[k].shape[0]} -> {own[k].shape[0]} positions, interpolated" for k in stretchable),
              *(f"{k}: not in {source}, initialised as the family does" for k in sorted(own.keys() - loaded.keys())),
              *(f"{k}: not in this network, left out" for k in sorted(loaded.keys() - own.keys()))]
    if report and note is not None:
        note(f"--init {source}: " + "; ".join(report))
    return {**own, **kept}


def adapt_base(model: nn.Module, train: Any, note: Any = None) -> None:
    """A LoRA run's network, in place: its base's weights (`train.init`) loaded, then the adapters wrapped around
    them (the training loop's start, and every later load of the run)."""
    model.load_state_dict(init_weights(train.init, train.init_weights, model.state_dict(), model.position_tables,
                                       note))
    lora.add_adapters(model, train.lora, train.lora_alpha, train.lora_targets, train.lora_text)


def start_from(state: TrainingState, source: str, weights: str, note: Any) -> None:
    """A new full fine-tuning run's model and its EMA start as the `train.init` weights; the optimizer, schedule
    and step start fresh."""
    loaded = init_weights(source, weights, get_model_state_dict(state.model, options=_FULL),
                          state.model.position_tables, note)
    set_model_state_dict(state.model, loaded, options=_LOAD)
    set_model_state_dict(state.ema.module, loaded, options=_LOAD)
    note(f"starting from {source} (its {weights} weights; a fresh optimizer, schedule and step)")
