"""Published diffusers pipelines as imgen runs, and back: `imgen import` and `imgen export`.

A released DiffiT checkpoint (a weights file) is imported by `imgen_cli.released_diffit`.

A pipeline is a folder with a model_index.json (a local `save_pretrained` directory, or hf:ORG/REPO[@REVISION]
through the hub cache). `import_pipeline` recognises its class and writes a normal run directory:
- AmusedPipeline (amused/amused-256, amused/amused-512): a Muse run on the uvit2d backbone. The network's weights
  are copied into the run's checkpoint (step 0, raw and EMA alike); the VQ-GAN and the CLIP text encoder stay
  references (`model.vq`, `model.text_encoder`, hub names pinned to the commit, as any run's published weights),
  read with the penultimate layer's states as aMUSEd reads them. The published defaults come along: guidance 10,
  12 decoding steps (Muse's own default too), the scheduler's masking schedule, micro-conditioning
  [S, S, 0, 0, 6] for S-pixel images.
- VQDiffusionPipeline (microsoft/vq-diffusion-ithq): a VQ-Diffusion run on the transformer2d backbone (diffusers'
  Transformer2DModel for discrete latents) with its learned null embeddings as the family's learnable null; its
  VQ-VAE and CLIP text encoder (final states, L2-normalised by the family) stay pinned references. Defaults:
  guidance 5 (the pipeline's, with the learned null), no truncation, the released schedule, T from its
  scheduler. diffusers 0.42 cannot load this pipeline from disk; each component is read on its own.

`export_pipeline` writes such a run back as its pipeline, each component saved by its library's own
`save_pretrained` (a VQ-Diffusion run in the published repository's layout, model_index.json included); an
imported run exports the tensors it was imported from. A run on imgen's own network has no diffusers
counterpart, and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgen_cli import hub
from imgen_cli.errors import UserError

# pipeline class -> what it becomes
IMPORTS = {"AmusedPipeline": "muse (backbone uvit2d)", "VQDiffusionPipeline": "vqdiffusion (backbone transformer2d)"}
# what each import makes: the pipelines, and the released checkpoints read as weights files
IMPORTED_AS = IMPORTS | {"DiffiT": "diffit-latent (class-conditional, a released NVlabs/DiffiT checkpoint)"}
AMUSED_GUIDANCE = 10.0  # AmusedPipeline.__call__'s guidance_scale
AMUSED_CONDITION_DROPOUT = 0.1  # open-muse's cond_dropout_prob and label smoothing, for fine-tuning
AMUSED_LABEL_SMOOTHING = 0.1
VQ_DIFFUSION_GUIDANCE = 5.0  # VQDiffusionPipeline.__call__'s guidance_scale (ITHQ: 5 with the learned null)
# the scheduler settings imgen's "released" schedule is (VQDiffusionScheduler's defaults)
RELEASED_SCHEDULE = {"alpha_cum_start": 0.99999, "alpha_cum_end": 0.000009, "gamma_cum_start": 0.000009,
                     "gamma_cum_end": 0.99999}
NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"  # VQ-Diffusion's learned null, a component


@dataclass(frozen=True)
class Pipeline:
    source: str  # as the user gave it
    kind: str  # the model_index.json's _class_name
    index: dict[str, Any]
    folder: Path | None  # a local pipeline folder; None for a hub name
    hub_name: hub.HubName | None  # the repository, pinned to the commit its revision resolved to

    def component(self, name: str) -> str:
        """The weights name of a component folder: a pinned hub name, or the local folder's absolute path."""
        if name not in self.index:
            raise UserError(f"the {self.kind} at {self.source} has no {name} component.")
        if self.hub_name is not None:
            return str(hub.HubName(self.hub_name.repo, name, self.hub_name.revision))
        return str((self.folder / name).resolve())

    def component_path(self, name: str) -> Path:
        return hub.local_path(self.component(name), f"the {name} of {self.source}")


