from pathlib import Path

import pytest

from imgen_cli import registry
from imgen_cli.config import TrainConfig, load_recipe, parse_set, resolve
from imgen_cli.errors import UserError
from imgen_cli.models.vqgan import PRESETS, VQGANConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_precedence_recipe_preset_set_flags(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, """
family = "vqgan"
preset = "tiny"
[model]
codebook_size = 32      # refines the recipe's own preset
quantizer = "ema"
[train]
lr = 0.5
steps = 7
batch_size = 4
"""))
    cfg = resolve("vqgan", VQGANConfig, PRESETS, recipe=recipe, sets=["train.steps=9", "train.lr=0.25"],
                  flags={"train.steps": 11, "data.shards": None})
    assert cfg.preset == "tiny"
    assert cfg.model.channels == PRESETS["tiny"]["channels"]  # the recipe's preset is the base...
    assert cfg.model.codebook_size == 32  # ...which the recipe's [model] table refines
    assert cfg.model.quantizer == "ema"  # recipe > defaults
    assert cfg.train.lr == 0.25  # --set > recipe
    assert cfg.train.steps == 11  # flag > --set
    assert cfg.train.batch_size == 4
    assert cfg.data.shards == "shards"  # a flag left unset changes nothing
    # --preset on the command line beats the recipe, even for keys its [model] table sets
    cfg = resolve("vqgan", VQGANConfig, PRESETS, recipe=recipe, preset="small")
    assert cfg.preset == "small" and cfg.model.codebook_size == PRESETS["small"]["codebook_size"]
    assert cfg.model.quantizer == "ema"  # keys the preset leaves alone still come from the recipe


def test_set_overrides_preset_and_explicit_preset_overrides_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, 'preset = "small"\n'))
    cfg = resolve("vqgan", VQGANConfig, PRESETS, recipe=recipe, preset="tiny", sets=["model.codebook_size=48"])
    assert cfg.preset == "tiny"
    assert cfg.model.channels == PRESETS["tiny"]["channels"]
    assert cfg.model.codebook_size == 48


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "[train]\nlearning_rate = 1e-3\n"))
    expected = r"unknown key train\.learning_rate.*valid keys in \[train\]: steps, batch_size"
    with pytest.raises(UserError, match=expected):
        resolve("vqgan", VQGANConfig, PRESETS, recipe=recipe)
    with pytest.raises(UserError, match=r"unknown key model\.widht; valid keys in \[model\]: image_size"):
        resolve("vqgan", VQGANConfig, PRESETS, sets=["model.widht=3"])
    with pytest.raises(UserError, match=r"unknown key 'optim\.lr'"):
        resolve("vqgan", VQGANConfig, PRESETS, sets=["optim.lr=3"])


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\nlr = 1"))
    with pytest.raises(UserError, match="unknown key 'optimizer'.*valid keys: data, family, model, preset"):
        load_recipe(write(tmp_path, "optimizer = 1\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="unknown preset 'huge'.*tiny, small, base"):
        resolve("vqgan", VQGANConfig, PRESETS, preset="huge")


def test_set_parsing_and_types() -> None:
    assert parse_set("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_set("train.betas=[0.5, 0.9]") == ("train.betas", [0.5, 0.9])
    assert parse_set("data.shards=/data/x") == ("data.shards", "/data/x")  # not TOML: a plain string
    with pytest.raises(UserError, match="key=value"):
        parse_set("train.lr")
    with pytest.raises(UserError, match="train.steps must be an integer"):
        resolve("vqgan", VQGANConfig, PRESETS, sets=["train.steps=1.5"])
    with pytest.raises(UserError, match="train.lr must be positive"):
        resolve("vqgan", VQGANConfig, PRESETS, sets=["train.lr=-1"])
    cfg = resolve("vqgan", VQGANConfig, PRESETS, sets=["train.betas=[0.5, 0.9]", "train.lr=1"])
    assert cfg.train.betas == (0.5, 0.9) and isinstance(cfg.train.lr, float)
    assert TrainConfig().betas == (0.9, 0.99)


def test_shipped_recipes_load() -> None:
    root = Path(__file__).resolve().parent.parent / "recipes"
    recipes = sorted(root.glob("*/*.toml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        # muse.toml, muse-sr.toml: recipes of muse; diffit-latent.toml: of diffit-latent
        assert path.stem == recipe["family"] or path.stem.startswith(recipe["family"] + "-")
        family = registry.get(recipe["family"])
        resolve(family.name, family.config_cls(), family.presets(), recipe=recipe)
