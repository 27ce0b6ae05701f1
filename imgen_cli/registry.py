"""Model registry: one entry per family, the only place the commands learn what a model name means.

A family's module provides a config dataclass, a PRESETS dict and a network class that honours the
family contract (see DESIGN.md): `loss(batch) -> dict`, `preview(batch) -> images`, plus `generate`
and `edit` for generator families. Modules are imported lazily so `imgen --help` stays fast.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgen_cli.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    paper: str
    module: str
    config_class: str
    model_class: str
    needs_vq_tokens: bool = False
    takes_tokenizer: bool = False  # models a tokenizer's tokens or latents: built with the `model.vq` run's network
    reads_tokens: bool = False  # given a tokenizer, trains on token grids (pre-encoded in the shards, or encoded)
    reads_latents: bool = False  # models a tokenizer's continuous latents (their channels and grid come from it)
    trains_at_image_size: bool = False  # the shards' images must have model.image_size (no resizing in the family)
    generates_tokens: bool = False  # `generate_tokens`: a token grid a super-resolution Muse can refine
    refines_tokens: bool = False  # a run with model.lowres_grid > 0 is a super-resolution stage (`sample --sr`)
    is_tokenizer: bool = False  # an image tokenizer (encode/decode): `tokenize --vq`, `--vq`, `eval --recon`
    decodes_tokenizer: bool = False  # given a tokenizer (`model.vq`), keeps its encoder and codebook, trains a decoder
    generates_images: bool = False  # text-to-image generator (sample/edit/eval --fid apply)
    supports_dual_output: bool = False  # a continuous diffusion family: model.dual_output is its head option
    presets_name: str = "PRESETS"  # the module's dict of size presets
    # model keys an older imgen wrote into config.json and this one no longer has: dropped when a run loads
    retired_keys: tuple[str, ...] = ()
    # (key, value): model keys added later whose default is not what older runs did; a saved config without the
    # key takes the value that reproduces them
    former_defaults: tuple[tuple[str, Any], ...] = ()

    def current_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A run's config.json as this version writes it (`config.current` with this family's retired keys and
        former defaults)."""
        from imgen_cli.config import current

        return current(saved, self.retired_keys, self.former_defaults, self.config_cls())

    def _module(self) -> Any:
        return importlib.import_module(self.module)

    def config_cls(self) -> type:
        return getattr(self._module(), self.config_class)

    def model_cls(self) -> type:
        return getattr(self._module(), self.model_class)

    def presets(self) -> dict[str, dict[str, Any]]:
        return getattr(self._module(), self.presets_name)

    def build(self, model_config: Any) -> Any:
        """The network; a family that takes a tokenizer is handed the one `model.vq` names (families load
        nothing themselves)."""
        if (self.takes_tokenizer or self.decodes_tokenizer) and model_config.vq:
            return self.model_cls()(model_config, load_tokenizer(model_config.vq).model)
        return self.model_cls()(model_config)


