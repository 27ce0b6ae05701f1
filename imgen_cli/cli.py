"""The `imgen` command line: one thin function per subcommand (parse, call, render).

Heavy imports (torch, webdataset) happen inside the commands so `imgen --help` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from imgen_cli import hub
from imgen_cli.errors import ImgenError, UserError

app = typer.Typer(
    name="imgen",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    help=(
        "Token- and transformer-based text-to-image models: dataset -> shards -> training -> samples -> metrics.\n\n"
        "[bold]Quick start[/]\n\n"
        "  imgen synth coco/                 # the built-in shapes world, COCO layout\n\n"
        "  imgen tokenize coco/              # -> shards/\n\n"
        "  imgen train --model vqgan         # -> runs/vqgan/\n\n"
        "  imgen models                      # every family, its presets and status"
    ),
)
# markup off: paths, prompts and config values are printed as typed ("[/bad]" is a path, not a Rich tag)
err = Console(stderr=True, markup=False)
out = Console(markup=False)
_state = {"debug": False}

RUNS_ROOT = Path("runs")


def guarded(fn):
    """User errors become one red sentence and exit 2; run-time failures exit 1; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImgenError as e:
            if _state["debug"]:
                raise
            # soft wrap: the sentence stays one line, which the terminal folds, and a log keeps whole
            err.print(Text.assemble(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
            if e.hint:
                err.print(e.hint, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False):
    _state["debug"] = debug


SEED_MAX = 2**31 - 1  # the generators are seeded with seed * 1_000_003 + batch, which must fit torch's 64 bits
# the flags sample, edit and eval share: declared once, so they mean the same everywhere
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 \\[default: cuda if present].")]
SamplerSteps = Annotated[str | None, typer.Option(
    "--steps", help="Sampler steps \\[default: the family's]; a list (4,8,16) sweeps (sample: a folder per count).")]
Guidance = Annotated[float | None, typer.Option(
    "--guidance", help="Classifier-free guidance scale s (1 = none, 0 = unconditional) \\[default: the family's].")]
Truncation = Annotated[float | None, typer.Option(
    "--truncation", help="VQ-Diffusion: top-r truncation, keep the codes within this mass (1 = off) \\[default: 1].")]
Sampler = Annotated[str | None, typer.Option(
    "--sampler", help="The family's sampler: VQ-Diffusion posterior | purity (Improved's high-quality sampler); "
                      "Bit Diffusion and DiffiT ddpm | ddim | heun (EDM's second order, two calls per step).")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="Run the network under bfloat16 autocast (CPU or CUDA).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the network first (pays off over many batches).")]
CacheContext = Annotated[bool, typer.Option(
    "--cache-context/--no-cache-context",
    help="Compute the prompts' cross-attention keys and values once per run, not per step (same images).")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Same seed, same images.")]
TokenDecoder = Annotated[str | None, typer.Option("--decoder", help="Token models: decode with this decoder "
                                                 "fine-tuned on the tokenizer's codes (a vqgan run trained with --vq).")]
Offline = Annotated[bool, typer.Option("--offline", help="Read published weights (hf:, open_clip tags, Inception) "
                                       "from the caches only, as HF_HUB_OFFLINE=1 does.")]


def recipes_dir() -> Path:
    return Path(os.environ.get("IMGEN_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))


# --- synth ----------------------------------------------------------------------------------------------


@app.command(epilog="Example: imgen synth coco/ --n 5000 --size 64")
@guarded
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the dataset into (COCO 2017 layout).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Training images.")] = 2000,
    n_val: Annotated[int | None, typer.Option("--val", min=0, help="Validation images \\[default: n/10].")] = None,
    size: Annotated[int, typer.Option("--size", min=16, max=1024, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Same seed, same bytes.")] = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Rendering processes.")] = 1,
    without: Annotated[str | None, typer.Option("--without", help="A colour and shape no image shows, e.g. "
                                                "\"red circle\" (a pair held out of a base model's data).")] = None,
    only: Annotated[str | None, typer.Option("--only", help="A colour and shape every image shows (a few images "
                                             "of a held-out pair, for fine-tuning).")] = None,
    class_folders: Annotated[str | None, typer.Option("--class-folders", help="shape or colour: single-object "
                                                      "images in one folder per class, ImageNet's layout, "
                                                      "no captions.")] = None,
) -> None:
    """Write the built-in [bold]shapes[/] world: captioned images in the real COCO 2017 captions layout."""
    from imgen_cli.data.synthetic import parse_pair, write_class_folders, write_coco_layout

    if class_folders is not None:
        if without or only or n_val is not None:
            raise UserError("--class-folders writes one set of class folders (tokenize splits off the val "
                            "images); --without, --only and --val are for the captioned layout.")
        with _progress("synth", n) as advance:
            per_class = write_class_folders(out_dir, n, class_folders, size=size, seed=seed, progress=advance)
        out.print(f"wrote {n} images ({size}x{size}) in {len(per_class)} class folders to {out_dir}/", highlight=False)
        return

    held_out = parse_pair(without, "--without") if without is not None else None
    chosen = parse_pair(only, "--only") if only is not None else None
    n_val = n // 10 if n_val is None else n_val
    with _progress("synth", n + n_val) as advance:
        counts = write_coco_layout(out_dir, n, n_val, size=size, seed=seed, workers=workers, progress=advance,
                                   without=held_out, only=chosen)
    out.print(f"wrote {counts['train']} train + {counts['val']} val images ({size}x{size}) to {out_dir}/", highlight=False)


# --- tokenize -------------------------------------------------------------------------------------------


@app.command(epilog="Examples: imgen tokenize coco/ | imgen tokenize my_images/ --out shards --size 256 --workers 8 | "
                    "imgen tokenize my_dog/ --caption \"a photo of sks dog\" --out dog_shards")
@guarded
def tokenize(
    src: Annotated[Path, typer.Argument(help="COCO directory, folder of images with .txt captions, or WebDataset shards.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory for shards + manifest.json.")] = Path("shards"),
    size: Annotated[int | None, typer.Option("--size", help="Square side after resize + centre crop "
                                             "\\[default: the source's own size, at most 256].")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Decoding processes.")] = max(1, (os.cpu_count() or 2) - 1),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard.")] = 1000,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Held-out share for sources without a val split.")] = 0.05,
    caption: Annotated[str | None, typer.Option("--caption", help="A folder of images: the caption of every image "
                                                "without a .txt file (fine-tuning on a few images).")] = None,
    classes: Annotated[Path | None, typer.Option("--classes", help="A folder of class folders: its class index "
                                                 "(JSON {\"0\": [folder, name]} or lines \"FOLDER NAME\") "
                                                 "\\[default: sorted folder names; ImageNet's 1000 synsets by "
                                                 "their names].")] = None,
    vq: Annotated[str | None, typer.Option("--vq", help="Image tokenizer (vqgan run, diffusers VQModel or "
                                           "AutoencoderKL, hf:ORG/REPO/SUB): also store its tokens ({key}.vq.npy) "
                                           "or latents ({key}.latents.npy).")] = None,
    text_encoder: Annotated[str | None, typer.Option("--text-encoder", help="A transformers T5 or CLIP text model "
                                                     "(folder or hf:ORG/REPO/SUB): also store every caption's "
                                                     "states ({key}.text.npz).")] = None,
    text_layer: Annotated[str, typer.Option("--text-layer", help="With --text-encoder: last or penultimate.")] = "last",
    text_context: Annotated[int, typer.Option("--text-context", help="With --text-encoder: tokens per caption "
                                              "(the model's model.text_context).")] = 77,
    text_tokenizer: Annotated[str, typer.Option("--text-tokenizer", help="With --text-encoder: its tokenizer, where "
                                                "it is not beside the model.")] = "",
    device: Device = None,
    offline: Offline = False,
) -> None:
    """Turn a captioned image dataset into train/val WebDataset shards (images + captions [+ image tokens or
    latents] [+ caption states])."""
    if offline:
        hub.set_offline()
    from imgen_cli.data.tokenize import caption_encoder, token_encoder
    from imgen_cli.data.tokenize import tokenize as run_tokenize

    tokens = token_encoder(vq, device, size) if vq is not None else None
    text = caption_encoder(text_encoder, device, layer=text_layer, context=text_context,
                           tokenizer=text_tokenizer) if text_encoder is not None else None
    size = tokens.record["image_size"] if tokens is not None else size
    with _progress("tokenize", None) as advance:
        manifest = run_tokenize(src, out_dir, size=size, workers=workers, shard_size=shard_size,
                                val_fraction=val_fraction, caption=caption, classes=classes, tokens=tokens,
                                text=text, on_total=advance.set_total,
                                on_item=lambda: advance(1))
    table = Table(title=f"{out_dir}/ ({manifest['image_size']}px, from {manifest['source']['kind']})")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("shards", justify="right")
    for split, info in manifest["splits"].items():
        table.add_row(split, str(info["count"]), str(len(info["shards"])))
    for reason, count in manifest["skipped"].items():
        if count:
            table.add_row(f"skipped: {reason.replace('_', ' ')}", str(count), "")
    out.print(table)
    for line in _pre_encoded(manifest):
        out.print(line, highlight=False)
    if manifest["classes"]:
        names = [c["name"] for c in manifest["classes"]]
        out.print(f"{len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): {{key}}.cls",
                  highlight=False)
    total = sum(i["count"] for i in manifest["splits"].values()) + sum(manifest["skipped"].values())
    out.print(f"{total / max(manifest['seconds'], 1e-9):.0f} images/s", highlight=False)


def _pre_encoded(manifest: dict[str, Any]) -> list[str]:
    """What a tokenize run pre-encoded, in words."""
    lines = []
    tokenizer, text = manifest["tokenizer"], manifest["text_encoder"]
    if tokenizer is not None:
        grid = "x".join(map(str, tokenizer["grid"]))
        what = (f"{grid} tokens of {tokenizer['codebook_size']} codes" if "codebook_size" in tokenizer
                else f"{tokenizer['latent_channels']}x{grid} latents")
        lines.append(f"images: {what}, by {tokenizer['run']}")
    if text is not None:
        lines.append(f"captions: states of {text['text_encoder']} ({text['text_layer']} layer, "
                     f"{text['text_context']} tokens)")
    return lines


# --- train ------------------------------------------------------------------------------------------------


@app.command(epilog="Examples: imgen train --model vqgan | imgen train --model vqgan --preset tiny --steps 200 "
                    "--set train.lr=1e-4 | torchrun --nproc_per_node=8 -m imgen_cli train --model vqgan")
@guarded
def train(
    model: Annotated[str | None, typer.Option("--model", help="Family name (see `imgen models`).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Shards directory or shard list \\[default: shards].")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory \\[default: runs/MODEL]; "
                                                 "an existing run resumes.")] = None,
    vq: Annotated[str | None, typer.Option("--vq", help="Tokenizer run for the token families (and bitdiff's token mode).")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Start from this run's network and EMA weights (an imgen "
                                             "or imported run, or a checkpoint): fine-tuning.")] = None,
    init_raw: Annotated[bool, typer.Option("--init-raw", help="With --init: its raw weights, not the EMA ones.")] = False,
    lora: Annotated[int | None, typer.Option("--lora", min=1, help="With --init: train LoRA adapters of this rank "
                                             "(peft) instead of the whole network (train.lora).")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="TOML recipe \\[default: recipes/shapes/MODEL.toml].")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Size preset: tiny, small, base, ...")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Total optimizer steps.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, max=SEED_MAX, help="Training seed.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Override any key: --set train.lr=1e-4.")] = None,
    device: Device = None,
    offline: Offline = False,
    compile_model: Annotated[bool | None, typer.Option("--compile", help="torch.compile the model (train.compile).")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="Also log to RUN/tensorboard.")] = None,
) -> None:
    """Train a model (one process, or every rank under torchrun). Re-running on an existing --out resumes it."""
    if offline:
        hub.set_offline()
    from imgen_cli.train import distributed
    from imgen_cli.train.loop import train as run_train
    from imgen_cli.train.setup import TrainRequest, prepare

    main_rank = os.environ.get("RANK", "0") == "0"
    if init_raw and init is None:
        raise UserError("--init-raw goes with --init RUN, the run whose raw weights to start from.")
    request = TrainRequest(model=model, out=out_dir, recipe=recipe, preset=preset, vq=vq, init=init,
                           init_raw=init_raw, sets=sets or [],
                           flags={"data.shards": data, "train.steps": steps, "train.seed": seed, "train.lora": lora,
                                  "train.compile": compile_model, "train.tensorboard": tensorboard})
    prepared = prepare(request, RUNS_ROOT, recipes_dir(),
                       note=lambda m: err.print(m, highlight=False) if main_rank else None)
    run, cfg = prepared.run, prepared.cfg
    if prepared.done_at is not None:  # said before anything is written: the run stays as it is
        err.print(f"{run.path} is already at step {prepared.done_at.step} of train.steps {cfg.train.steps}: nothing "
                  "to train (raise --steps to train on).", highlight=False)
        return
    env = distributed.setup(device)
    try:
        # rank 0 holds the run's lock (torchrun stops the other ranks if it cannot have it)
        with run.lock() if env.is_main else contextlib.nullcontext():
            if env.is_main:
                run.write_config(prepared.config)
            result = run_train(cfg, run, env, err)
    finally:
        distributed.teardown()
    if env.is_main and result.stopped_early:
        raise typer.Exit(0)


