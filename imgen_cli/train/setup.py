"""Before the loop: from what `imgen train` was given to a run directory and its configuration.

A new run or a resumed one: the run's family, the recipe (the shapes recipe of the family by default), the
layered configuration, the tokenizer a token family stands on (pinned to its checkpoint), the data checks a
token family needs, and the config.json to write. A run with a checkpoint resumes and refuses changes to what
it trains; a run without one is new, so a first start that failed never blocks the corrected command.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imgen_cli
from imgen_cli import config as cfg_mod
from imgen_cli import registry
from imgen_cli.config import RunConfig
from imgen_cli.errors import UserError
from imgen_cli.runs import Checkpoint, RunDir, check_pinned_tokenizer, pin_tokenizer, weights_file, weights_hash

# keys a resumed run may change: how long, how often, from where, not what is trained
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.keep_last",
                  "train.val_every", "train.val_max_batches", "train.compile", "train.tensorboard",
                  "train.activation_checkpointing", "train.nan_policy", "data.shards", "data.num_workers",
                  "data.resume", "train.init", "train.init_weights",  # (a resumed run's weights are its own)
                  "train.eval_every", "train.eval_n", "train.eval_steps", "train.eval_guidance", "train.eval_features",
                  "train.eval_inception_weights", "train.eval_clip_model"}
# recorded in config.json, never compared on resume
PROVENANCE_KEYS = {"imgen_version", "tokenizer_hash", "pretrained"}
# model keys that name published weights (imgen_cli.hub): a hub name is pinned to its commit when the run starts
WEIGHTS_KEYS = ("vq", "text_encoder", "text_tokenizer")


@dataclass
class TrainRequest:
    """What `imgen train` was given; None means "not given" (the recipe's or the saved run's value)."""

    model: str | None = None
    out: Path | None = None
    recipe: Path | None = None
    preset: str | None = None
    vq: str | None = None
    init: str | None = None  # a run (or checkpoint) whose network and weights a new run starts from
    init_raw: bool = False  # its raw weights, not its EMA ones
    sets: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)  # dotted config keys set by their own flags


@dataclass
class PreparedRun:
    run: RunDir
    cfg: RunConfig
    config: dict[str, Any]  # what config.json gets once training starts
    done_at: Checkpoint | None  # the run's checkpoint when it is already at train.steps: nothing to train


def prepare(req: TrainRequest, runs_root: Path, recipes: Path, note: Callable[[str], None]) -> PreparedRun:
    """The run and its checked configuration; nothing is written."""
    if req.out is not None and req.out.exists() and not req.out.is_dir():
        raise UserError(f"--out {req.out} is a file, not a run directory.")
    existing = RunDir(req.out) if req.out is not None and RunDir(req.out).exists() else None
    made = {"imported": "an imported published model", "merged": "a LoRA run's merged weights"}
    kind = next((v for k, v in made.items() if existing is not None and k in existing.read_config()), None)
    if kind is not None:
        raise UserError(f"{existing.path} is {kind}, not a run to train on; fine-tune it into a new run: imgen "
                        f"train --init {existing.path} --out NEW_RUN.")
    name, init, init_checkpoint = req.model, None, None
    if req.init is not None:
        init, init_checkpoint = init_network(req)
        name = init["family"]
    if name is None:
        if existing is None:
            raise UserError("--model is required for a new run; choose one of: "
                            f"{', '.join(registry.FAMILIES)} (see `imgen models`).")
        name = existing.read_config()["family"]
    family = registry.get(name)
    _check_family_options(family, req)
    recipe = req.recipe
    if recipe is None and (recipes / "shapes" / f"{name}.toml").is_file():
        recipe = recipes / "shapes" / f"{name}.toml"
    recipe_values = cfg_mod.load_recipe(recipe) if recipe else {}
    if recipe_values.get("family", name) != name:
        raise UserError(f"recipe {recipe} is for {recipe_values['family']}, not {name}.")
    flags = {**req.flags, "model.vq": pin_tokenizer(req.vq, existing) if req.vq else None}
    if init is not None:  # the network is the --init run's; the recipe gives the training and the data, and
        # a recipe given with --recipe its [model] keys as --set would (a fine-tune recipe's own cond_dropout); the
        # family's default recipe is a network from scratch, so its [model] does not apply
        changes = recipe_values.get("model", {}) if req.recipe is not None else {}
        recipe_values = {**recipe_values, "model": {**init["model"], **changes}}
        flags |= {"train.init": init_checkpoint, "train.init_weights": "raw" if req.init_raw else "ema"}
    cfg = cfg_mod.resolve(name, family.config_cls(), family.presets(), recipe=recipe_values, preset=req.preset,
                          sets=req.sets, flags=flags)
    if init is not None:
        cfg.preset = init["preset"]
    pretrained = pin_published_weights(cfg, existing)
    if family.takes_tokenizer and cfg.model.vq and not cfg.model.grid:
        cfg.model.grid = published_tokenizer_grid(cfg) or 0
    # bitdiff models tokens when given --vq; latent DiffiT encodes images itself or reads pre-encoded latents
    prior = [dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=cfg.data.prior))] \
        if cfg.data.prior else []
    for data in (cfg, *prior):  # the prior-preservation shards must be the data's kind
        if family.needs_vq_tokens or (family.reads_tokens and cfg.model.vq):
            check_token_data(name, data, note)
        if family.reads_latents and cfg.model.vq:
            check_latent_data(data)
        if family.generates_images:
            check_caption_states(data, note)
    classes = check_class_data(cfg, prior) if family.generates_images and cfg.model.condition == "class" else None
    run = RunDir(req.out if req.out is not None else runs_root / name)
    config = checked_config(run, cfg, pretrained, classes)
    latest = run.latest_checkpoint()
    return PreparedRun(run, cfg, config, latest if latest is not None and latest.step >= cfg.train.steps else None)


def init_network(req: TrainRequest) -> tuple[dict[str, Any], str]:
    """`--init RUN`: the config of the run a new one starts from (its family, preset and network, which the new
    run's --set may still change where the weights allow), and the checkpoint whose weights the training loop
    loads."""
    from imgen_cli.runs import resolve_run

    source, checkpoint = resolve_run(req.init, flag="--init")
    saved = source.read_config()
    family = registry.get(saved["family"])
    if req.model is not None and req.model != family.name:
        raise UserError(f"--init {req.init} is a {family.name} run, so it cannot start a {req.model} run; drop "
                        f"--model or give a {req.model} run.")
    if req.preset is not None:
        raise UserError(f"--init {req.init} brings its network; --preset cannot change it (--set model.KEY=VALUE "
                        f"changes what the weights allow).")
    return family.current_config(saved), str(checkpoint.path)


def _check_family_options(family: registry.Family, req: TrainRequest) -> None:
    if req.vq is not None and not (family.takes_tokenizer or family.decodes_tokenizer):
        with_it = [f.name for f in registry.FAMILIES.values() if f.takes_tokenizer or f.decodes_tokenizer]
        raise UserError(f"--vq is for the families that stand on a tokenizer ({', '.join(with_it)}); {family.name} "
                        "does not.")
    if not family.supports_dual_output and any(s.split("=")[0].strip() == "model.dual_output" for s in req.sets):
        with_it = [f.name for f in registry.FAMILIES.values() if f.supports_dual_output]
        raise UserError(f"Dynamic Dual-Output is a head option of the continuous diffusion families "
                        f"({', '.join(with_it)}); {family.name} has no such head.")


def published_tokenizer_grid(cfg: RunConfig) -> int | None:
    """The token or latent grid side on a published tokenizer (which, convolutional, has no image size of its own):
    the training shards' image side over its downsampling factor. None for an imgen vqgan run (its own size)."""
    from imgen_cli import hub
    from imgen_cli.data.shards import open_shards
    from imgen_cli.models.published import downsample_factor, published_class, saved_config

    path = hub.local_path(cfg.model.vq, "--vq")
    if not (path.is_dir() and published_class(path)):
        return None
    factor = downsample_factor(saved_config(path))
    size = open_shards(cfg.data.shards, "train").image_size
    if size is None:
        raise UserError(f"the tokenizer {cfg.model.vq} has no image size of its own and {cfg.data.shards} does not "
                        f"say its images' size; set model.grid (the image side / {factor}).")
    return size // factor


def check_token_data(name: str, cfg: RunConfig, note: Callable[[str], None]) -> None:
    """A token family needs its tokenizer; shards with pre-encoded tokens must come from that same tokenizer
    (shards without tokens are encoded on the fly)."""
    from imgen_cli.data.shards import check_tokenizer, open_shards

    if not cfg.model.vq:
        raise UserError(f"{name} trains on image tokens: pass --vq RUN (a trained vqgan run).")
    shards = open_shards(cfg.data.shards, "train")
    if (shards.manifest or {}).get("tokenizer") is not None:
        check_tokenizer(shards, registry.load_tokenizer(cfg.model.vq).record, cfg.data.shards)
    else:
        note(f"{cfg.data.shards} holds no pre-encoded tokens: the tokenizer encodes every batch on the fly "
             f"(`imgen tokenize {cfg.data.shards} --vq {cfg.model.vq} --out SHARDS_VQ` makes training faster).")


def check_latent_data(cfg: RunConfig) -> None:
    """Shards with pre-encoded latents must come from the autoencoder the run stands on (shards without them, or
    with tokens, are encoded on the fly)."""
    from imgen_cli.data.shards import check_tokenizer, open_shards

    shards = open_shards(cfg.data.shards, "train")
    found = (shards.manifest or {}).get("tokenizer")
    if found is not None and "latent_channels" in found:
        check_tokenizer(shards, registry.load_tokenizer(cfg.model.vq).record, cfg.data.shards)


def check_caption_states(cfg: RunConfig, note: Callable[[str], None]) -> None:
    """Shards with caption states (`imgen tokenize --text-encoder`) serve a run whose frozen transformers encoder
    is the one that made them; another encoder is refused, and an encoder that trains cannot use them."""
    from imgen_cli.data.shards import check_text_encoder, open_shards
    from imgen_cli.nn.text import text_encoder_record

    shards = open_shards(cfg.data.shards, "train")
    found = (shards.manifest or {}).get("text_encoder")
    if found is None:
        return
    if cfg.model.text_encoder and cfg.model.text_is_frozen:
        check_text_encoder(shards, text_encoder_record(cfg.model), cfg.data.shards)
    elif cfg.model.text_is_pretrained and cfg.model.text_is_frozen:
        raise UserError(f"{cfg.data.shards} holds caption states of {found['text_encoder']}, but the model's text "
                        f"encoder is open_clip's {cfg.model.text_name}; set model.text_encoder="
                        f"{found['text_encoder']}, or train on shards without caption states.")
    else:
        note(f"{cfg.data.shards} holds caption states of {found['text_encoder']}, which a text encoder that trains "
             f"cannot use: it encodes the captions itself.")


def check_class_data(cfg: RunConfig, prior: list[RunConfig]) -> list[str]:
    """A class-conditional run trains on shards with a class index (`imgen tokenize` of class folders), every set of
    them the same index; model.num_classes, when 0, becomes its size. Returns the class names, in id order, which
    config.json keeps (`sample --class NAME`)."""
    from imgen_cli.data.shards import open_shards

    indices = []
    for data in (cfg, *prior):
        manifest = open_shards(data.data.shards, "train").manifest or {}
        if not manifest.get("classes"):
            raise UserError(f"a class-conditional run (model.condition=class) trains on class-labelled shards, but "
                            f"{data.data.shards} has no class index; tokenize a folder of class folders.")
        indices.append([c["name"] for c in manifest["classes"]])
    if any(index != indices[0] for index in indices):
        raise UserError(f"data.prior's class index differs from {cfg.data.shards}'s; tokenize both with one "
                        f"--classes file.")
    names = indices[0]
    if not cfg.model.num_classes:
        cfg.model.num_classes = len(names)
    if cfg.model.num_classes != len(names):
        raise UserError(f"model.num_classes is {cfg.model.num_classes}, but {cfg.data.shards} has {len(names)} "
                        f"classes.")
    return names


def pin_published_weights(cfg: RunConfig, existing: RunDir | None) -> dict[str, Any]:
    """Pin every hub name among the model's weights keys to the commit it resolves to now (fetching what is not
    cached), so the run reloads the same weights whatever the branch does later; a resumed run keeps its pin
    while the name still means the same repository and folder. Returns what config.json records of each."""
    from imgen_cli import hub

    resumed = existing is not None and existing.latest_checkpoint() is not None
    saved = existing.read_config().get("model", {}) if resumed else {}
    records = {}
    for key in WEIGHTS_KEYS:
        name = getattr(cfg.model, key, "")
        if not hub.is_hub_name(name):
            continue
        what = f"model.{key}"
        kept = saved.get(key, "")
        pinned, records[what] = hub.pin(kept if hub.is_hub_name(kept) and hub.same_weights(name, kept, what)
                                        else name, what)
        setattr(cfg.model, key, pinned)
    return records


def run_config(cfg: RunConfig, pretrained: dict[str, Any] | None = None,
               classes: list[str] | None = None) -> dict[str, Any]:
    """config.json: the configuration, imgen's version, what the run's published weights were (`pretrained`:
    repository, commit, file hashes), a class-conditional run's class names (in id order) and, for a run on a
    pinned tokenizer checkpoint, that checkpoint's weights hash (checked whenever the run is loaded)."""
    config = {**cfg.to_dict(), "imgen_version": imgen_cli.__version__}
    if pretrained:
        config["pretrained"] = pretrained
    if classes:
        config["classes"] = classes
    vq = Path(config["model"].get("vq") or "")
    if weights_file(vq).is_file():
        config["tokenizer_hash"] = weights_hash(vq)
    return json.loads(json.dumps(config))  # as it reads back: tuples become lists


def checked_config(run: RunDir, cfg: RunConfig, pretrained: dict[str, Any] | None = None,
                   classes: list[str] | None = None) -> dict[str, Any]:
    """The config.json to write; for a run with a checkpoint, refuse changes to what is being trained."""
    fresh = run_config(cfg, pretrained, classes)
    if run.exists() and run.latest_checkpoint() is not None:
        saved = registry.get(cfg.family).current_config(run.read_config())
        check_pinned_tokenizer(saved)
        changed = [d for d in cfg_mod.differences(fresh, saved)
                   if d.split(":")[0] not in RESUMABLE_KEYS | PROVENANCE_KEYS]
        if changed:
            raise UserError(f"{run.path} was trained with other settings ({'; '.join(changed[:3])}); "
                            "resume it with its own settings or choose a new --out.")
    return fresh
