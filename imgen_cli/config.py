"""Run configuration: TOML recipes, size presets, `--set key=value` overrides, typed dataclasses.

A run's configuration has three sections, each a dataclass: `model` (the family's own config class),
`train` (the shared loop) and `data` (where batches come from). Values are layered, later wins:

    dataclass defaults < recipe file < size preset (--preset) < --set key=value < explicit flags (--steps, ...)

A recipe may name its own preset; that preset is then the base the recipe's [model] table refines,
while a --preset on the command line overrides the recipe.

Every key is checked against the dataclass fields, so a typo is an error that names the key and the
valid ones, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgen_cli.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("model", "train", "data")
MAX_STEPS = 10**12  # far beyond any run; keeps step counts inside the int64 every loader and counter uses
MAX_SEED = 2**31 - 1  # numpy takes seeds below 2**32, and each rank seeds with seed + rank


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch: split across ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (with a grad scaler) | fp32
    parallel: str = "ddp"  # ddp | fsdp (FSDP2: each block sharded, for models too big for one GPU)
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    nan_policy: str = "stop"  # stop | skip (drop the update, stop after 10 bad steps in a row)
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500
    val_every: int = 0  # held-out loss on the val split every N steps; 0 = never
    val_max_batches: int = 0  # cap on val batches per rank; 0 = the whole split
    # FID while training: every eval_every steps the EMA model generates eval_n images for the val captions (or
    # classes), scored against the val split's images as `imgen eval --fid` scores them; 0 = never
    eval_every: int = 0
    eval_n: int = 500
    eval_steps: int = 0  # the sampler's steps; 0 = the family's default
    eval_guidance: float = -1.0  # the guidance scale; < 0 = the run's default
    eval_features: str = "inception"  # inception | clip (FID in the space of eval_clip_model)
    eval_inception_weights: str = ""  # "" = the torch hub cache (as `imgen eval --inception-weights`)
    eval_clip_model: str = ""  # eval_features=clip: `imgen eval --clip-model`'s value ("" = the newest clip run)
    keep_last: int = 3  # complete checkpoints kept on disk
    tensorboard: bool = False  # also log to RUN/tensorboard (needs the tensorboard package)
    init: str = ""  # a new run starts from this checkpoint's weights (`imgen train --init RUN`); "" = from scratch
    init_weights: str = "ema"  # which of them: ema | raw (--init-raw)
    lora: int = 0  # > 0: train rank-r LoRA adapters on the --init run's network instead of all of it (--lora R)
    lora_alpha: float = 0.0  # the adapters' scale is alpha / r; 0 = r (scale 1)
    lora_targets: tuple[str, ...] = ()  # linear layers adapted (names or suffixes); () = attention and MLP layers
    lora_text: bool = False  # LoRA on the text encoder's attention projections too

    def validate(self) -> None:
        _positive(self, "train", ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every",
                                  "sample_every", "keep_last"))
        if self.steps > MAX_STEPS:
            raise UserError(f"train.steps must be at most {MAX_STEPS:,}, got {self.steps:,}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"train.seed must be in [0, {MAX_SEED}], got {self.seed}.")
        if self.lr <= 0:
            raise UserError(f"train.lr must be positive, got {self.lr}.")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}.")
        for name, choices in (("precision", ("auto", "bf16", "fp16", "fp32")), ("parallel", ("ddp", "fsdp")),
                              ("nan_policy", ("stop", "skip")), ("init_weights", ("ema", "raw"))):
            if getattr(self, name) not in choices:
                raise UserError(f"train.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        if self.lora < 0 or self.lora_alpha < 0:
            raise UserError("train.lora (the adapters' rank) and train.lora_alpha must not be negative.")
        if self.lora_text and not self.lora:
            raise UserError("train.lora_text adds adapters to the text encoder of a LoRA run: give --lora R too.")
        if self.lora and not self.init:
            raise UserError("train.lora adapts a trained network: give its run with --init RUN.")
        if min(self.warmup_steps, self.grad_clip, self.val_every, self.val_max_batches, self.eval_every) < 0:
            raise UserError("train.warmup_steps, grad_clip, val_every, val_max_batches and eval_every must not be "
                            "negative.")
        if self.eval_every and (self.eval_n < 2 or self.eval_steps < 0 or self.eval_features not in ("inception",
                                                                                                    "clip")):
            raise UserError("FID while training needs train.eval_n >= 2, train.eval_steps >= 0 (0 = the family's "
                            "default) and train.eval_features inception or clip.")
        if self.eval_every and self.parallel == "fsdp":
            raise UserError("train.eval_every generates with the EMA model split across ranks, which FSDP's sharded "
                            "forward (a collective) cannot do; evaluate the checkpoints with imgen eval instead.")


@dataclass
class DataConfig:
    shards: str = "shards"  # a tokenize output dir, or a shard list: glob, {a..b}, pipe:CMD (runs CMD in a shell)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # on resume: "replay" fast-forwards the stream past the batches already seen (exact: the run continues
    # as if never stopped; re-reads, but does not decode, those samples); "reseed" starts a fresh stream
    resume: str = "replay"
    # prior preservation while fine-tuning on a few images: a second shard set (the base model's samples of
    # the class, or its original data) supplying `prior_share` of every batch
    prior: str = ""
    prior_share: float = 0.0

    def validate(self) -> None:
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise UserError("data.num_workers must be >= 0 and data.shuffle_buffer >= 1.")
        if not 0 <= self.prior_share < 1 or bool(self.prior) != (self.prior_share > 0):
            raise UserError(f"data.prior (shards) and data.prior_share (the part of every batch they supply, in "
                            f"(0, 1)) go together; got {self.prior!r} and {self.prior_share}.")
        if self.resume not in ("replay", "reseed"):
            raise UserError(f"data.resume must be replay or reseed, got {self.resume!r}.")


@dataclass
class RunConfig:
    family: str
    preset: str
    model: Any  # the family's config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "preset": self.preset,
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
        }


def _positive(obj: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise UserError(f"{section}.{name} must be at least 1, got {getattr(obj, name)}.")


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist.")
    try:
        recipe = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {path} is not valid TOML: {err}.") from None
    allowed = {"family", "preset", *SECTIONS}
    for key, value in recipe.items():
        if key not in allowed:
            raise UserError(f"recipe {path} has an unknown key {key!r}; valid keys: {', '.join(sorted(allowed))}.")
        if key in SECTIONS and not isinstance(value, dict):
            raise UserError(f"recipe {path}: {key!r} must be a table ([{key}]).")
    return recipe


def parse_set(assignment: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4). Values are read as TOML, falling back to a plain string."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value (for example train.lr=1e-4), got {assignment!r}.")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    if key in ("family", "preset"):
        tree[key] = value
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"{origin}: unknown key {key!r}; keys look like model.NAME, train.NAME or data.NAME.")
    tree.setdefault(parts[0], {})[parts[1]] = value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise UserError(f"{key} has the wrong type: {value!r}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}.")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise UserError(f"{key} must have {len(args)} entries, got {len(value)}.")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key} must be an integer, got {value!r}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # a nan lr or inf weight would only surface later, as a traceback or NaNs
                raise UserError(f"{key} must be a finite number, got {value!r}.")
            return float(value)
        raise UserError(f"{key} must be a number, got {value!r}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key} must be a string, got {value!r}.")
    return value


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"unknown key {section}.{key}; valid keys in [{section}]: {', '.join(names)}.")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    obj = cls(**kwargs)
    obj.validate()  # every section's dataclass checks its own values (the model configs, TrainConfig, DataConfig)
    return obj


def resolve(
    family_name: str,
    model_class: type,
    presets: dict[str, dict[str, Any]],
    *,
    recipe: dict[str, Any] | None = None,
    preset: str | None = None,
    sets: list[str] = (),
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Layer recipe < preset < --set < flags into a validated RunConfig."""
    tree: dict[str, Any] = {s: {} for s in SECTIONS}
    recipe = recipe or {}
    chosen = preset or recipe.get("preset") or "small"
    if chosen not in presets:
        raise UserError(f"unknown preset {chosen!r} for {family_name}; choose one of: {', '.join(presets)}.")
    if preset is None:  # the recipe's own preset is its starting point, which its [model] table refines
        tree["model"].update(presets[chosen])
    for section in SECTIONS:
        tree[section].update(recipe.get(section, {}))
    if preset is not None:  # a preset named on the command line overrides the recipe
        tree["model"].update(presets[chosen])
    preset = chosen
    for assignment in sets:
        key, value = parse_set(assignment)
        if key in ("family", "preset"):
            raise UserError(f"--set cannot change {key}; use --model or --preset.")
        _set_dotted(tree, key, value, "--set")
    for key, value in (flags or {}).items():
        if value is None:
            continue
        _set_dotted(tree, key, value, "flag")
    return RunConfig(
        family=family_name,
        preset=preset,
        model=build_dataclass(model_class, tree["model"], "model"),
        train=build_dataclass(TrainConfig, tree["train"], "train"),
        data=build_dataclass(DataConfig, tree["data"], "data"),
    )


