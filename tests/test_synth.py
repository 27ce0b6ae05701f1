"""Behaviour of the built-in shapes world and its COCO 2017 captions layout."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgen_cli.cli import app
from imgen_cli.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_EXTENT,
    SIZES,
    Scene,
    caption_scene,
    make_example,
    render_scene,
    sample_scene,
    write_coco_layout,
)

# Written independently of the module's own tables, so a wrong synonym list cannot hide a wrong caption.
RELATION_WORDS = {
    "to the left of": {"left"},
    "to the right of": {"right"},
    "above": {"above", "over"},
    "below": {"below", "under", "beneath"},
}
INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def _scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nearest_palette_name(pixel: np.ndarray) -> str:
    palette = {**COLOURS, **{f"background:{k}": v for k, v in BACKGROUNDS.items()}}
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - pixel) ** 2)))


def test_vocabulary_meets_minimums_and_colours_are_distinct():
    assert len(SHAPES) >= 4 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 6
    assert len(SIZES) == 2 and SIZE_EXTENT[SIZES[1]] >= 1.5 * SIZE_EXTENT[SIZES[0]]
    palette = list(COLOURS.values()) + list(BACKGROUNDS.values())
    for i, a in enumerate(palette):
        for b in palette[i + 1 :]:
            assert np.linalg.norm(np.subtract(a, b)) > 60, (a, b)


def test_scenes_use_the_vocabulary_and_cover_it():
    scenes = _scenes(600)
    counts = [len(s.objects) for s in scenes]
    assert set(counts) == {1, 2} and 0.4 < counts.count(1) / len(counts) < 0.6
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.relation for s in scenes} == {None, *RELATION_WORDS}


def test_objects_stay_inside_the_image_and_two_objects_never_overlap():
    for scene in _scenes(1000):
        for obj in scene.objects:
            extent = SIZE_EXTENT[obj.size]
            assert extent <= obj.cx <= 1 - extent and extent <= obj.cy <= 1 - extent
        if len(scene.objects) == 2:
            a, b = scene.objects
            reach = SIZE_EXTENT[a.size] + SIZE_EXTENT[b.size]
            assert abs(a.cx - b.cx) > reach or abs(a.cy - b.cy) > reach, scene
            assert (a.shape, a.colour) != (b.shape, b.colour), "captions would be ambiguous"


def test_relation_is_true_of_the_object_centres():
    for scene in _scenes(1000):
        if len(scene.objects) == 1:
            assert scene.relation is None
            continue
        a, b = scene.objects
        dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
        expected = {
            "to the left of": dx > 0 and abs(dx) > abs(dy),
            "to the right of": dx < 0 and abs(dx) > abs(dy),
            "above": dy > 0 and abs(dy) > abs(dx),
            "below": dy < 0 and abs(dy) > abs(dx),
        }
        assert expected[scene.relation], scene


def _mention(caption: str, obj) -> int:
    """Index of the colour-and-shape mention of `obj` in `caption` (colour is always right before shape)."""
    hits = [caption.find(f"{obj.colour} {word}") for word in SHAPE_SYNONYMS[obj.shape]]
    hits = [h for h in hits if h >= 0]
    assert hits, f"{obj} not named in {caption!r}"
    return min(hits)


def _stated_relation(caption: str) -> str:
    words = set(re.findall(r"[a-z]+", caption))
    stated = [rel for rel, cues in RELATION_WORDS.items() if words & cues]
    assert len(stated) == 1, caption
    return stated[0]


def test_captions_name_every_object_and_state_a_true_relation():
    rng = random.Random(1)
    for scene in _scenes(400, seed=1):
        captions = caption_scene(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert caption == caption.lower() and caption == caption.strip()
            assert not caption.endswith("."), caption
            positions = [_mention(caption, obj) for obj in scene.objects]
            if scene.relation is not None:
                stated = _stated_relation(caption)
                # The object named first stands in the stated relation to the one named second.
                first_is_a = positions[0] < positions[1]
                assert stated == (scene.relation if first_is_a else INVERSE[scene.relation]), (scene, caption)


def test_single_object_captions_state_the_true_position():
    rng = random.Random(2)
    for scene in _scenes(300, seed=2):
        if scene.relation is not None:
            continue
        obj = scene.objects[0]
        for caption in caption_scene(scene, rng):
            words = set(re.findall(r"[a-z]+", caption))
            says_left, says_right = "left" in words, "right" in words
            says_top, says_bottom = bool(words & {"top", "upper"}), bool(words & {"bottom", "lower"})
            assert says_left == (obj.cx < 0.4) and says_right == (obj.cx > 0.6), (obj, caption)
            assert says_top == (obj.cy < 0.4) and says_bottom == (obj.cy > 0.6), (obj, caption)
            if not (says_left or says_right or says_top or says_bottom):
                assert words & {"center", "middle"}, caption


def test_rendered_pixels_match_object_and_background_colours():
    size = 64
    for index in range(150):
        image, _, scene = make_example(3, "train", index, size)
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image).astype(int)
        for obj in scene.objects:
            centre = pixels[int(obj.cy * size), int(obj.cx * size)]
            assert _nearest_palette_name(centre) == obj.colour, (scene, centre)
            assert np.abs(centre - COLOURS[obj.colour]).max() <= 12, (scene, centre)
        # Everything a few pixels outside every object's box is plain background (the resampling
        # filter reaches at most 3 output pixels).
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        background = np.ones((size, size), dtype=bool)
        for obj in scene.objects:
            reach = SIZE_EXTENT[obj.size] * size + 4
            near = (np.abs(xs - obj.cx * size) < reach) & (np.abs(ys - obj.cy * size) < reach)
            background &= ~near
        assert background[0, 0] or background[0, -1] or background[-1, 0] or background[-1, -1]
        assert (pixels[background] == BACKGROUNDS[scene.background]).all(), scene


@pytest.mark.parametrize("size", [16, 37, 128, 512])
def test_other_image_sizes_render(size):
    image, captions, scene = make_example(0, "val", 5, size)
    assert image.size == (size, size) and image.mode == "RGB"
    # The scene and captions do not depend on the resolution.
    _, captions_64, scene_64 = make_example(0, "val", 5, 64)
    assert (captions, scene) == (captions_64, scene_64)


def test_render_rejects_tiny_images():
    with pytest.raises(ValueError):
        render_scene(_scenes(1)[0], 8)


def test_make_example_depends_only_on_seed_split_and_index():
    first = [make_example(7, "train", i, 32) for i in range(5)]
    reordered = [make_example(7, "train", i, 32) for i in reversed(range(5))][::-1]
    for (img_a, caps_a, scene_a), (img_b, caps_b, scene_b) in zip(first, reordered, strict=True):
        assert img_a.tobytes() == img_b.tobytes() and caps_a == caps_b and scene_a == scene_b
    other_seed = [make_example(8, "train", i, 32)[1] for i in range(5)]
    assert other_seed != [captions for _, captions, _ in first]
    assert make_example(7, "val", 0, 32)[1] != first[0][1]


def _check_coco_layout(root: Path, n_train: int, n_val: int, size: int) -> None:
    image_ids: set[int] = set()
    annotation_ids: set[int] = set()
    for split, count, first_id in (("train", n_train, 1), ("val", n_val, n_train + 1)):
        doc = json.loads((root / "annotations" / f"captions_{split}2017.json").read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations"}
        assert {"description", "version", "year", "date_created"} <= set(doc["info"])
        assert len(doc["licenses"]) == 1
        license_ids = {lic["id"] for lic in doc["licenses"]}
        ids = [img["id"] for img in doc["images"]]
        assert ids == list(range(first_id, first_id + count))
        for img in doc["images"]:
            assert {"id", "file_name", "width", "height", "license", "date_captured", "coco_url"} <= set(img)
            assert img["file_name"] == f"{img['id']:012d}.png" and img["license"] in license_ids
            with Image.open(root / f"{split}2017" / img["file_name"]) as png:
                assert png.format == "PNG" and png.mode == "RGB"
                assert png.size == (img["width"], img["height"]) == (size, size)
        per_image: dict[int, int] = {}
        for ann in doc["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            assert ann["image_id"] in ids and isinstance(ann["caption"], str) and ann["caption"]
            per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
            assert ann["id"] not in annotation_ids
            annotation_ids.add(ann["id"])
        assert per_image == {i: 5 for i in ids}
        assert not image_ids & set(ids)
        image_ids |= set(ids)
        assert len(list((root / f"{split}2017").iterdir())) == count


def test_write_coco_layout_is_valid_and_reproducible(tmp_path):
    written: list[int] = []
    counts = write_coco_layout(tmp_path / "a", n_train=12, n_val=4, size=48, seed=5, progress=written.append)
    assert counts == {"train": 12, "val": 4}
    assert sum(written) == 16
    _check_coco_layout(tmp_path / "a", 12, 4, 48)

    write_coco_layout(tmp_path / "b", n_train=12, n_val=4, size=48, seed=5)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    write_coco_layout(tmp_path / "c", n_train=12, n_val=4, size=48, seed=6)
    original, other = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert other.keys() == original.keys()
    for name in ("annotations/captions_train2017.json", "train2017/000000000001.png"):
        assert other[name] != original[name], name


def test_images_match_make_example(tmp_path):
    write_coco_layout(tmp_path, n_train=3, n_val=2, size=32, seed=9)
    doc = json.loads((tmp_path / "annotations" / "captions_val2017.json").read_text())
    for index, img in enumerate(doc["images"]):
        expected, captions, _ = make_example(9, "val", index, 32)
        with Image.open(tmp_path / "val2017" / img["file_name"]) as png:
            assert png.tobytes() == expected.tobytes()
        assert [a["caption"] for a in doc["annotations"] if a["image_id"] == img["id"]] == captions


def test_parallel_writing_gives_the_same_bytes(tmp_path):
    write_coco_layout(tmp_path / "one", n_train=20, n_val=6, size=32, seed=2, workers=1)
    written: list[int] = []
    write_coco_layout(tmp_path / "two", 20, 6, size=32, seed=2, workers=2, progress=written.append)
    assert sum(written) == 26
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_rewriting_an_existing_directory_overwrites_its_files(tmp_path):
    write_coco_layout(tmp_path / "a", n_train=4, n_val=2, size=32, seed=1)
    write_coco_layout(tmp_path / "b", n_train=4, n_val=2, size=32, seed=0)
    write_coco_layout(tmp_path / "b", n_train=4, n_val=2, size=32, seed=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_held_out_pair_and_a_few_images_of_it(tmp_path: Path) -> None:
    """`--without "red circle"`: no scene has a red circle; `--only "red circle"`: every scene has one; the others
    are drawn as before, and the same arguments give the same scenes. Unknown pairs are one sentence."""
    from imgen_cli.data.synthetic import has_pair, make_example, parse_pair

    pair = parse_pair("red circle", "--only")
    held = [make_example(0, "train", i, 16, without=pair)[2] for i in range(200)]
    chosen = [make_example(0, "train", i, 16, only=pair)[2] for i in range(20)]
    plain = [make_example(0, "train", i, 16)[2] for i in range(200)]
    assert not any(has_pair(s, pair) for s in held) and all(has_pair(s, pair) for s in chosen)
    assert any(has_pair(s, pair) for s in plain)  # the pair is common enough that holding it out is a change
    assert [s for s in plain if not has_pair(s, pair)] == [s for s, p in zip(held, plain, strict=True)
                                                           if not has_pair(p, pair)]
    assert chosen == [make_example(0, "train", i, 16, only=pair)[2] for i in range(20)]
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--n", "2", "--without", "red hexagon"])
    assert result.exit_code == 2 and "--without takes a colour and a shape" in result.output
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "y"), "--n", "4", "--val", "0", "--size", "16",
                                      "--only", "red circle"])
    assert result.exit_code == 0, result.output
    captions = json.loads((tmp_path / "y" / "annotations" / "captions_train2017.json").read_text())["annotations"]
    assert all("red" in c["caption"] for c in captions)