# dual-output runs trained before model.gate_start and model.eps_head existed had the paper's gate and shared trunk
DUAL_OUTPUT_FORMER_DEFAULTS = (("gate_start", "even"), ("eps_head", "shared"))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "vqgan", "VQGAN image tokenizer", "Esser et al. 2021",
            module="imgen_cli.models.vqgan", config_class="VQGANConfig", model_class="VQGAN", is_tokenizer=True,
            decodes_tokenizer=True, trains_at_image_size=True,
        ),
        Family("muse", "masked generative transformer", "Chang et al. 2023",
               module="imgen_cli.models.muse", config_class="MuseConfig", model_class="Muse",
               needs_vq_tokens=True, takes_tokenizer=True, reads_tokens=True, generates_tokens=True,
               refines_tokens=True, generates_images=True),
        Family("vqdiffusion", "mask-and-replace discrete diffusion", "Gu et al. 2021",
               module="imgen_cli.models.vq_diffusion", config_class="VQDiffusionConfig", model_class="VQDiffusion",
               needs_vq_tokens=True, takes_tokenizer=True, reads_tokens=True, generates_tokens=True,
               generates_images=True),
        # pixel mode by default; token mode with --vq RUN (so needs_vq_tokens stays False)
        Family("bitdiff", "Bit Diffusion with analog bits", "Chen et al. 2022",
               module="imgen_cli.models.bit_diffusion", config_class="BitDiffusionConfig", model_class="BitDiffusion",
               takes_tokenizer=True, reads_tokens=True, generates_images=True, supports_dual_output=True,
               former_defaults=DUAL_OUTPUT_FORMER_DEFAULTS),
        Family("diffit", "DiffiT vision-transformer diffusion in image space", "Hatamizadeh et al. 2023",
               module="imgen_cli.models.diffit_image", config_class="ImageDiffiTConfig", model_class="ImageDiffiT",
               generates_images=True, supports_dual_output=True, former_defaults=DUAL_OUTPUT_FORMER_DEFAULTS,
               retired_keys=("vq", "latent_channels", "grid", "latent_scale", "patch", "width", "depth", "heads")),
        Family("diffit-latent", "DiffiT over a vqgan's continuous latents", "Hatamizadeh et al. 2023",
               module="imgen_cli.models.diffit_latent", config_class="LatentDiffiTConfig", model_class="LatentDiffiT",
               takes_tokenizer=True, reads_latents=True, generates_images=True, supports_dual_output=True,
               former_defaults=DUAL_OUTPUT_FORMER_DEFAULTS,
               retired_keys=("image_size", "time_dim", "widths", "depths", "window", "head_dim",
                             "cross_attention_resolution")),
        Family("clip", "in-project CLIP evaluator", "Radford et al. 2021",
               module="imgen_cli.models.clip", config_class="CLIPConfig", model_class="CLIP",
               trains_at_image_size=True),
    ]
}


def generators() -> list[str]:
    """The families that make images from prompts (what sample, edit and eval --fid take)."""
    return [f.name for f in FAMILIES.values() if f.generates_images]


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(FAMILIES)}.") from None


@dataclass(frozen=True)
class TrainedModel:
    run: Any  # runs.RunDir
    checkpoint: Any  # runs.Checkpoint
    config: Any  # config.RunConfig
    family: Family
    model: Any  # torch.nn.Module, eval mode, EMA weights by default

    @property
    def class_names(self) -> list[str] | None:
        """A class-conditional generator's class names in id order (its training shards' index); None for a run
        conditioned on text, or not a generator."""
        if not self.family.generates_images or self.config.model.condition != "class":
            return None
        return self.run.read_config().get("classes") or [str(i) for i in range(self.config.model.num_classes)]


def load_trained(ckpt: str | None, device: Any = "cpu", ema: bool = True, runs_root: str = "runs",
                 flag: str = "--ckpt", families: Sequence[str] | None = None) -> TrainedModel:
    """`--ckpt RUN` (or the newest run of `families`) -> the family's network with the checkpoint's weights, ready
    to use."""
    from safetensors import SafetensorError

    from imgen_cli.config import from_dict
    from imgen_cli.runs import check_pinned_tokenizer, resolve_run, weights_file

    run, checkpoint = resolve_run(ckpt, runs_root, flag, families)
    saved = run.read_config()
    check_pinned_tokenizer(saved)
    family = get(saved["family"])
    config = from_dict(family.current_config(saved), family.config_cls())
    model = family.build(config.model)
    try:
        weights = checkpoint.load_weights(ema=ema)
    except (SafetensorError, OSError) as err:  # a garbage header, data cut short, an unreadable file
        raise UserError(f"{weights_file(checkpoint.path, ema)} is damaged: {err}.",
                        hint=f"An earlier checkpoint may be intact: --ckpt {run.path}/checkpoints/step-N.") from None
    if config.train.lora:  # the base run's weights, then this run's adapters around them
        from imgen_cli.nn import lora
        from imgen_cli.train.checkpoint import adapt_base

        adapt_base(model, config.train)
        if set(weights) != set(lora.adapter_state(model.state_dict())):
            raise UserError(f"{checkpoint.path} does not hold the adapters of this LoRA run's network (rank "
                            f"{config.train.lora} on {config.train.init}).")
        weights = {**model.state_dict(), **weights}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # weights from another version of the family's network
        detail = " ".join(str(err).split("\n", 1)[-1].split())[:300]
        raise UserError(f"{checkpoint.path} does not fit the {family.name} network of this imgen version "
                        f"({detail}).") from None
    return TrainedModel(run, checkpoint, config, family, model.to(device).eval())


