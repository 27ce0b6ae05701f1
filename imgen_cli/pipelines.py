"""Published diffusers pipelines as imgen runs, and back: `imgen import` and `imgen export`.

A pipeline is a folder with a model_index.json (a local `save_pretrained` directory, or hf:ORG/REPO[@REVISION]
through the hub cache). `import_pipeline` recognises its class and writes a normal run directory:
- AmusedPipeline (amused/amused-256, amused/amused-512): a Muse run on the uvit2d backbone. The network's weights
  are copied into the run's checkpoint (step 0, raw and EMA alike); the VQ-GAN and the CLIP text encoder stay
  references (`model.vq`, `model.text_encoder`, hub names pinned to the commit, as any run's published weights),
  read with the penultimate layer's states as aMUSEd reads them. The published defaults come along: guidance 10,
  12 decoding steps (Muse's own default too), the scheduler's masking schedule, micro-conditioning
  [S, S, 0, 0, 6] for S-pixel images.

`export_pipeline` writes such a run back as the pipeline diffusers loads (`AmusedPipeline.from_pretrained`), with
diffusers' own `save_pretrained`, so the layout is the library's; an imported run exports the tensors it was
imported from. A run whose network is imgen's own has no diffusers counterpart, and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgen_cli import hub
from imgen_cli.errors import UserError

IMPORTS = {"AmusedPipeline": "muse (backbone uvit2d)"}  # pipeline class -> what it becomes
AMUSED_GUIDANCE = 10.0  # AmusedPipeline.__call__'s guidance_scale
AMUSED_CONDITION_DROPOUT = 0.1  # open-muse's cond_dropout_prob and label smoothing, for fine-tuning
AMUSED_LABEL_SMOOTHING = 0.1


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


def import_pipeline(source: str, out: Path) -> dict[str, Any]:
    """`imgen import SOURCE --out RUN`: the pipeline as an imgen run (module docstring); returns what the run's
    config.json records of it."""
    from imgen_cli.runs import RunDir

    run = RunDir(out)
    if run.exists() or (out.exists() and any(out.iterdir())):
        raise UserError(f"--out {out} is not empty; give a new folder for the imported run.")
    pipeline = open_pipeline(source)
    cfg, pretrained, network = _amused_run(pipeline)
    _write_run(run, cfg, pretrained, network, pipeline)
    return run.read_config()["imported"]


def _amused_run(pipeline: Pipeline) -> tuple[Any, dict[str, Any], Any]:
    """An AmusedPipeline's RunConfig, the records of its pinned published weights, and its Muse network with the
    published weights."""
    from diffusers import UVit2DModel

    from imgen_cli import registry
    from imgen_cli.config import DataConfig, RunConfig, TrainConfig, build_dataclass
    from imgen_cli.train.setup import pin_published_weights

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
    family = registry.get("muse")
    cfg = RunConfig(family="muse", preset="imported", model=build_dataclass(family.config_cls(), model, "model"),
                    train=TrainConfig(), data=DataConfig())
    pretrained = pin_published_weights(cfg, None)
    network = family.build(cfg.model)
    network.uvit.model.load_state_dict(uvit.state_dict())
    return cfg, pretrained, network


def _load_diffusers(cls: type, path: Path, pipeline: Pipeline) -> Any:
    try:
        # low_cpu_mem_usage needs accelerate (not a dependency); without it diffusers warns on every load
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
    from diffusers import AmusedPipeline, AmusedScheduler

    from imgen_cli.models.published import PublishedAutoencoder
    from imgen_cli.nn.text import TransformersText

    if fmt != "diffusers":
        raise UserError(f"unknown --format {fmt!r}; imgen exports diffusers pipelines (--format diffusers).")
    model, cfg, path = trained.model, trained.config.model, trained.run.path
    if trained.family.name != "muse" or cfg.backbone != "uvit2d":
        raise UserError(f"{path} is a {trained.family.name} run on imgen's own network, which no diffusers "
                        f"pipeline loads; imgen exports Muse runs on aMUSEd's uvit2d backbone (imported with "
                        f"imgen import) as an AmusedPipeline.")
    text = model.text_encoder
    if not (isinstance(text, TransformersText) and text.kind == "clip_text_model" and text.penultimate
            and type(text.transformer).__name__ == "CLIPTextModelWithProjection"):
        raise UserError(f"{path} does not read a CLIPTextModelWithProjection's penultimate states, which is what an "
                        f"AmusedPipeline gives its transformer.")
    if not (isinstance(model.tokenizer, PublishedAutoencoder) and model.tokenizer.is_vq and model.tokenizer.zero_one):
        raise UserError(f"{path} is not on a diffusers VQModel of [0, 1] pixels, the tokenizer of an "
                        f"AmusedPipeline.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not an empty folder.")
    vocab = model.uvit.model.config.vocab_size
    scheduler = AmusedScheduler(mask_token_id=vocab - 1, masking_schedule=cfg.schedule)
    AmusedPipeline(vqvae=model.tokenizer.model, tokenizer=text.tokenizer, text_encoder=text.transformer,
                   transformer=model.uvit.model, scheduler=scheduler).save_pretrained(out)
    return "AmusedPipeline"
