"""Sampling and editing pipelines: prompts or an image in, seeded batches through the family contract
(`generate`, `edit`), PNG files out.

Seeds follow the image, not the batch layout: batch b of a call draws from a generator seeded by
(seed, b) with a fixed batch size, so the same command gives the same files. Every output folder gets
a `prompts.txt` with one line per image in file order, which is exactly what `imgen eval --images`
reads back.

`sample`, `edit` and `eval` each gather their flags into one `SamplingOptions`, which checks them against the
family's method and gives that method its keyword arguments. Its speed options (`Speed`) apply to every
generating command alike: cross-attention keys and values computed once per sampling run (on by default; the
images are the same either way), bf16 autocast, and torch.compile of the network.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from imgen_cli.data.sources import open_rgb
from imgen_cli.errors import UserError
from imgen_cli.nn.transformer import cached_context


@dataclass
class Speed:
    """How a generating command runs its network; none of these changes what the model computes, bf16 aside."""

    cache_context: bool = True  # cross-attention keys and values of the prompts once per run, not per step
    bf16: bool = False  # autocast the network to bfloat16 (CPU and CUDA)
    compile: bool = False  # torch.compile the network's forward (the first batch pays the compilation)

    def prepare(self, model: Any) -> Any:
        """The model, compiled in place if asked (its sampling methods call `self(...)`, which then runs the
        compiled forward)."""
        if self.compile:
            model.compile()
        return model

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Inference around one call of `generate` or `edit`."""
        device = next(model.parameters()).device
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.cache_context:
                stack.enter_context(cached_context(model))
            if self.bf16:
                stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
            yield


def batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + batch)


MAX_STEPS = 10_000  # sampler steps; beyond any schedule's use, and a typo of 1e20 must not hang the sampler


def parse_steps(text: str | None) -> tuple[int | None, ...]:
    """`--steps 4,8,16` -> (4, 8, 16); None -> (None,) (the family's default)."""
    if text is None:
        return (None,)
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--steps takes step counts separated by commas (4,8,16), got {text!r}.") from None
    if not values:
        raise UserError(f"--steps takes step counts separated by commas (4,8,16), got {text!r}.")
    return values


@dataclass(frozen=True)
class SamplingOptions:
    """What `sample`, `edit` and `eval` ask of a family's `generate` (or `edit`), one field per flag; None leaves the
    family's default. The step counts are checked when built, as the flags are read; the rest by `check`, once the
    run, and so the method, is known."""

    steps: tuple[int | None, ...] = (None,)  # sample and eval make a pass per count; edit takes one
    guidance: float | None = None
    guidance_ramp: bool | None = None
    negative: str | None = None  # one negative prompt for every image
    truncation: float | None = None
    sampler: str | None = None
    iterations: int | None = None  # mask-free editing's resampling rounds
    seed: int = 0
    batch_size: int = 16  # images per forward batch (part of the seeding: batch b draws from (seed, b))
    speed: Speed = field(default_factory=Speed)

    def __post_init__(self) -> None:
        for steps in self.steps:
            if steps is not None and not 1 <= steps <= MAX_STEPS:
                raise UserError(f"--steps must be from 1 to {MAX_STEPS}, got {steps}.")

    def keywords(self, steps: int | None, images: int = 1) -> dict[str, Any]:
        """The keyword arguments of one call of the family's method on `images` prompts at `steps`: the options
        set, under the method's names."""
        given = {"steps": steps, "guidance": self.guidance, "guidance_ramp": self.guidance_ramp,
                 "negative_prompts": None if self.negative is None else [self.negative] * images,
                 "iterations": self.iterations, "truncation": self.truncation, "sampler": self.sampler}
        return {name: value for name, value in given.items() if value is not None}

    def check(self, method: Callable, family: str) -> None:
        """Refuse, naming the flag, an option the family's method does not take, and values no sampler can use (a
        NaN guidance scale gives black images, not an error)."""
        accepted = inspect.signature(method).parameters  # a family's methods list every option they take
        for name in self.keywords(self.steps[0]):  # every step count sets the same names
            if name not in accepted:
                flag = "--negative" if name == "negative_prompts" else f"--{name.replace('_', '-')}"
                raise UserError(f"the {family} family does not take {flag}.")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UserError(f"--guidance must be a finite scale >= 0 (1 = no guidance, 0 = unconditional), "
                            f"got {self.guidance}.")
        if self.truncation is not None and not 0 < self.truncation <= 1:
            raise UserError(f"--truncation is the probability mass kept, in (0, 1], got {self.truncation}.")


def run_defaults(model_config: Any) -> dict[str, Any]:
    """For reports: what a run samples with where no flag says otherwise (its guidance settings, `model.guidance`
    and the like) and the noise schedule and prediction they apply to."""
    return {k: v for k, v in asdict(model_config).items()
            if k.startswith("guid") or k in ("schedule", "time_spacing", "learn_sigma", "prediction")}


