"""The built-in "shapes" world: a tiny, fully controlled text-to-image dataset in the COCO 2017 layout.

Each image is a flat background with one or two coloured shapes. Everything a caption can say is
true by construction, so a model trained on it can be checked exactly:

* a scene has a background (`BACKGROUNDS`) and one or two objects, each with a shape (`SHAPES`),
  a colour (`COLOURS`), a size (`SIZES`) and a centre `(cx, cy)` in [0, 1] image coordinates
  (y grows downwards, as in the pixels);
* every shape fits inside a square box of half-side `SIZE_EXTENT[size]` around its centre. Two
  objects' boxes are kept apart along the axis of their relation, so they never overlap and the
  relation ("to the left of", "to the right of", "above", "below") of `objects[0]` to `objects[1]`
  is read from the centres, with that axis separating them at least twice as much as the other;
* two objects never share both shape and colour, so "the red circle" always names one of them;
* a single object's caption gives its position on a 3x3 grid ("in the top left", "in the center"...),
  and the sampler keeps centres well inside the grid cell it names.

Captions are lowercase paraphrases without a trailing period; every one names every object's colour
and shape (shape synonyms are unambiguous: circle/disc, square/box, ...). In two-object captions the
object mentioned first always stands in the stated relation to the one mentioned second.

`write_coco_layout` writes the real COCO 2017 captions layout (PNG instead of JPEG, to stay lossless):
`train2017/`, `val2017/` and `annotations/captions_{train,val}2017.json`. Each example is rendered from
its own RNG seeded by (seed, split, index), so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from imgen_cli.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

SIZES: tuple[str, ...] = ("small", "large")

# Half-side of the box each shape fits in, as a fraction of the image side. Two large objects
# (0.42 + gap) still fit side by side in the usable 1 - 2 * (0.21 + margin) of the image.
SIZE_EXTENT: dict[str, float] = {"small": 0.12, "large": 0.21}

RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}

_SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}

_RELATION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "to the left of": ("to the left of", "left of", "on the left of"),
    "to the right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

_INVERSE_RELATION: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

# Phrases for a single object's cell on a 3x3 grid, indexed by (row, column).
_POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the upper left", "at the top left"),
    (0, 1): ("at the top", "near the top", "in the top middle"),
    (0, 2): ("in the top right", "in the upper right", "at the top right"),
    (1, 0): ("on the left", "at the left", "on the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right", "on the right side"),
    (2, 0): ("in the bottom left", "in the lower left", "at the bottom left"),
    (2, 1): ("at the bottom", "near the bottom", "in the bottom middle"),
    (2, 2): ("in the bottom right", "in the lower right", "at the bottom right"),
}

# Single-object centres are sampled within the middle 40% of their third of the usable range, so they
# always land clearly on one side of these cut points whatever the object's size.
_GRID_CUTS = (0.4, 0.6)
_CELL_JITTER = 0.2

# Keeps every shape a little away from the image border, and two objects' boxes apart.
_MARGIN = 0.02
_GAP = 0.04
# The relation's axis must separate the centres at least this many times more than the other axis.
_DOMINANCE = 2.0

# Drawing at 4x and downsampling with Lanczos gives clean antialiased edges at any output size.
_SUPERSAMPLE = 4

_ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {pos} {bg_phrase}",
    "{a} {pos}",
    "{bg_phrase}, {a} {pos}",
    "{a} sitting {pos} of the image",
    "a {bg} image with {a} {pos}",
    "there is {a} {pos}",
    "a single {a_bare} {pos} {bg_phrase}",
    "{pos} there is {a}",
)

# Every template mentions {a} before {b} with {rel}, or {b} before {a} with {inv}: the object named
# first always stands in the stated relation to the one named second.
_TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b} {bg_phrase}",
    "{b} {inv} {a} {bg_phrase}",
    "{a} {rel} {b}",
    "{bg_phrase}, {b} sits {inv} {a}",
    "{bg_phrase}, {a} is {rel} {b}",
    "there is {a} {rel} {b}",
    "a {bg} scene with {a} {rel} {b}",
    "{a} placed {rel} {b} {bg_phrase}",
    "two shapes, {b} {inv} {a}",
)

_CAPTIONS_PER_IMAGE = 5
_FIXED_DATE = "2025-01-01 00:00:00"


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None  # relation of objects[0] to objects[1]; None for a single object


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: one or two objects (equally likely) on a random background."""
    background = rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:
        return Scene(background, (_sample_single_object(rng),), None)
    first = _sample_attributes(rng)
    second = _sample_attributes(rng)
    while second[:2] == first[:2]:  # same shape and colour would make "the red circle" ambiguous
        second = _sample_attributes(rng)
    (x0, y0), (x1, y1), relation = _sample_pair_positions(rng, first[2], second[2])
    return Scene(background, (ShapeObject(*first, x0, y0), ShapeObject(*second, x1, y1)), relation)