def open_pipeline(source: str) -> Pipeline:
    """A pipeline folder or hub name -> its model_index.json, read without downloading any weights."""
    if hub.is_hub_name(source):
        name = hub.parse(source, "imgen import")
        if name.subfolder:
            raise UserError(f"imgen import takes a whole pipeline repository (hf:ORG/REPO[@REVISION]), not the "
                            f"folder {name.subfolder!r} of one.")
        root = hub.fetch(name, "imgen import", only="model_index.json")
        pinned, folder = hub.HubName(name.repo, "", hub.commit_of(root) or name.revision), None
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"imgen import {source}: no such folder; give a diffusers pipeline folder or "
                            f"hf:ORG/REPO.")
        pinned, folder = None, root
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{source} is {hub.kind_of(root)}, not a diffusers pipeline (it has no model_index.json).")
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{index_file} is not valid JSON ({err}).") from None
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if kind not in IMPORTS:
        raise UserError(f"{source} is a diffusers {kind or 'pipeline of no class'}; imgen imports "
                        f"{', '.join(IMPORTS)}.")
    return Pipeline(source, kind, index, folder, pinned)


def import_pipeline(source: str, out: Path, vae: str | None = None) -> dict[str, Any]:
    """`imgen import SOURCE --out RUN`: the pipeline (or a released DiffiT checkpoint, `imgen_cli.released_diffit`)
    as an imgen run (module docstring); returns what the run's config.json records of it."""
    from imgen_cli import released_diffit
    from imgen_cli.runs import RunDir

    run = RunDir(out)
    if run.exists() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UserError(f"--out {out} is not an empty folder; give a new one for the imported run.")
    if released_diffit.is_checkpoint(source):
        return released_diffit.import_checkpoint(source, out, vae)
    if vae is not None:
        raise UserError("--vae is the decoder of a released DiffiT checkpoint; a pipeline brings its own.")
    pipeline = open_pipeline(source)
    build = _amused_run if pipeline.kind == "AmusedPipeline" else _vq_diffusion_run
    cfg, pretrained, network = build(pipeline)
    _write_run(run, cfg, pretrained, network, pipeline)
    return run.read_config()["imported"]


def _amused_run(pipeline: Pipeline) -> tuple[Any, dict[str, Any], Any]:
    """An AmusedPipeline's RunConfig, the records of its pinned published weights, and its Muse network with the
    published weights."""
    from diffusers import UVit2DModel

    transformer = pipeline.component_path("transformer")
    uvit = _load_diffusers(UVit2DModel, transformer, pipeline)
    scheduler = _read_json(pipeline.component_path("scheduler") / "scheduler_config.json")
    if scheduler.get("mask_token_id", uvit.config.vocab_size - 1) != uvit.config.vocab_size - 1:
        raise UserError(f"{pipeline.source}: its scheduler's MASK id {scheduler['mask_token_id']} is not the "
                        f"transformer's last vocabulary row {uvit.config.vocab_size - 1}.")
    model = {
        "backbone": "uvit2d",
        "uvit2d": {k: v for k, v in dict(uvit.config).items() if not k.startswith("_")},
        "vq": pipeline.component("vqvae"),
        "codebook_size": uvit.config.codebook_size,
        "grid": uvit.config.sample_size,
        "text_encoder": pipeline.component("text_encoder"),
        "text_layer": "penultimate",
        "text_context": 77,  # the pipeline pads and truncates to its CLIP tokenizer's 77 positions
        "schedule": scheduler.get("masking_schedule", "cosine"),
        "guidance": AMUSED_GUIDANCE,
        "cond_dropout": AMUSED_CONDITION_DROPOUT,
        "label_smoothing": AMUSED_LABEL_SMOOTHING,
    }
    cfg, pretrained, network = imported_run("muse", model)
    network.uvit.model.load_state_dict(uvit.state_dict())
    return cfg, pretrained, network