# --- sample / edit / eval -------------------------------------------------------------------------------------


def _generator(ckpt: str | None, what: str, device: Any, flag: str = "--ckpt", say: bool = True,
               decoder: str | None = None) -> Any:
    """A trained text-to-image run (without `ckpt`: the newest one anywhere under runs/, named on stderr), decoding
    with `decoder` where given, or one sentence saying why this run cannot do `what`."""
    from imgen_cli import registry

    trained = registry.load_trained(ckpt, device, runs_root=str(RUNS_ROOT), flag=flag,
                                    families=registry.generators())
    if not trained.family.generates_images:
        raise UserError(f"{trained.run.path} is a {trained.family.name} run ({trained.family.summary}); {what} "
                        f"needs a text-to-image run ({', '.join(registry.generators())}).",
                        hint="Score a tokenizer with `imgen eval --recon`." if trained.family.is_tokenizer else None)
    if ckpt is None and say:
        err.print(f"{flag} {trained.run.path} (the newest text-to-image run under {RUNS_ROOT}/, step "
                  f"{trained.checkpoint.step})", highlight=False)
    if decoder is not None:
        registry.use_decoder(trained, decoder, device)
    return trained


@app.command(epilog='Examples: imgen sample "a red circle above a blue square" --ckpt runs/muse --n 8 --steps 12 | '
                    'imgen sample "a green cross" --ckpt runs/muse --sr runs/muse-sr --guidance 3 --guidance-ramp')
