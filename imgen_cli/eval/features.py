"""The networks the metrics look through: InceptionV3 for standard FID/KID, and CLIP models.

Every feature extractor here takes images as float [0, 1] tensors of any square size and returns one
vector per image, so torchmetrics gets it as a custom `feature` module and the evaluation code never
cares which one it holds. Each has an `id` that names it completely (network and weights); scores and
cached reference statistics are labelled with it.

CLIP models come from three places, all behind one `--clip-model` value:
- an imgen run of the `clip` family (`runs/clip`): the offline evaluator, trained on the user's shards;
- `NAME:TAG`, an open_clip model with a pretrained tag (`ViT-B-32:openai`), loaded from the local caches;
- `NAME:/path/weights.pt` (or .safetensors), an open_clip architecture with weights from a local file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from imgen_cli.errors import UserError
from imgen_cli.models.clip import preprocess

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path(given: str | None) -> Path:
    """The torch-fidelity InceptionV3 weights: the given file, else the torch hub cache; never a download."""
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights {given} does not exist.")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not cached.is_file():
        raise UserError(f"the standard FID InceptionV3 weights are not available offline: expected {cached}.",
                        hint=f"Copy {INCEPTION_WEIGHTS} there, pass --inception-weights PATH, "
                             "or use --features clip.")
    return cached


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 pool features (2048-d), resized the TF1 way (`antialias=False`), so
    scores are comparable with published FIDs."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights), antialias=False)
        self.num_features = 2048
        self.id = f"inception-v3-compat:{weights.name}:antialias=False"

    def forward(self, images: Tensor) -> Tensor:
        uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(uint8).reshape(len(images), -1)


class ClipImageFeatures(nn.Module):
    """A CLIP image tower's unit-norm embeddings (FID in CLIP space, Kynkaanniemi et al. 2023)."""

    def __init__(self, clip: Any):
        super().__init__()
        self.clip = clip
        self.num_features = clip.embed_dim
        self.id = f"clip:{clip.id}"

    def forward(self, images: Tensor) -> Tensor:
        return self.clip.image_features(images)


class OpenClipModel(nn.Module):
    """Any open_clip model (a published one, or the network of an imgen `clip` run) as the evaluator:
    unit-norm features of images in [0, 1] and of captions."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        super().__init__()
        import open_clip

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.id = name
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.image_size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1))
        self.embed_dim = int(model.encode_text(tokenizer(["a"])).shape[-1])
        for p in self.parameters():
            p.requires_grad_(False)

    def image_features(self, images: Tensor) -> Tensor:
        return self.model.encode_image(preprocess(images, self.image_size, self.mean, self.std), normalize=True)

    def token_features(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens.to(self.mean.device), normalize=True)

    def text_features(self, captions: list[str]) -> Tensor:
        return self.token_features(self.tokenizer(captions))


def load_clip(spec: str | None, device: torch.device | str, runs_root: str = "runs") -> Any:
    """`--clip-model` -> an eval-mode model with `image_features`, `text_features` (unit norm), `embed_dim`, `id`."""
    if spec and ":" in spec and not Path(spec).exists():
        name, source = spec.split(":", 1)
        return _open_clip(name, source, device)
    from imgen_cli import registry
    from imgen_cli.runs import newest_run

    if spec is None:
        try:
            spec = str(newest_run(runs_root, family="clip").path)
        except UserError:
            raise UserError(f"no CLIP model to evaluate with (no clip run under {runs_root}/): pass --clip-model "
                            "RUN|NAME:TAG|NAME:FILE.",
                            hint="Train the offline one on your shards: imgen train --model clip --out runs/clip.") \
                from None
    trained = registry.load_trained(spec, "cpu", flag="--clip-model", runs_root=runs_root)
    if trained.family.name != "clip":
        raise UserError(f"--clip-model {spec} is a {trained.family.name} run, not a clip run.")
    name = f"imgen-clip:{trained.run.path.name}@step{trained.checkpoint.step}"
    return OpenClipModel(trained.model.clip, trained.model.tokenizer, name).to(device)


def _open_clip(name: str, source: str, device: torch.device | str) -> OpenClipModel:
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(f"--clip-model: {name!r} is not an open_clip model name (see open_clip.list_models()).")
    is_file = Path(source).expanduser().suffix in (".pt", ".pth", ".bin", ".safetensors")
    if is_file and not Path(source).expanduser().is_file():
        raise UserError(f"--clip-model {name}:{source}: the weights file does not exist.")
    try:
        model = open_clip.create_model(name, pretrained=str(Path(source).expanduser()) if is_file else source,
                                       device=device)
    except Exception as err:  # offline hub misses, unknown tags and bad files all surface here
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"could not load open_clip {name} with pretrained {source!r}: {reason}",
                        hint="Offline, give the weights as a local file (NAME:/path/weights.pt) or use an imgen "
                             "clip run (imgen train --model clip).") from None
    return OpenClipModel(model, open_clip.get_tokenizer(name), f"{name}:{source}").to(device)