def _vq_diffusion_run(pipeline: Pipeline) -> tuple[Any, dict[str, Any], Any]:
    """A VQDiffusionPipeline's RunConfig, the records of its pinned published weights, and its VQ-Diffusion network
    with the published weights and learned null. The pipeline class itself is not loaded (diffusers 0.42 cannot
    load this pipeline from disk: its null-embedding component's class is unknown to its loader); each component
    is read on its own."""
    from diffusers import Transformer2DModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    transformer = _load_diffusers(Transformer2DModel, pipeline.component_path("transformer"), pipeline)
    null = _load_diffusers(LearnedClassifierFreeSamplingEmbeddings, pipeline.component_path(NULL_EMBEDDINGS),
                           pipeline)
    scheduler = _read_json(pipeline.component_path("scheduler") / "scheduler_config.json")
    schedule = {k: scheduler.get(k, v) for k, v in RELEASED_SCHEDULE.items()}
    if schedule != RELEASED_SCHEDULE:
        raise UserError(f"{pipeline.source}: its scheduler's schedule {schedule} is not the released one "
                        f"{RELEASED_SCHEDULE}, the only one imgen's VQ-Diffusion has.")
    c = transformer.config
    steps = scheduler.get("num_train_timesteps", 100)
    if scheduler.get("num_vec_classes", c.num_vector_embeds) != c.num_vector_embeds or steps != c.num_embeds_ada_norm:
        raise UserError(f"{pipeline.source}: its scheduler ({scheduler.get('num_vec_classes')} classes, {steps} "
                        f"steps) does not fit its transformer ({c.num_vector_embeds}, {c.num_embeds_ada_norm}).")
    model = {
        "backbone": "transformer2d",
        "transformer2d": {k: v for k, v in dict(c).items() if not k.startswith("_")},
        "vq": pipeline.component("vqvae"),
        "codebook_size": c.num_vector_embeds - 1,  # the last id is MASK
        "grid": c.sample_size,
        "text_encoder": pipeline.component("text_encoder"),
        "text_layer": "last",  # the final states, after CLIP's final LayerNorm, L2-normalised by the family
        "text_context": null.config.length or 77,
        "timesteps": steps,
        "schedule": "released",
        "learnable_null": bool(null.config.learnable),
        "guidance": VQ_DIFFUSION_GUIDANCE,
    }
    cfg, pretrained, network = imported_run("vqdiffusion", model)
    network.transformer2d.model.load_state_dict(transformer.state_dict())
    if network.null_states is not None:
        network.null_states.data.copy_(null.embeddings.data)
    return cfg, pretrained, network