@guarded
def sample(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="A class-conditional run: a class id, a "
                                                      "class name or random; repeat for more.")] = None,
    ckpt: Annotated[str | None, typer.Option("--ckpt", help="Run directory \\[default: newest under runs/].")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    steps: SamplerSteps = None,
    guidance: Guidance = None,
    guidance_ramp: Annotated[bool | None, typer.Option("--guidance-ramp/--no-guidance-ramp", help="Muse: grow the guidance from 1 over the steps.")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt: replaces the unconditional branch of guidance.")] = None,
    super_res: Annotated[str | None, typer.Option("--sr", help="Muse: a super-resolution run that refines the tokens of --ckpt.")] = None,
    truncation: Truncation = None,
    sampler: Sampler = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images generated per forward batch.")] = 16,
    seed: Seed = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the PNGs, prompts.txt and grid.png go.")] = Path("samples"),
    device: Device = None,
    decoder: TokenDecoder = None,
    offline: Offline = False,
    bf16: Bf16 = False,
    compile_model: Compile = False,
    cache_context: CacheContext = True,
) -> None:
    """Generate images from text prompts (or class labels) with a trained run."""
    if offline:
        hub.set_offline()
    import time

    from imgen_cli import sample as pipeline
    from imgen_cli.train.distributed import pick_device

    if bool(prompts) == bool(classes):
        raise UserError("give prompts (a text-to-image run) or --class (a class-conditional run), one of the two.")
    pipeline.check_prompts(prompts or [])
    pipeline.check_out_dir(out_dir)
    sampling = pipeline.SamplingOptions(
        steps=pipeline.parse_steps(steps), guidance=guidance, guidance_ramp=guidance_ramp, negative=negative,
        truncation=truncation, sampler=sampler, seed=seed, batch_size=batch_size,
        speed=pipeline.Speed(cache_context=cache_context, bf16=bf16, compile=compile_model))
    dev = pick_device(device)
    trained = _generator(ckpt, "sampling", dev, decoder=decoder)
    model, refiner = trained.model, None
    if super_res is not None:
        refining = _generator(super_res, "super-resolution", dev, flag="--sr")
        pipeline.check_cascade(trained, refining)
        refiner = refining.model
    sampling.check(model.generate_tokens if refiner is not None else model.generate, trained.family.name)
    all_prompts, labels = pipeline.conditions(trained.run.path, trained.class_names, prompts, classes, n, seed)
    if classes and negative is not None:
        raise UserError("--negative is a prompt; a class-conditional run's guidance pushes away from the null class.")
    for network in (model, refiner):
        if network is not None:
            sampling.speed.prepare(network)
    for count in sampling.steps:
        folder = out_dir / f"steps-{count}" if len(sampling.steps) > 1 else out_dir
        started = time.perf_counter()
        with _progress("sample" if count is None else f"sample ({count} steps)", len(all_prompts)) as advance:
            images = pipeline.generate(model, all_prompts, sampling, count, advance=advance, super_res=refiner)
        seconds = time.perf_counter() - started
        grid = pipeline.save_images(images, labels, folder, per_row=n)
        out.print(f"{len(images)} images ({seconds / len(images):.3f} s each on {dev.type}) in {folder}/, "
                  f"grid: {grid}", highlight=False)


@app.command(epilog='Examples: imgen edit photo.png "a green square" --ckpt runs/muse --box 8,8,40,40 | '
                    'imgen edit photo.png "a red circle" --mask hole.png | imgen edit photo.png "a blue circle" '
                    '(mask-free, Muse)')
@guarded
def edit(
    image: Annotated[Path, typer.Argument(help="Image to edit (centre-cropped and resized to the model's size).")],
    prompt: Annotated[str | None, typer.Argument(help="What the edited image should show.")] = None,
    class_choice: Annotated[str | None, typer.Option("--class", help="A class-conditional run: the class (id or "
                                                     "name, or random) the edited image should show.")] = None,
    ckpt: Annotated[str | None, typer.Option("--ckpt", help="Run directory \\[default: newest under runs/].")] = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="PNG, white = region to repaint.")] = None,
    box: Annotated[str | None, typer.Option("--box", help="x0,y0,x1,y1: repaint inside this box (inpainting).")] = None,
    keep_box: Annotated[str | None, typer.Option("--keep-box", help="x0,y0,x1,y1: keep this box, repaint around it (outpainting).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Edited versions to make.")] = 4,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps \\[default: the family's].")] = None,
    guidance: Guidance = None,
    iterations: Annotated[int | None, typer.Option("--iterations", min=0, help="Mask-free editing: resampling rounds \\[default: 100].")] = None,
    truncation: Truncation = None,
    sampler: Sampler = None,
    seed: Seed = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the PNGs, prompts.txt and grid.png go.")] = Path("edits"),
    device: Device = None,
    decoder: TokenDecoder = None,
    offline: Offline = False,
    bf16: Bf16 = False,
    cache_context: CacheContext = True,
) -> None:
    """Inpaint (--mask, --box), outpaint (--keep-box) or, without a region, edit mask-free (Muse) under a new prompt."""
    if offline:
        hub.set_offline()
    import torch

    from imgen_cli import sample as pipeline
    from imgen_cli.train.distributed import pick_device

    if not image.is_file():
        raise UserError(f"{image} does not exist.")
    if (prompt is None) == (class_choice is None):
        raise UserError("give a prompt (a text-to-image run) or --class (a class-conditional run), one of the two.")
    prompts, classes = ([prompt], None) if prompt is not None else (None, [class_choice])
    pipeline.check_prompts(prompts or [])
    pipeline.check_out_dir(out_dir)
    dev = pick_device(device)
    trained = _generator(ckpt, "editing", dev, decoder=decoder)
    model = trained.model
    (condition,), (label,) = pipeline.conditions(trained.run.path, trained.class_names, prompts, classes, 1, seed)
    size = model.image_size
    source = pipeline.load_image(image, size)
    region = pipeline.region_mask(size, mask, box, keep_box)
    if region is not None and iterations is not None:
        raise UserError("--iterations is for mask-free editing; with a mask, --steps sets the decoding steps.")
    sampling = pipeline.SamplingOptions(steps=(steps,), guidance=guidance, iterations=iterations,
                                        truncation=truncation, sampler=sampler, seed=seed,
                                        speed=pipeline.Speed(cache_context=cache_context, bf16=bf16))
    sampling.check(model.edit, trained.family.name)
    with _progress("edit", n) as advance:
        edited = pipeline.edits(model, source, region, condition, n, sampling, advance)
    images = torch.cat([source, edited])
    grid = pipeline.save_images(images, ["(source)"] + [label] * n, out_dir, per_row=n + 1)
    how = "mask-free" if region is None else f"{int(region.sum())} of {size * size} pixels repainted"
    out.print(f"{n} edits ({how}) in {out_dir}/ (0000.png is the source), grid: {grid}", highlight=False)


