"""The one training loop every family shares.

It speaks only the family contract: `model.loss(batch) -> {"loss": ..., parts...}` and
`model.preview(batch) -> images` (plus the optional `block_types`, the units to shard and
recompute, and `tokens_per_sample`). Everything a long run needs sits here in plain sight, in order:
seeding, the model and its parallel wrapping, optimizer and schedule, EMA, resume, data, then per
step: accumulation, clipping, the NaN guard, logging, validation, sample grids, checkpoints, and a
clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn
from torch.distributed.tensor import DTensor

from imgen_cli import registry
from imgen_cli.config import RunConfig
from imgen_cli.data import shards as shard_io
from imgen_cli.errors import RunError, UserError
from imgen_cli.runs import Checkpoint, RunDir
from imgen_cli.train import checkpoint
from imgen_cli.train.distributed import DistEnv, all_agree, apply_activation_checkpointing, shard_fsdp
from imgen_cli.train.ema import EMA
from imgen_cli.train.monitor import Monitor

MAX_BAD_STEPS_IN_A_ROW = 10


@dataclass
class TrainResult:
    step: int
    last_loss: float
    checkpoint: Checkpoint | None
    stopped_early: bool
    seconds: float


@dataclass
class StepInfo:
    """Handed to the optional `on_step` callback after every optimizer step."""

    step: int
    model: nn.Module
    keys: list[str]  # the samples this rank trained on in this step
    parts: dict[str, float]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and kernels, never on biases or norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=device.type == "cuda")


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


class _LossForward(nn.Module):
    """Routes `forward` to the family's `loss`, so DDP's gradient hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


class _StopRequest:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and leave after this step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _build(cfg: RunConfig, env: DistEnv,
           note: Callable[[str], None] = lambda message: None) -> tuple[nn.Module, EMA, nn.Module]:
    """The model, its EMA and the module the loop calls (plain, DDP or FSDP2; compiled on request)."""
    family = registry.get(cfg.family)
    device = env.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; convolutions already use it
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = family.build(cfg.model)
    if cfg.train.lora:  # the base first, then the adapters around it (the only weights that train)
        checkpoint.adapt_base(model, cfg.train, note)
    model = model.to(device)
    # before sharding, so both shard alike; a fine-tune's average starts at the trained weights it keeps
    ema = EMA(model, cfg.train.ema_decay, warmup=not cfg.train.init)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    fsdp = cfg.train.parallel == "fsdp"
    if fsdp and not env.distributed:
        raise UserError("train.parallel=fsdp needs several processes: launch with torchrun.")
    if fsdp:
        bf16 = autocast_dtype(cfg, device) == torch.bfloat16
        shard_fsdp(model, bf16)
        shard_fsdp(ema.module, bf16)
    net: nn.Module = _LossForward(model)
    if env.distributed and not fsdp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net.compile()
    return model, ema, net