@dataclass
class LoadedTokenizer:
    name: str  # as given: a vqgan run or checkpoint, a diffusers model folder, or an hf: name
    model: Any  # the tokenizer network, eval mode (a vqgan's EMA weights, or models.published's adapter)
    identify: Callable[[], dict[str, Any]]  # -> `record`

    @functools.cached_property
    def record(self) -> dict[str, Any]:
        """Its identity, as shards made with it record it (data.shards.tokenizer_record): computed on first use,
        since it hashes the weights, which building a network on the tokenizer does not need."""
        return self.identify()


def load_tokenizer(name: str, device: Any = "cpu") -> LoadedTokenizer:
    """`--vq`, `model.vq` -> the tokenizer: an imgen vqgan run, or a diffusers VQModel or AutoencoderKL (a local
    save_pretrained folder or an hf: name, e.g. hf:amused/amused-256/vqvae)."""
    from pathlib import Path

    from imgen_cli import hub
    from imgen_cli.data.shards import published_record, tokenizer_record
    from imgen_cli.models.published import load_published, published_class

    path = hub.local_path(name, "--vq") if hub.is_hub_name(name) else Path(name)
    published = published_class(path) if path.is_dir() else None
    if published is not None:
        return LoadedTokenizer(name, load_published(name, path, published).to(device),
                               lambda: published_record(name, path))
    kind = hub.kind_of(path) if path.is_dir() else ""
    if hub.is_hub_name(name) or kind.startswith(("a diffusers", "a transformers", "an open_clip")):
        raise UserError(f"--vq {name} is {kind}, not an image tokenizer (a vqgan run, or a diffusers VQModel or "
                        f"AutoencoderKL).")
    trained = load_trained(name, device=device, flag="--vq")
    if not trained.family.is_tokenizer:
        raise UserError(f"--vq {name} is a {trained.family.name} run, not an image tokenizer (vqgan).")
    source = trained.config.model.vq
    if source:  # a decoder fine-tuned on another tokenizer's codes: its tokens are that one's, and so is its identity
        return LoadedTokenizer(name, trained.model, lambda: {**load_tokenizer(source).record, "decoder": name,
                                                             "image_size": trained.config.model.image_size})
    return LoadedTokenizer(name, trained.model, lambda: tokenizer_record(trained))


def use_decoder(trained: TrainedModel, decoder: str, device: Any = "cpu") -> None:
    """`--decoder RUN`: a token model's images decoded by a decoder fine-tuned on its tokenizer's codes (Muse's
    decoder fine-tuning, a vqgan run with `model.vq`) instead of the tokenizer's own decoder. Refused unless its
    tokens are the ones the model was trained on."""
    vq = trained.config.model.vq if trained.family.reads_tokens else ""
    if not vq:
        raise UserError(f"--decoder is for models of image tokens (muse, vqdiffusion, bitdiff with --vq); "
                        f"{trained.run.path} is not one.")
    replacement = load_tokenizer(decoder, device)
    if replacement.record["hash"] != load_tokenizer(vq).record["hash"]:
        raise UserError(f"--decoder {decoder} does not decode the tokens of {vq}, the tokenizer of "
                        f"{trained.run.path}; give a vqgan run trained with --vq {vq}.")
    trained.model.carry_tokenizer(replacement.model.eval())