@app.command(name="eval", epilog="Examples: imgen eval --ckpt runs/vqgan --recon | "
                                 "imgen eval --ckpt runs/muse --fid --features clip --clip-score --r-precision | "
                                 "imgen eval --images out/ --prompts prompts.txt --fid --kid | "
                                 "imgen eval --ckpt runs/muse --r-precision --steps 4,8,16,32 --json sweep.json | "
                                 "imgen eval --protocol imagenet256-fid50k --ckpt runs/diffit-256 | "
                                 "imgen eval --protocol imagenet256-fid50k --npz samples_50000x256x256x3.npz")
@guarded
def evaluate(
    ckpt: Annotated[str | None, typer.Option("--ckpt", help="Run to evaluate \\[default: newest under runs/].")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Shards with the real val split \\[default: the run's training shards; with --images: shards].")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Evaluate this folder of generated images instead of a run.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="With --images: one prompt per line, in the images' name order.")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Frechet distance to the real val images.")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="Kernel (MMD) distance to the real val images.")] = False,
    clip_score: Annotated[bool, typer.Option("--clip-score", help="100 x cosine(image, prompt) in CLIP space.")] = False,
    r_precision: Annotated[bool, typer.Option("--r-precision", help="Prompt ranked first among R val captions.")] = False,
    recon: Annotated[bool, typer.Option("--recon", help="Tokenizer reconstruction: PSNR, SSIM, codebook usage.")] = False,
    features: Annotated[str, typer.Option("--features", help="FID/KID feature space: inception (standard) | clip.")] = "inception",
    inception_weights: Annotated[str | None, typer.Option("--inception-weights", help="torch-fidelity's InceptionV3 state dict, weights-inception-2015-12-05-6726825d.pth (read as tensors only) \\[default: the torch hub cache, downloaded there when missing].")] = None,
    clip_model: Annotated[str | None, typer.Option("--clip-model", help="imgen clip RUN | open_clip NAME:TAG (fetched into the Hugging Face cache the first time; HF_HUB_OFFLINE=1 reads only the cache) | NAME:/path/weights.pt \\[default: newest clip run].")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Images to generate (or to reconstruct with --recon) \\[default: 1000].")] = None,
    protocol: Annotated[str | None, typer.Option("--protocol", help="A paper's number, everything it depends on pinned and recorded: imagenet256-fid50k | imagenet512-fid50k (ADM's evaluator: FID-50K, IS, sFID, precision, recall) | cifar10-fid50k (EDM's training-set statistics: FID-50K, IS) | coco30k (zero-shot COCO 2014 val FID-30K and CLIP score, with --data).")] = None,
    npz: Annotated[Path | None, typer.Option("--npz", help="With --protocol: an ADM sample batch (arr_0 uint8 NHWC) to score, or with --ckpt where to write the generated one \\[default: samples_NxHxWx3.npz].")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="With --protocol: the reference batch (ADM's .npz) \\[default: the protocol's, fetched once into the torch hub cache].")] = None,
    steps: SamplerSteps = None,
    guidance: Guidance = None,
    truncation: Truncation = None,
    sampler: Sampler = None,
    r: Annotated[int, typer.Option("--r", min=2, help="R-precision: captions ranked per image.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 50,
    seed: Seed = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write every number to this file.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="With several --steps: metric vs seconds per image, PNG \\[default: next to --json].")] = None,
    device: Device = None,
    decoder: TokenDecoder = None,
    offline: Offline = False,
    bf16: Bf16 = False,
    compile_model: Compile = False,
    cache_context: CacheContext = True,
) -> None:
    """Score a run: FID / KID / CLIP score / R-precision for generators, reconstruction metrics for tokenizers, or a
    paper's protocol (--protocol)."""
    if offline:
        hub.set_offline()
    if protocol is not None:
        from imgen_cli.eval import protocols
        from imgen_cli.sample import Speed

        on_captions = protocols.get(protocol).on_captions
        given = [flag for flag, on in (("--fid", fid), ("--kid", kid), ("--clip-score", clip_score),
                                       ("--r-precision", r_precision), ("--recon", recon), ("--images", images),
                                       ("--n", n), ("--features", features != "inception"),
                                       ("--data", data and not on_captions),
                                       ("--clip-model", clip_model and not on_captions),
                                       ("--npz", npz and on_captions), ("--ref", ref and on_captions)) if on]
        if given:
            raise UserError(f"--protocol {protocol} pins what it measures and against what; drop {given[0]}.")
        if on_captions and not data:
            raise UserError(f"--protocol {protocol} needs --data: the shards of its images and captions (COCO 2014 "
                            f"val: imgen tokenize coco2014/ --size 256 --out coco2014, from val2014/ and "
                            f"annotations/captions_val2014.json).")
        speed = Speed(cache_context=cache_context, bf16=bf16, compile=compile_model)
        return _evaluate_protocol(protocol, ckpt, npz, ref, data, clip_model, inception_weights, steps, guidance,
                                  sampler, batch_size, seed, json_path, device, decoder, speed)
    if npz is not None or ref is not None:
        raise UserError("--npz and --ref belong to --protocol (ADM's batches).")
    n = 1000 if n is None else n
    if recon:
        if fid or kid or clip_score or r_precision or images is not None:
            raise UserError("--recon scores a tokenizer run on its own; run the generation metrics separately.")
        return _evaluate_recon(ckpt, data, n, json_path, device)
    from imgen_cli import sample as pipeline
    from imgen_cli.eval.generative import EvalRequest, ImageFolder, evaluate, write_plot
    from imgen_cli.train import distributed

    sampling = pipeline.SamplingOptions(
        steps=pipeline.parse_steps(steps), guidance=guidance, truncation=truncation, sampler=sampler, seed=seed,
        batch_size=batch_size, speed=pipeline.Speed(cache_context=cache_context, bf16=bf16, compile=compile_model))
    req = EvalRequest(fid=fid, kid=kid, clip_score=clip_score, r_precision=r_precision, features=features,
                      inception_weights=inception_weights, clip_model=clip_model, n=n, r=r, sampling=sampling)
    req.validate()
    if images is not None and ckpt is not None:
        raise UserError("give either --ckpt (generate, then score) or --images (score a folder), not both.")
    env = distributed.setup(device)
    try:
        model, folder, subject, weights, class_names, defaults = None, None, str(images), None, None, None
        if images is not None:
            folder = ImageFolder.open(images, prompts)
        else:
            trained = _generator(ckpt, "evaluation", env.device, say=env.is_main, decoder=decoder)
            sampling.check(trained.model.generate, trained.family.name)
            model, subject = sampling.speed.prepare(trained.model), f"{trained.run.path} step {trained.checkpoint.step}"
            data = data or trained.config.data.shards
            weights = trained.run.read_config().get("pretrained")  # the published weights the run stands on
            class_names = trained.class_names
            defaults = pipeline.run_defaults(trained.config.model)
        note = (lambda m: err.print(m, highlight=False)) if env.is_main else (lambda m: None)
        progress = _progress if env.is_main else _silent_progress
        report = evaluate(req, data or "shards", env, progress, note, model=model, folder=folder,
                          runs_root=str(RUNS_ROOT), class_names=class_names)
    finally:
        distributed.teardown()
    if not env.is_main:
        return
    report["subject"] = subject
    if defaults is not None:  # the run's guidance settings: what a null settings.guidance stands for
        report["run_defaults"] = defaults
    if weights:
        report["pretrained"] = weights
    _print_eval(report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if len(report["rows"]) > 1:
        metric = next((m for m in ("fid", "r_precision", "clip_score", "kid") if m in report["rows"][0]), None)
        path = plot or (json_path.with_suffix(".png") if json_path is not None else Path("eval-sweep.png"))
        write_plot(report["rows"], metric, path)
        out.print(f"plot: {path}", highlight=False)


def _evaluate_protocol(name: str, ckpt: str | None, npz: Path | None, ref: str | None, data: str | None,
                       clip_model: str | None, inception_weights: str | None, steps: str | None,
                       guidance: float | None, sampler: str | None, batch_size: int, seed: int,
                       json_path: Path | None, device: str | None, decoder: str | None, speed: Any) -> None:
    """`imgen eval --protocol NAME`: a run's samples (or an ADM batch, --npz without --ckpt) scored as the protocol
    says (imgen_cli.eval.protocols)."""
    from imgen_cli import sample as pipeline
    from imgen_cli.eval import protocols
    from imgen_cli.train import distributed

    chosen = protocols.get(name)
    sampling = pipeline.SamplingOptions(steps=pipeline.parse_steps(steps), guidance=guidance, sampler=sampler,
                                        seed=seed, batch_size=batch_size, speed=speed)
    if len(sampling.steps) > 1:
        raise UserError(f"--protocol {name} scores one sampler setting; give one --steps value.")
    env = distributed.setup(device)
    try:
        model, class_count, settings, subject = None, 0, None, str(npz)
        if ckpt is not None or npz is None:  # generate from a run (the newest without --ckpt); else score the file
            trained = _generator(ckpt, "evaluation", env.device, say=env.is_main, decoder=decoder)
            if (trained.class_names is None) != chosen.on_captions:
                raise UserError(f"--protocol {name} scores a {'text' if chosen.on_captions else 'class'}-conditional "
                                f"run; {trained.run.path} is not one.")
            sampling.check(trained.model.generate, trained.family.name)
            model, class_count = sampling.speed.prepare(trained.model), len(trained.class_names or [])
            subject = f"{trained.run.path} step {trained.checkpoint.step}"
            settings = pipeline.run_defaults(trained.config.model)
        progress = _progress if env.is_main else _silent_progress
        note = (lambda m: err.print(m, highlight=False)) if env.is_main else (lambda m: None)
        if chosen.on_captions:
            report = protocols.run_on_captions(chosen, env=env, progress=progress, note=note, data=data,
                                               inception_weights=inception_weights, clip_model=clip_model,
                                               model=model, sampling=sampling, run_settings=settings)
        else:
            report = protocols.run(chosen, env=env, progress=progress, note=note,
                                   inception_weights=inception_weights, ref=ref, npz=npz, model=model,
                                   class_count=class_count, sampling=sampling, run_settings=settings)
    finally:
        distributed.teardown()
    if report is None or not env.is_main:
        return
    report["subject"] = subject
    if chosen.on_captions:
        _print_eval(report)
        out.print(f"self-check: {report['self_check']}", highlight=False)
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        return
    names = {"fid": "FID", "inception_score": "Inception Score", "sfid": "sFID", "precision": "precision",
             "recall": "recall"}
    table = Table(title=f"{subject}: {name} ({report['pinned']['samples_scored']} samples vs "
                        f"{report['pinned']['reference']['file']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in names.items():
        if key in report["metrics"]:
            table.add_row(label, f"{report['metrics'][key]:.4f}")
    out.print(table)
    out.print(f"features: {report['pinned']['features']}; self-check: {report['self_check']}", highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


def _print_eval(report: dict[str, Any]) -> None:
    names = {"fid": "FID", "kid": "KID", "clip_score": "CLIP score", "r_precision": f"R-precision (R={report['settings']['r']})",
             "seconds_per_image": "s / image"}
    rows = report["rows"]
    columns = [k for k in ("fid", "kid", "clip_score", "r_precision", "seconds_per_image") if k in rows[0]]
    table = Table(title=f"{report['subject']} vs {report['data']} val ({report['real_images']} real images)")
    table.add_column("images")
    for col in columns:
        table.add_column(names[col], justify="right")

    def cell(row: dict[str, Any], col: str) -> str:
        if col not in row:
            return ""
        return f"{row[col]:.4f} +- {row['kid_std']:.4f}" if col == "kid" else f"{row[col]:.4g}"

    for row in rows:
        label = "generated" if row.get("steps", 0) is None else f"{row['steps']} steps" if "steps" in row else "folder"
        table.add_row(f"{label} ({row['images']})", *(cell(row, col) for col in columns))
    if report["real"]:
        table.add_row("real val (ceiling)", *(cell(report["real"], col) for col in columns), style="dim")
    out.print(table)
    used = [f"features: {report['feature_extractor']}" if report["feature_extractor"] else "",
            f"CLIP: {report['clip_model']}" if report["clip_model"] else "",
            f"seed {report['settings']['seed']}, {report['seconds']:.0f}s"]
    out.print(", ".join(u for u in used if u), highlight=False)


def _evaluate_recon(ckpt: str | None, data: str | None, n: int, json_path: Path | None, device: str | None) -> None:
    from imgen_cli.eval.recon import evaluate_recon
    from imgen_cli.train.distributed import pick_device

    report = evaluate_recon(ckpt, data, n, pick_device(device), str(RUNS_ROOT), _progress)
    metrics = report["metrics"]
    table = Table(title=f"{report['run']} step {report['step']} on {report['data']} val ({metrics['images']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("PSNR (dB)", f"{float(metrics['psnr']):.2f}")  # "inf" in the JSON for an exact one
    table.add_row("SSIM", f"{metrics['ssim']:.4f}")
    table.add_row("codebook usage", f"{100 * metrics['codebook_usage']:.1f}% of {metrics['codebook_size']}")
    table.add_row("codebook perplexity", f"{metrics['codebook_perplexity']:.1f}")
    out.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")


# --- published pipelines ---------------------------------------------------------------------------------------


@app.command(name="import", epilog="Examples: imgen import hf:amused/amused-256 --out runs/amused-256 | "
                                   "imgen import ./my-amused-pipeline --out runs/mine | "
                                   "imgen import hf:nvidia/DiffiT/diffit_256.safetensors --out runs/diffit-256")
@guarded
def import_(
    source: Annotated[str, typer.Argument(help="A diffusers pipeline (hf:ORG/REPO[@REVISION] or a local folder), or "
                                          "a released DiffiT checkpoint (hf:ORG/REPO/FILE or a local file).")],
    out_dir: Annotated[Path, typer.Option("--out", help="The new run directory.")],
    vae: Annotated[str | None, typer.Option("--vae", help="A released DiffiT's decoder: an AutoencoderKL folder or "
                                            "hf: name (default hf:stabilityai/sd-vae-ft-ema, the release's).")] = None,
    offline: Offline = False,
) -> None:
    """Make a published pipeline (aMUSEd, VQ-Diffusion) or a released DiffiT checkpoint an imgen run: sample, edit,
    eval, fine-tune, export it."""
    if offline:
        hub.set_offline()
    from imgen_cli.pipelines import IMPORTED_AS, import_pipeline

    imported = import_pipeline(source, out_dir, vae)
    revision = f" at {imported['revision']}" if imported["revision"] else ""
    example = "--class \"golden retriever\"" if imported["pipeline"] == "DiffiT" else "\"a photo of a cat\""
    out.print(f"{imported['pipeline']} {imported['source']}{revision} -> {out_dir}/ (a "
              f"{IMPORTED_AS[imported['pipeline']]} run); try: imgen sample {example} --ckpt {out_dir}", highlight=False)


@app.command(epilog="Examples: imgen export runs/amused-256 --format diffusers --out amused-export/ | "
                    "imgen export runs/muse-lora --merge --out runs/muse-merged")
@guarded
def export(
    run: Annotated[str, typer.Argument(help="The run directory (or one of its checkpoints) to export.")],
    out_dir: Annotated[Path, typer.Option("--out", help="The pipeline folder to write (new or empty).")],
    fmt: Annotated[str, typer.Option("--format", help="diffusers: a pipeline folder its from_pretrained loads.")]
    = "diffusers",
    raw: Annotated[bool, typer.Option("--raw", help="Export the raw weights, not the EMA ones.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="A LoRA run: fold its adapters into its base and write "
                                        "an ordinary imgen run to --out (no pipeline).")] = False,
    offline: Offline = False,
) -> None:
    """Write a run on a published network as its diffusers pipeline (AmusedPipeline, VQDiffusionPipeline), or a LoRA
    run as an ordinary run (--merge)."""
    if offline:
        hub.set_offline()
    from imgen_cli import registry
    from imgen_cli.nn import lora
    from imgen_cli.pipelines import export_pipeline

    trained = registry.load_trained(run, "cpu", ema=not raw, flag="imgen export")
    if merge:
        lora.write_merged_run(trained, out_dir, "raw" if raw else "ema")
        out.print(f"{trained.run.path} (step {trained.checkpoint.step}) -> {out_dir}/, its adapters merged into "
                  f"its base", highlight=False)
        return
    if trained.config.train.lora:  # a pipeline has no adapters: they are folded in first
        lora.merged(trained.model)
    kind = export_pipeline(trained, out_dir, fmt)
    out.print(f"{trained.run.path} (step {trained.checkpoint.step}) -> {out_dir}/, a diffusers {kind}",
              highlight=False)


# --- models ---------------------------------------------------------------------------------------------------


@app.command(epilog="Example: imgen models")
@guarded
def models() -> None:
    """List the model families, their size presets and parameter counts."""
    from imgen_cli import registry
    from imgen_cli.pipelines import IMPORTED_AS

    table = Table(title="imgen model families")
    for col in ("model", "what", "paper", "presets (parameters)"):
        table.add_column(col)
    for fam in registry.FAMILIES.values():
        table.add_row(fam.name, fam.summary, fam.paper, ", ".join(_preset_size(fam, p) for p in fam.presets()))
    table.caption = (f"* token families are counted with K={NOMINAL_TOKENS[0]} codes and {NOMINAL_TOKENS[1]}x"
                     f"{NOMINAL_TOKENS[1]} tokens, diffit-latent with {NOMINAL_LATENTS[0]}-channel {NOMINAL_LATENTS[1]}x"
                     f"{NOMINAL_LATENTS[1]} latents (SD's VAE at 256px), where the preset leaves them to the --vq "
                     f"tokenizer; `imgen import` makes published pipelines and checkpoints runs: "
                     f"{', '.join(f'{k} -> {v}' for k, v in IMPORTED_AS.items())}")
    out.print(table)


NOMINAL_TOKENS = (1024, 8)  # the shapes tokenizer's codebook and grid, for counting token families' parameters
NOMINAL_LATENTS = (4, 32)  # latent channels and grid of the latent families' counts (DiffiT-XL/2's inputs)


def _preset_size(family: Any, preset: str) -> str:
    import torch

    from imgen_cli.config import build_dataclass

    values, mark = dict(family.presets()[preset]), ""
    if family.needs_vq_tokens and not values.get("codebook_size"):
        values.update(codebook_size=NOMINAL_TOKENS[0], grid=NOMINAL_TOKENS[1])
        mark = "*"
    if family.reads_latents and not values.get("latent_channels"):
        values.update(latent_channels=NOMINAL_LATENTS[0], grid=NOMINAL_LATENTS[1])
        mark = "*"
    cfg = build_dataclass(family.config_cls(), values, "model")
    with torch.device("meta"):  # no memory, no init cost, even for the GPU presets
        count = sum(p.numel() for p in family.build(cfg).parameters())
    return f"{preset}{mark} ({count / 1e6:.1f}M)"


# --- helpers ---------------------------------------------------------------------------------------------------


class _Advance:
    def __init__(self, progress: Any, task: Any):
        self.progress, self.task = progress, task

    def __call__(self, k: int = 1) -> None:
        self.progress.advance(self.task, k)

    def set_total(self, total: int | None) -> None:
        self.progress.update(self.task, total=total)


class _progress:
    """A Rich progress bar on a terminal; silent otherwise (the command prints its own summary)."""

    def __init__(self, label: str, total: int | None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=err, disable=not err.is_terminal)
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> _Advance:
        self.progress.__enter__()
        return _Advance(self.progress, self.task)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


class _silent_progress(_progress):
    """Ranks other than 0 keep quiet."""

    def __init__(self, label: str, total: int | None):
        super().__init__(label, total)
        self.progress.disable = True


def main() -> None:
    app(prog_name="imgen")


if __name__ == "__main__":
    sys.exit(main())