def train(cfg: RunConfig, run: RunDir, env: DistEnv, console: Console,
          on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
    device = env.device
    accum = cfg.train.grad_accum
    per_rank, rem = divmod(cfg.train.batch_size, env.world_size * accum)
    if rem or per_rank == 0:
        raise UserError(f"train.batch_size {cfg.train.batch_size} must be a multiple of ranks x grad_accum "
                        f"({env.world_size} x {accum}).")
    from_prior = round(per_rank * cfg.data.prior_share)  # prior preservation: this many of each batch
    if cfg.data.prior and not 0 < from_prior < per_rank:
        raise UserError(f"data.prior_share {cfg.data.prior_share} of a batch of {per_rank} per rank leaves no "
                        f"room for {'the prior' if from_prior == 0 else 'the data'}; change the share or the batch.")
    train_shards = shard_io.open_shards(cfg.data.shards, "train")
    fixed = registry.get(cfg.family).trains_at_image_size  # the others resize each batch, or encode it
    if fixed and train_shards.image_size and train_shards.image_size != cfg.model.image_size:
        raise UserError(f"model.image_size is {cfg.model.image_size} but {cfg.data.shards} holds "
                        f"{train_shards.image_size}px images; re-tokenize with --size {cfg.model.image_size} "
                        f"or --set model.image_size={train_shards.image_size}.")
    drawn = (per_rank - from_prior) * env.world_size * accum  # what a step draws from data.shards
    if train_shards.count and drawn > train_shards.count:
        share = f" less its data.prior_share {cfg.data.prior_share} ({drawn} a step)" if cfg.data.prior else ""
        raise UserError(f"train.batch_size {cfg.train.batch_size}{share} is larger than the {train_shards.count} "
                        f"training images in {cfg.data.shards}; lower it (--set train.batch_size=N).")

    model, ema, net = _build(cfg, env, lambda m: console.print(m, markup=False, highlight=False)
                             if env.is_main else None)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    state = checkpoint.TrainingState(model, ema, optimizer, scheduler, scaler, adapters_only=cfg.train.lora > 0)

    monitor = Monitor(run, console, env.is_main, cfg.train.steps, cfg.train.tensorboard)
    if env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        for name in run.clean_leftovers():
            monitor.note(f"removed {run.checkpoint_root / name}, left incomplete by an earlier run")
    saved = checkpoint.resume(run, state, env, monitor.note)
    step = saved.step if saved else 0
    if env.is_main:
        run.truncate_metrics(step)  # what was logged after the checkpoint is logged again from here
    if cfg.train.lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        monitor.note(f"LoRA rank {cfg.train.lora} on {cfg.train.init}: {trainable:,} of "
                     f"{sum(p.numel() for p in model.parameters()):,} parameters train")
    if saved:
        monitor.note(f"resuming {run.path} from step {step}")
    else:
        if cfg.train.init and not cfg.train.lora:
            checkpoint.start_from(state, cfg.train.init, cfg.train.init_weights, monitor.note)
        random.seed(cfg.train.seed + env.rank)
        np.random.seed(cfg.train.seed + env.rank)
        torch.manual_seed(cfg.train.seed + env.rank)  # different noise, masks, timesteps per rank
    monitor.begin_at(step)
    val_shards = _val_shards(cfg, monitor.note)
    if cfg.train.eval_every and val_shards is not None:
        with _rng_kept(env):  # loading a CLIP model initialises its layers from the training RNG first
            _check_fid_features(cfg, device)  # a missing network is one sentence now, not after eval_every steps

    preview_batch = next(iter(shard_io.exact_loader(val_shards or train_shards, 8)))
    remaining = cfg.train.steps - step

    def loader_of(shards: shard_io.ShardSet, size: int, seed: int) -> Any:
        return shard_io.train_loader(
            shards, size, max(remaining, 0) * accum, seed=seed, rank=env.rank, world_size=env.world_size,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, start_batch=step * accum,
            replay=cfg.data.resume == "replay")

    loader = loader_of(train_shards, per_rank - from_prior, cfg.train.seed)
    if cfg.data.prior:  # a stream of its own (another seed), so both resume exactly
        prior = shard_io.open_shards(cfg.data.prior, "train")
        loader = shard_io.mixed(loader, loader_of(prior, from_prior, cfg.train.seed + 1))
    dtype = autocast_dtype(cfg, device)
    monitor.note(f"{cfg.family}/{cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"global batch {cfg.train.batch_size} = {env.world_size} rank(s) x {per_rank} x {accum} "
                 f"accumulation, {remaining} steps to go on {device.type} "
                 f"({cfg.train.parallel if env.distributed else 'one process'}, "
                 f"{str(dtype).removeprefix('torch.') if dtype else 'fp32'})")

    started = time.time()
    last_loss, bad_in_a_row = math.nan, 0
    sums: dict[str, float] = {}
    window_start, window_steps = time.time(), 0
    batches = _apart_from_the_training_rng(loader)
    with _StopRequest() as stop, monitor:
        while step < cfg.train.steps:
            net.train()
            parts, keys = _accumulate(net, batches, cfg, device, scaler)
            scaler.unscale_(optimizer)
            grad_norm = _clip(model, cfg.train.grad_clip)
            # fp16: an inf gradient is the scaler's business (it skips that step and lowers the scale)
            finite = math.isfinite(parts["loss"]) and (scaler.is_enabled() or math.isfinite(grad_norm))
            if not all_agree(not finite, env):
                scaler.step(optimizer)
                bad_in_a_row = 0
            else:
                where = f"; the last good checkpoint is {saved.path}" if saved else ""
                if cfg.train.nan_policy == "stop":
                    raise RunError(f"loss became {parts['loss']} (grad norm {grad_norm:.3g}) "
                                   f"at step {step + 1}{where}.")
                bad_in_a_row += 1
                monitor.note(f"step {step + 1}: loss {parts['loss']}, update skipped")
                if bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                    raise RunError(f"{bad_in_a_row} non-finite losses in a row up to step {step + 1}{where}.")
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
            step += 1
            last_loss = parts["loss"]
            window_steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if on_step is not None:
                on_step(StepInfo(step, model, keys, parts))

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = max(time.time() - window_start, 1e-9)
                record = {"step": step, **{k: v / window_steps for k, v in sums.items()},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "samples_per_s": window_steps * cfg.train.batch_size / elapsed, "time": round(time.time(), 3)}
                if model.tokens_per_sample:
                    record["tokens_per_s"] = record["samples_per_s"] * model.tokens_per_sample
                if device.type == "cuda":
                    record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                monitor.log(record)
                sums, window_start, window_steps = {}, time.time(), 0
            if val_shards and cfg.train.val_every and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
                monitor.log({"step": step, "val_loss": _validate(model, val_shards, cfg, env, per_rank)})
            if cfg.train.eval_every and val_shards and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                monitor.log({"step": step, "val_fid": _fid(ema.module, cfg, run, env)})
            if step % cfg.train.sample_every == 0 or step == cfg.train.steps:
                _save_grid(ema.module, preview_batch, run, step, env, cfg)
            stopping = all_agree(stop.signal is not None, env)  # every rank stops on the same step
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopping:
                saved = checkpoint.save(run, step, state, env, cfg.train.keep_last)
            if stopping:
                monitor.note(f"stopped by signal at step {step}; checkpoint {saved.path.name if saved else ''} written")
                break
    seconds = time.time() - started
    monitor.note(f"done: step {step}, loss {last_loss:.4f}, {seconds:.0f}s, run {run.path}")
    return TrainResult(step, last_loss, saved, step < cfg.train.steps, seconds)


def _apart_from_the_training_rng(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, fetched without touching the training RNG: torch's DataLoader draws its base seed
    from it on the first next(), which a resumed run makes at its first step, not at step 0, and which would
    shift all its noise, masks and timesteps by one draw against the uninterrupted run."""
    with torch.random.fork_rng(devices=[]):
        batches = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _accumulate(net: nn.Module, batches: Any, cfg: RunConfig, device: torch.device,
                scaler: torch.amp.GradScaler) -> tuple[dict[str, float], list[str]]:
    """grad_accum forward/backward passes; DDP all-reduces gradients only on the last one."""
    parts: dict[str, float] = {}
    keys: list[str] = []
    accum = cfg.train.grad_accum
    for micro in range(accum):
        try:
            raw = next(batches)
        except StopIteration:
            raise RunError("the data loader ran dry before the last step.") from None
        except RunError as err:  # from a loader worker, it arrives wrapped in the worker's traceback
            raise RunError(str(err).rsplit("RunError: ", 1)[-1].strip()) from None
        keys += raw["key"]
        batch = shard_io.to_device(raw, device)
        is_ddp = isinstance(net, nn.parallel.DistributedDataParallel)
        with net.no_sync() if is_ddp and micro < accum - 1 else contextlib.nullcontext(), _out_of_memory(cfg, raw):
            with autocast(cfg, device):
                out = net(batch)
            scaler.scale(out["loss"].float() / accum).backward()
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) / accum
    return parts, keys


@contextlib.contextmanager
def _out_of_memory(cfg: RunConfig, raw: dict[str, Any]) -> Any:
    """An allocation the batch does not fit in (CUDA, or the CPU allocator) as one sentence naming the remedy."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in str(err):
            raise
        raise RunError(f"out of memory with {len(raw['key'])} samples per rank and step (train.batch_size "
                       f"{cfg.train.batch_size}, train.grad_accum {cfg.train.grad_accum}); lower train.batch_size "
                       "or raise train.grad_accum.") from None


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if isinstance(norm, DTensor):  # FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _val_shards(cfg: RunConfig, note: Callable[[str], None]) -> shard_io.ShardSet | None:
    try:
        return shard_io.open_shards(cfg.data.shards, "val")
    except UserError:
        if cfg.train.val_every or cfg.train.eval_every:
            note(f"{cfg.data.shards} has no val split: no validation loss or FID this run (train.val_every, "
                 f"train.eval_every)")
        return None


@torch.no_grad()
def _validate(model: nn.Module, shards: shard_io.ShardSet, cfg: RunConfig, env: DistEnv, per_rank: int) -> float:
    """Mean loss over the val split (each sample once across ranks). Ranks may hold uneven counts, so
    under FSDP, whose forward is a collective, ranks that ran out repeat their last batch at weight 0."""
    model.eval()
    lock_step = env.distributed and cfg.train.parallel == "fsdp"
    total = torch.zeros(2, device=env.device, dtype=torch.float64)
    batches = iter(shard_io.exact_loader(shards, per_rank, rank=env.rank, world_size=env.world_size))
    last, done = None, 0
    while True:
        raw = next(batches, None) if not cfg.train.val_max_batches or done < cfg.train.val_max_batches else None
        if lock_step and not all_agree(raw is not None, env):
            break
        if raw is None and not lock_step:
            break
        batch = raw if raw is not None else last
        if batch is None:
            batch = next(iter(shard_io.exact_loader(shards, per_rank)))
        with autocast(cfg, env.device):
            loss = model.loss(shard_io.to_device(batch, env.device))["loss"].double()
        if raw is not None:
            total += torch.stack([loss * len(raw["key"]), torch.tensor(len(raw["key"]), device=env.device)])
            last, done = raw, done + 1
    if env.distributed:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _check_fid_features(cfg: RunConfig, device: torch.device) -> None:
    """The network FID while training looks through can be had: the Inception weights (fetched into the torch hub
    cache if they are not there) or the CLIP model."""
    from imgen_cli.eval import features

    if cfg.train.eval_features == "inception":
        features.inception_weights_path(cfg.train.eval_inception_weights or None)
    else:
        features.load_clip(cfg.train.eval_clip_model or None, device)


def _fid(ema_model: nn.Module, cfg: RunConfig, run: RunDir, env: DistEnv) -> float:
    """FID of cfg.train.eval_n EMA samples against the val split: `imgen eval --fid`'s evaluation (generation split
    across ranks, reference features cached beside the shards), the training RNG left as it was, so a resumed run
    logs and trains exactly as an uninterrupted one."""
    from imgen_cli.eval.generative import EvalRequest, evaluate
    from imgen_cli.sample import SamplingOptions

    t = cfg.train
    sampling = SamplingOptions(steps=(t.eval_steps or None,), guidance=None if t.eval_guidance < 0 else t.eval_guidance,
                               seed=t.seed)
    request = EvalRequest(fid=True, features=t.eval_features, inception_weights=t.eval_inception_weights or None,
                          clip_model=t.eval_clip_model or None, n=t.eval_n, sampling=sampling)

    @contextlib.contextmanager
    def silent(label: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda advance: None

    with _rng_kept(env):
        # a class-conditional run's names are in its config.json (`imgen train` writes it before training)
        class_names = run.read_config().get("classes") if run.exists() else None
        report = evaluate(request, cfg.data.shards, env, silent, lambda message: None, model=ema_model,
                          class_names=class_names)
    return report["rows"][0]["fid"]


@contextlib.contextmanager
def _rng_kept(env: DistEnv) -> Iterator[None]:
    """Every random state a training step or its data stream reads (torch's, and Python's and numpy's, which a
    loader without workers shuffles with in this process) as it was before the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _save_grid(ema_model: nn.Module, batch: dict[str, Any], run: RunDir, step: int, env: DistEnv,
               cfg: RunConfig) -> None:
    """Rank 0 writes the grid; under FSDP every rank runs preview, which is then a collective."""
    if not env.is_main and cfg.train.parallel != "fsdp":
        return
    from torchvision.utils import save_image

    with autocast(cfg, env.device):
        images = ema_model.preview(shard_io.to_device(batch, env.device))
    if env.is_main:
        run.samples_dir.mkdir(parents=True, exist_ok=True)
        save_image(images.float().cpu(), run.samples_dir / f"step-{step:06d}.png", nrow=len(batch["caption"]))