def defaults(cls: type) -> dict[str, Any]:
    """The default of every field of a config dataclass, as config.json holds it (tuples as lists)."""
    values = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return json.loads(json.dumps(values))


def current(saved: dict[str, Any], retired: tuple[str, ...], former: tuple[tuple[str, Any], ...] = (),
            model_class: type | None = None) -> dict[str, Any]:
    """A run directory's config.json as this version writes it, so that old runs load and resume unchanged: the
    model keys an older version wrote and the family has retired since (its registry entry's `retired_keys`,
    read by nothing) are dropped, a key added since whose default is not what older runs did (the entry's
    `former_defaults`, (key, value) pairs) takes the value that reproduces them, and every other key added since
    takes its default (with `model_class`, the family's config class; the train and data sections always)."""
    model = {k: v for k, v in saved["model"].items() if k not in retired}
    model_defaults = defaults(model_class) if model_class is not None else {}
    return {**saved, "model": {**model_defaults, **dict(former), **model},
            "train": {**defaults(TrainConfig), **saved["train"]}, "data": {**defaults(DataConfig), **saved["data"]}}


def from_dict(saved: dict[str, Any], model_class: type, retired: tuple[str, ...] = (),
              former: tuple[tuple[str, Any], ...] = ()) -> RunConfig:
    """Rebuild a RunConfig from a run directory's config.json (as `current` brings it up to date)."""
    saved = current(saved, retired, former)
    return RunConfig(
        family=saved["family"],
        preset=saved["preset"],
        model=build_dataclass(model_class, saved["model"], "model"),
        train=build_dataclass(TrainConfig, saved["train"], "train"),
        data=build_dataclass(DataConfig, saved["data"], "data"),
    )


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {vb!r} -> {va!r}")
    return out