def _sample_attributes(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)


def _usable_range(size: str) -> tuple[float, float]:
    extent = SIZE_EXTENT[size] + _MARGIN
    return extent, 1.0 - extent


def _sample_single_object(rng: random.Random) -> ShapeObject:
    shape, colour, size = _sample_attributes(rng)
    lo, hi = _usable_range(size)
    row, col = rng.randrange(3), rng.randrange(3)
    cx = lo + (hi - lo) * (col + 0.5 + rng.uniform(-_CELL_JITTER, _CELL_JITTER)) / 3
    cy = lo + (hi - lo) * (row + 0.5 + rng.uniform(-_CELL_JITTER, _CELL_JITTER)) / 3
    return ShapeObject(shape, colour, size, cx, cy)


def _sample_pair_positions(
    rng: random.Random, size0: str, size1: str
) -> tuple[tuple[float, float], tuple[float, float], str]:
    """Rejection-sample two centres whose relation is unambiguous and whose boxes do not touch."""
    lo0, hi0 = _usable_range(size0)
    lo1, hi1 = _usable_range(size1)
    min_separation = SIZE_EXTENT[size0] + SIZE_EXTENT[size1] + _GAP
    while True:
        x0, y0 = rng.uniform(lo0, hi0), rng.uniform(lo0, hi0)
        x1, y1 = rng.uniform(lo1, hi1), rng.uniform(lo1, hi1)
        dx, dy = x1 - x0, y1 - y0
        if abs(dx) >= min_separation and abs(dx) >= _DOMINANCE * abs(dy):
            return (x0, y0), (x1, y1), "to the left of" if dx > 0 else "to the right of"
        if abs(dy) >= min_separation and abs(dy) >= _DOMINANCE * abs(dx):
            return (x0, y0), (x1, y1), "above" if dy > 0 else "below"


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render `scene` as an RGB image of `size` x `size` pixels (size >= 16)."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    canvas = size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, canvas)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, canvas: int) -> None:
    x, y, e = obj.cx * canvas, obj.cy * canvas, SIZE_EXTENT[obj.size] * canvas
    fill = COLOURS[obj.colour]
    # Extents differ per shape so that they look about equally heavy; all stay inside the box of half-side e.
    if obj.shape == "circle":
        draw.ellipse((x - e, y - e, x + e, y + e), fill=fill)
    elif obj.shape == "square":
        s = 0.85 * e
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - 0.9 * e), (x + e, y + 0.9 * e), (x - e, y + 0.9 * e)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - e), (x + e, y), (x, y + e), (x - e, y)], fill=fill)
    elif obj.shape == "cross":
        arm = 0.35 * e
        draw.rectangle((x - e, y - arm, x + e, y + arm), fill=fill)
        draw.rectangle((x - arm, y - e, x + arm, y + e), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def caption_scene(scene: Scene, rng: random.Random, n: int = _CAPTIONS_PER_IMAGE) -> list[str]:
    """Return `n` distinct paraphrased captions of `scene`, each naming every object's colour and shape."""
    templates = _TWO_OBJECT_TEMPLATES if len(scene.objects) == 2 else _ONE_OBJECT_TEMPLATES
    captions: list[str] = []
    deck: list[str] = []
    attempts = 0
    while len(captions) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"could not produce {n} distinct captions for {scene}")
        # Dealing templates from a shuffled deck spreads the n captions over different sentence structures.
        if not deck:
            deck = rng.sample(templates, len(templates))
        caption = deck.pop().format(**_caption_fields(scene, rng))
        if caption not in captions:
            captions.append(caption)
    return captions