def check_prompts(prompts: list[str]) -> list[str]:
    """Prompts as text: a command line in another encoding arrives as undecodable bytes, which no text encoder
    and no prompts.txt can take."""
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"the prompt {prompt.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text.") \
                from None
    return prompts


def conditions(run: Any, class_names: list[str] | None, prompts: list[str] | None, classes: list[str] | None,
               n: int, seed: int) -> tuple[list, list[str]]:
    """What the family's `generate` or `edit` takes for each image, and the line prompts.txt shows for it: each
    prompt n times for a text-to-image run; for a class-conditional one (`class_names`), the ids of the `--class`
    choices (`class_conditions`) and their names. The run must be of the kind the command line asks for."""
    if class_names is None:
        if classes:
            raise UserError(f"{run} is conditioned on text; give prompts, not --class.")
        repeated = [p for p in prompts for _ in range(n)]
        return repeated, repeated
    if not classes:
        raise UserError(f"{run} is class-conditional; choose classes with --class ID, --class NAME or --class random, "
                        f"not prompts.")
    ids = class_conditions(classes, class_names, n, seed)
    return ids, [class_names[i] for i in ids]


def class_conditions(choices: list[str], names: list[str], n: int, seed: int) -> list[int]:
    """`--class` values -> the class id of every image, `n` per value: an id, a name of the run's class index (any
    case), or `random`, which draws each of its n classes uniformly (from `seed`)."""
    by_name = {name.lower(): i for i, name in reversed(list(enumerate(names)))}  # a repeated name: its first id
    rng = torch.Generator().manual_seed(seed)
    ids = []
    for choice in choices:
        text = choice.strip()
        if text.lower() == "random":
            ids += torch.randint(0, len(names), (n,), generator=rng).tolist()
            continue
        if text.isdigit() and int(text) < len(names):
            ids += [int(text)] * n
        elif text.lower() in by_name:
            ids += [by_name[text.lower()]] * n
        else:
            shown = ", ".join(f"{i} {name}" for i, name in enumerate(names[:5])) + (", ..." if len(names) > 5 else "")
            raise UserError(f"--class {choice!r} is neither a class id (0 to {len(names) - 1}), a class name "
                            f"({shown}) nor random.")
    return ids