def imported_run(family_name: str, model: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """The RunConfig of an imported network's model keys (the family's other defaults), its published weights
    pinned (with their records), and the network built on them."""
    from imgen_cli import registry
    from imgen_cli.config import DataConfig, RunConfig, TrainConfig, build_dataclass
    from imgen_cli.train.setup import pin_published_weights

    family = registry.get(family_name)
    cfg = RunConfig(family=family_name, preset="imported", model=build_dataclass(family.config_cls(), model, "model"),
                    train=TrainConfig(), data=DataConfig())
    pretrained = pin_published_weights(cfg, None)
    return cfg, pretrained, family.build(cfg.model)


def _load_diffusers(cls: type, path: Path, pipeline: Pipeline) -> Any:
    try:
        # every weight materialised (no meta tensors), so a file lacking some shows in missing_keys
        model, info = cls.from_pretrained(path, low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UserError(f"the {path.name} of {pipeline.source} cannot be loaded as a diffusers {cls.__name__}: "
                        f"{str(err).splitlines()[0][:200]}.") from None
    if info.get("missing_keys"):  # diffusers fills them with random weights and goes on
        raise UserError(f"the {path.name} of {pipeline.source} does not hold the weights its config describes "
                        f"({len(info['missing_keys'])} missing, e.g. {sorted(info['missing_keys'])[0]}).")
    return model.eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{path} cannot be read as JSON ({err}).") from None


def _write_run(run: Any, cfg: Any, pretrained: dict[str, Any], network: Any, pipeline: Pipeline) -> None:
    """config.json (with where the run came from: the source, its pinned revision, the hashes of the imported
    weights' files) and the step-0 checkpoint."""
    from imgen_cli.train.setup import run_config

    transformer = pipeline.component_path("transformer")
    config = run_config(cfg, pretrained)
    config["imported"] = {"source": pipeline.source, "pipeline": pipeline.kind,
                          "revision": pipeline.hub_name.revision if pipeline.hub_name else None,
                          "weights": pipeline.component("transformer"), "files": hub.file_hashes(transformer)}
    state = network.state_dict()
    run.write_config(config)
    run.save_checkpoint(0, state, state, {"step": 0, "imported": pipeline.source}, keep_last=1)


def export_pipeline(trained: Any, out: Path, fmt: str) -> str:
    """`imgen export RUN --format diffusers --out DIR` (the run as loaded: EMA weights or raw); returns the
    pipeline class written."""
    if fmt != "diffusers":
        raise UserError(f"unknown --format {fmt!r}; imgen exports diffusers pipelines (--format diffusers).")
    family, cfg, path = trained.family.name, trained.config.model, trained.run.path
    backbone = {"muse": "uvit2d", "vqdiffusion": "transformer2d"}.get(family)
    if backbone is None or cfg.backbone != backbone:
        raise UserError(f"{path} is a {family} run on imgen's own network, which no diffusers pipeline loads; imgen "
                        f"exports the runs on a published network (imgen import): Muse on uvit2d as an "
                        f"AmusedPipeline, VQ-Diffusion on transformer2d as a VQDiffusionPipeline.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not an empty folder.")
    return _export_amused(trained, out) if family == "muse" else _export_vq_diffusion(trained, out)


def _published_parts(trained: Any, pipeline: str, text_class: str, penultimate: bool, zero_one: bool) -> Any:
    """The run's text encoder and VQModel, checked to be what `pipeline` holds."""
    from imgen_cli.models.published import PublishedAutoencoder
    from imgen_cli.nn.text import TransformersText

    model, path = trained.model, trained.run.path
    text = model.text_encoder
    layer = "penultimate" if penultimate else "last"
    if not (isinstance(text, TransformersText) and text.penultimate == penultimate
            and type(text.transformer).__name__ == text_class):
        raise UserError(f"{path} does not read a {text_class}'s {layer} states, which is what a {pipeline} gives its "
                        f"transformer.")
    tokenizer = model.tokenizer
    if not (isinstance(tokenizer, PublishedAutoencoder) and tokenizer.is_vq and tokenizer.zero_one == zero_one):
        raise UserError(f"{path} is not on a diffusers VQModel of {'[0, 1]' if zero_one else '[-1, 1]'} pixels, "
                        f"the tokenizer of a {pipeline}.")
    return text


def _export_amused(trained: Any, out: Path) -> str:
    from diffusers import AmusedPipeline, AmusedScheduler

    model = trained.model
    text = _published_parts(trained, "AmusedPipeline", "CLIPTextModelWithProjection", True, True)
    vocab = model.uvit.model.config.vocab_size
    scheduler = AmusedScheduler(mask_token_id=vocab - 1, masking_schedule=trained.config.model.schedule)
    AmusedPipeline(vqvae=model.tokenizer.model, tokenizer=text.tokenizer, text_encoder=text.transformer,
                   transformer=model.uvit.model, scheduler=scheduler).save_pretrained(out)
    return "AmusedPipeline"


def _export_vq_diffusion(trained: Any, out: Path) -> str:
    """The published repository's layout (microsoft/vq-diffusion-ithq): each component saved by its library, and
    the model_index.json that names the null embeddings' class by the module it was published from."""
    import diffusers
    from diffusers import VQDiffusionScheduler
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )

    model, cfg = trained.model, trained.config.model
    text = _published_parts(trained, "VQDiffusionPipeline", "CLIPTextModel", False, False)
    if model.null_states is None:
        null = LearnedClassifierFreeSamplingEmbeddings(learnable=False)
    else:
        length, width = model.null_states.shape
        null = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=width, length=length)
        null.embeddings.data.copy_(model.null_states.data)
    scheduler = VQDiffusionScheduler(num_vec_classes=model.codebook_size + 1, num_train_timesteps=cfg.timesteps)
    parts = {"vqvae": model.tokenizer.model, "text_encoder": text.transformer, "tokenizer": text.tokenizer,
             "transformer": model.transformer2d.model, "scheduler": scheduler, NULL_EMBEDDINGS: null}
    for name, part in parts.items():
        part.save_pretrained(out / name)
    index = {"_class_name": "VQDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             NULL_EMBEDDINGS: ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
             "scheduler": ["diffusers", "VQDiffusionScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
             "vqvae": ["diffusers", "VQModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return "VQDiffusionPipeline"