def _caption_fields(scene: Scene, rng: random.Random) -> dict[str, str]:
    background = scene.background
    fields = {
        "bg": background,
        "bg_phrase": rng.choice(
            (f"on a {background} background", f"against a {background} background", f"on {background}")
        ),
    }
    bare = [_bare_noun_phrase(obj, rng) for obj in scene.objects]
    fields["a_bare"] = bare[0]
    fields["a"] = _with_article(bare[0])
    if scene.relation is None:
        fields["pos"] = rng.choice(_POSITION_PHRASES[_grid_cell(scene.objects[0])])
    else:
        fields["b"] = _with_article(bare[1])
        fields["rel"] = rng.choice(_RELATION_SYNONYMS[scene.relation])
        fields["inv"] = rng.choice(_RELATION_SYNONYMS[_INVERSE_RELATION[scene.relation]])
    return fields


def _bare_noun_phrase(obj: ShapeObject, rng: random.Random) -> str:
    """'small red circle' or 'red disc': colour directly followed by shape, size only sometimes."""
    words = [rng.choice(_SIZE_SYNONYMS[obj.size])] if rng.random() < 0.5 else []
    words += [obj.colour, rng.choice(SHAPE_SYNONYMS[obj.shape])]
    return " ".join(words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _grid_cell(obj: ShapeObject) -> tuple[int, int]:
    def third(v: float) -> int:
        return 0 if v < _GRID_CUTS[0] else 2 if v > _GRID_CUTS[1] else 1

    return third(obj.cy), third(obj.cx)


def parse_pair(text: str, flag: str) -> tuple[str, str]:
    """"red circle" -> ("red", "circle"): a colour and a shape of the shapes world."""
    words = text.split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise UserError(f"{flag} takes a colour and a shape, e.g. \"red circle\" (colours: {', '.join(COLOURS)}; "
                        f"shapes: {', '.join(SHAPES)}), got {text!r}.")
    return words[0], words[1]


def has_pair(scene: Scene, pair: tuple[str, str]) -> bool:
    return any((obj.colour, obj.shape) == pair for obj in scene.objects)


def make_example(seed: int, split: str, index: int, size: int, without: tuple[str, str] | None = None,
                 only: tuple[str, str] | None = None) -> tuple[Image.Image, list[str], Scene]:
    """Render example `index` of `split`; depends on (seed, split, index, size) only, never on call order. Scenes
    are drawn again (from the same RNG) until none of their objects is the colour-shape pair `without`, or until
    one is the pair `only` (held-out pairs, and a few images of one, for fine-tuning experiments)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    scene = sample_scene(rng)
    while (without and has_pair(scene, without)) or (only and not has_pair(scene, only)):
        scene = sample_scene(rng)
    return render_scene(scene, size), caption_scene(scene, rng), scene


def _write_example(task: tuple) -> list[str]:
    """Pool worker: render one example, save its PNG, and hand the captions back to the parent."""
    seed, split, index, size, path, without, only = task
    image, captions, _ = make_example(seed, split, index, size, without, only)
    # Fixed encoder settings (and no text chunks) keep the PNG bytes reproducible.
    image.save(path, format="PNG", optimize=False, compress_level=6)
    return captions


def write_coco_layout(
    out: Path,
    n_train: int,
    n_val: int,
    size: int = 64,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    without: tuple[str, str] | None = None,
    only: tuple[str, str] | None = None,
) -> dict[str, int]:
    """Write `n_train` + `n_val` shapes images in the COCO 2017 captions layout under `out`; with `without` or
    `only` (a colour and a shape), no image has that pair, or every image has it (see `make_example`).

    Image ids run 1..n_train for train and continue for val, so they are unique across splits, as are
    annotation ids. `progress(k)` is called with the number of images just written.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"image counts must be non-negative, got train={n_train}, val={n_val}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    if without is not None and without == only:
        raise UserError(f"--without and --only name the same pair, {' '.join(without)}; no image can be both.")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val}
    first_image_id = 1
    first_annotation_id = 1
    # "spawn" rather than fork: the caller may already hold torch threads, which fork can deadlock on.
    pool_context = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext()
    with pool_context as pool:
        for split, count in counts.items():
            image_dir = out / f"{split}2017"
            image_dir.mkdir(parents=True, exist_ok=True)
            image_ids = range(first_image_id, first_image_id + count)
            tasks = [
                (seed, split, index, size, str(image_dir / _file_name(image_id)), without, only)
                for index, image_id in enumerate(image_ids)
            ]
            if pool is None:
                results = map(_write_example, tasks)
            else:
                # imap keeps results in index order, so the json does not depend on scheduling.
                results = pool.imap(_write_example, tasks, chunksize=max(1, min(64, count // (4 * workers))))
            all_captions = []
            for captions in results:
                all_captions.append(captions)
                if progress is not None:
                    progress(1)
            document = _coco_document(seed, size, image_ids, all_captions, first_annotation_id)
            annotation_path = out / "annotations" / f"captions_{split}2017.json"
            annotation_path.write_text(json.dumps(document, sort_keys=True) + "\n", encoding="utf-8")
            first_image_id += count
            first_annotation_id += len(document["annotations"])
    return counts


CLASS_ATTRIBUTES = ("shape", "colour")  # what a class folder of the shapes world groups its images by


def write_class_folders(out: Path, n: int, by: str, size: int = 64, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """`n` single-object scenes in ImageNet's class-folder layout, `out/<class>/<index>.png`, one folder per
    shape or per colour (`by`); no captions (a class-conditional dataset, as ImageNet's train folders are).
    Example i is drawn from its own RNG seeded by (seed, i), as `make_example` draws its scenes. Returns the
    images per class."""
    if by not in CLASS_ATTRIBUTES:
        raise UserError(f"--class-folders groups images by {' or '.join(CLASS_ATTRIBUTES)}, got {by!r}.")
    counts = dict.fromkeys(SHAPES if by == "shape" else COLOURS, 0)
    for name in counts:
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        rng = random.Random(f"{seed}/classes/{index}")
        scene = Scene(rng.choice(list(BACKGROUNDS)), (_sample_single_object(rng),), None)
        label = getattr(scene.objects[0], by)
        render_scene(scene, size).save(Path(out) / label / f"{index:06d}.png", format="PNG", compress_level=6)
        counts[label] += 1
        if progress is not None:
            progress(1)
    return counts


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"


def _coco_document(
    seed: int, size: int, image_ids: range, captions: list[list[str]], first_annotation_id: int
) -> dict:
    images = [
        {
            "id": image_id,
            "file_name": _file_name(image_id),
            "width": size,
            "height": size,
            "license": 1,
            "date_captured": _FIXED_DATE,
            "coco_url": "",
            "flickr_url": "",
        }
        for image_id in image_ids
    ]
    annotations = []
    for image_id, image_captions in zip(image_ids, captions, strict=True):
        for caption in image_captions:
            annotations.append(
                {"id": first_annotation_id + len(annotations), "image_id": image_id, "caption": caption}
            )
    return {
        "info": {
            "description": f"imgen synthetic shapes world (seed {seed}, {size}x{size})",
            "url": "",
            "version": "1.0",
            "year": 2025,
            "contributor": "imgen",
            "date_created": "2025/01/01",
        },
        "licenses": [{"id": 1, "name": "Synthetic data, free to use", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
