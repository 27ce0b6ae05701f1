"""Does a model draw the colour-shape pair its prompt names? The held-out measurement of fine-tuning (issue 22).

    python bench/pair_accuracy.py SAMPLES_DIR [SAMPLES_DIR ...] --clip runs/clip

Each folder is an `imgen sample` output (PNGs and prompts.txt) for prompts of the shapes world that name the
pair (`--pair "red circle"`). An image counts as a hit when, in the in-project CLIP's space, its prompt is closer
to it than every variant of the prompt with the pair's colour swapped for another colour or its shape for another
shape (5 + 4 hard distractors, chance 1/10). R-precision's random val captions differ from the prompt in many
words at once, so an image of the right layout in the wrong colour can still win there; here only the pair
decides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imgen_cli.data.synthetic import COLOURS, SHAPE_SYNONYMS  # noqa: E402
from imgen_cli.eval.features import load_clip  # noqa: E402
from imgen_cli.sample import GRID_NAME, load_image  # noqa: E402


def variants(prompt: str, pair: tuple[str, str]) -> list[str]:
    """The prompt with the pair's colour word swapped for every other colour, then its shape word (the word after
    the colour: "red disc") for every other shape."""
    colour, shape = pair
    words = f" {prompt} "
    word = next(w for w in SHAPE_SYNONYMS[shape] if f" {colour} {w} " in words)
    named = f" {colour} {word} "
    out = [words.replace(named, f" {other} {word} ", 1).strip() for other in COLOURS if other != colour]
    out += [words.replace(named, f" {colour} {other} ", 1).strip() for other in SHAPE_SYNONYMS if other != shape]
    return out


def pair_accuracy(folder: Path, clip, pair: tuple[str, str]) -> float:
    prompts = (folder / "prompts.txt").read_text().splitlines()
    files = sorted(p for p in folder.glob("*.png") if p.name != GRID_NAME)
    hits = 0
    with torch.no_grad():
        for prompt, file in zip(prompts, files, strict=True):
            image = clip.image_features(load_image(file, 64))
            texts = clip.text_features([prompt, *variants(prompt, pair)])
            scores = (image @ texts.T)[0]
            hits += int(bool((scores[0] > scores[1:]).all()))
    return hits / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--pair", default="red circle", help="the colour and shape every prompt names")
    parser.add_argument("--clip", default="runs/clip")
    args = parser.parse_args()
    clip = load_clip(args.clip, "cpu")
    pair = tuple(args.pair.split())
    print(json.dumps({str(f): round(pair_accuracy(f, clip, pair), 3) for f in args.folders}, indent=1))


if __name__ == "__main__":
    main()