def check_out_dir(out_dir: Path, flag: str = "--out") -> Path:
    """Before any work: the output folder must be a folder (or not exist yet)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{flag} {out_dir} is a file, not a folder for the images.")
    return out_dir


@dataclass
class GeneratedBatch:
    indices: list[int]  # positions of these images in the prompt list
    images: Tensor  # [len(indices), 3, H, W] float in [0, 1], on the CPU
    seconds: float  # spent in the network (synchronised on CUDA), not in saving or scoring


def generated_batches(model: Any, prompts: list[str], sampling: SamplingOptions, steps: int | None, *,
                      super_res: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[GeneratedBatch]:
    """The one seeded loop of `sample` and `eval`: batch b of `prompts` draws from a generator seeded by (seed, b)
    and belongs to rank b mod world_size, so the images depend neither on the number of ranks nor on which command
    made them. With `super_res` (a Muse super-resolution model), `model` generates the low-resolution token grid
    and `super_res` the high-resolution one conditioned on it."""
    device = next(model.parameters()).device
    speed = sampling.speed
    for b, start in enumerate(range(0, len(prompts), sampling.batch_size)):
        if b % world_size != rank:
            continue
        chunk = prompts[start:start + sampling.batch_size]
        generator = batch_generator(sampling.seed, b, device)
        options = sampling.keywords(steps, len(chunk))
        started = time.perf_counter()
        if super_res is None:
            with speed.applied(model):
                images = model.generate(chunk, generator=generator, **options)
        else:
            with speed.applied(model):
                lowres = model.generate_tokens(chunk, generator=generator, **options)
            with speed.applied(super_res):
                images = super_res.generate(chunk, generator=generator, lowres_tokens=lowres, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        yield GeneratedBatch(list(range(start, start + len(chunk))), images.float().clamp(0, 1).cpu(), seconds)


def generate(model: Any, prompts: list[str], sampling: SamplingOptions, steps: int | None, *,
             advance: Callable[[int], None], super_res: Any = None) -> Tensor:
    """Images [len(prompts), 3, H, W] in [0, 1], in one process (see `generated_batches`)."""
    out = []
    for batch in generated_batches(model, prompts, sampling, steps, super_res=super_res):
        out.append(batch.images)
        advance(len(batch.indices))
    return torch.cat(out)


def check_cascade(base: Any, super_res: Any) -> None:
    """`sample --ckpt BASE --sr SUPER_RES` (two registry.TrainedModel): the base makes the token grid the
    super-resolution stage refines."""
    lowres = super_res.config.model.lowres_grid if super_res.family.refines_tokens else 0
    if not lowres:
        raise UserError("--sr must be a super-resolution Muse run (trained with model.lowres_grid > 0).")
    if not base.family.generates_tokens:
        raise UserError(f"the --ckpt run is a {base.family.name} run, which makes no token grid to refine.")
    if base.model.grid != lowres:
        raise UserError(f"the --sr run refines a {lowres}x{lowres} token grid, but the --ckpt run makes "
                        f"{base.model.grid}x{base.model.grid} tokens.")


GRID_NAME = "grid.png"  # the contact sheet beside the images; `eval --images` knows it is not one of them


def save_images(images: Tensor, prompts: list[str], out_dir: Path, per_row: int) -> Path:
    """`out_dir/0000.png ...`, `prompts.txt` (one line per file) and `grid.png`; returns the grid's path."""
    from torchvision.utils import save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"{i:04d}.png")
    (out_dir / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    grid = out_dir / GRID_NAME
    save_image(images, grid, nrow=per_row, padding=2, pad_value=1.0)
    return grid


def load_image(path: Path, size: int) -> Tensor:
    """An image file -> [1, 3, size, size] in [0, 1], centre-cropped to a square, then resized."""
    try:
        img = open_rgb(path)
    except Image.DecompressionBombError:
        raise UserError(f"{path} is too large: more than {Image.MAX_IMAGE_PIXELS} pixels.") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying truncated / not an image
        raise UserError(f"cannot read {path} as an image: {err}.") from None
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255


def parse_box(text: str, size: int, flag: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes four integers x0,y0,x1,y1 in pixels of the {size}x{size} image, "
                        f"got {text!r}.") from None
    x0, x1, y0, y1 = max(0, x0), min(size, x1), max(0, y0), min(size, y1)
    if x0 >= x1 or y0 >= y1:
        raise UserError(f"{flag} {text} covers no pixel of the {size}x{size} image.")
    return x0, y0, x1, y1


def region_mask(size: int, mask_path: Path | None, box: str | None, keep_box: str | None) -> Tensor | None:
    """[1, 1, size, size] bool, True = regenerate; None = no region (mask-free editing).

    --mask: a PNG whose white (>= 128) pixels are repainted; --box: repaint inside the box (inpainting);
    --keep-box: keep only the box and repaint everything around it (outpainting)."""
    given = [f for f, v in (("--mask", mask_path), ("--box", box), ("--keep-box", keep_box)) if v is not None]
    if len(given) > 1:
        raise UserError(f"give one of --mask, --box and --keep-box, not {' and '.join(given)}.")
    if mask_path is not None:
        if mask_path.is_dir():
            raise UserError(f"--mask {mask_path} is a directory, not an image.")
        if not mask_path.is_file():
            raise UserError(f"--mask {mask_path} does not exist.")
        mask = load_image(mask_path, size).mean(1, keepdim=True) >= 0.5
    elif box is not None or keep_box is not None:
        x0, y0, x1, y1 = parse_box(box or keep_box, size, "--box" if box else "--keep-box")
        mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
        mask[..., y0:y1, x0:x1] = True
        if keep_box is not None:
            mask = ~mask
    else:
        return None
    if not mask.any():
        raise UserError("the mask selects no pixel to repaint (white = repaint).")
    return mask


def edits(model: Any, source: Tensor, region: Tensor | None, prompt: str | int, n: int, sampling: SamplingOptions,
          advance: Callable[[int], None]) -> Tensor:
    """`n` edits of `source` [1, 3, H, W], edit i seeded by (seed, i): [n, 3, H, W] on the CPU."""
    device = next(model.parameters()).device
    (steps,) = sampling.steps
    out = []
    for i in range(n):
        out.append(edit(model, source, region, prompt, generator=batch_generator(sampling.seed, i, device),
                        options=sampling.keywords(steps), speed=sampling.speed))
        advance(1)
    return torch.cat(out)


def edit(model: Any, source: Tensor, region: Tensor | None, prompt: str | int, *, generator: torch.Generator,
         options: dict[str, Any], speed: Speed | None = None) -> Tensor:
    """One edit of `source` [1, 3, H, W] under `prompt` (a class id, for a class-conditional model): the family's
    `edit` (mask-free without a region), then, with a region, the source's own pixels outside the cells it touches.
    Returns [1, 3, H, W] on the CPU."""
    device = next(model.parameters()).device
    with (speed or Speed()).applied(model):
        result = model.edit(source.to(device), None if region is None else region.to(device), [prompt],
                            generator=generator, **options).float().clamp(0, 1).cpu()
    if region is None:
        return result
    return composite(source.cpu(), result, region.cpu(), cell=model.edit_cell)


def composite(source: Tensor, edited: Tensor, mask: Tensor, cell: int) -> Tensor:
    """The edit inside the repainted region, the source's own pixels everywhere else.

    A token family regenerates whole f x f cells and decodes every token, so even kept tokens come back
    only as well as the tokenizer reconstructs them; pasting the source back outside the cells the mask
    touches keeps those pixels exact (MaskGIT composites the same way)."""
    cells = F.max_pool2d(mask.float(), cell) if cell > 1 else mask.float()
    region = F.interpolate(cells, scale_factor=cell, mode="nearest").bool() if cell > 1 else mask
    return torch.where(region, edited, source)
