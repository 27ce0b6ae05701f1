"""The networks the metrics look through: InceptionV3 for standard FID/KID, and CLIP models.

Every feature extractor here takes images as float [0, 1] tensors of any square size and returns one
vector per image, so torchmetrics gets it as a custom `feature` module and the evaluation code never
cares which one it holds. Each has an `id` that names it completely (network, and a hash of the weights' values
rather than where they came from); scores and cached reference statistics are labelled with it.

CLIP models come from three places, all behind one `--clip-model` value:
- an imgen run of the `clip` family (`runs/clip`): the offline evaluator, trained on the user's shards;
- `NAME:TAG`, an open_clip model with a published pretrained tag (`ViT-B-32:openai`): fetched from the Hugging
  Face hub into its cache (`$HF_HOME/hub`) the first time, read from there afterwards; with `HF_HUB_OFFLINE=1`
  only the cache is used, and a tag not in it is a one-sentence error;
- `NAME:/path/weights.pt` (or .safetensors), an open_clip architecture with weights from a local file.

No weights file runs code when loaded: torch files are read with `weights_only=True` (see `imgen_cli.pretrained`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from imgen_cli import pretrained
from imgen_cli.errors import UserError
from imgen_cli.models.clip import preprocess

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's release of the TF-ported weights, fetched into the torch hub cache as torch-fidelity does
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


def inception_weights_path(given: str | None) -> Path:
    """The torch-fidelity InceptionV3 weights: the given file, else the torch hub cache, downloaded there first
    when missing (and the hub is not off). The download is checked against the SHA-256 prefix in its name and
    only ever read as tensors (torch-fidelity's own loader unpickles it whole)."""
    from imgen_cli import hub

    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights {given} does not exist.")
        return path
    return hub.download_once(INCEPTION_URL, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS,
                             "the standard FID InceptionV3 weights", hash_prefix="6726825d",
                             hint=f"Run once online, copy {INCEPTION_WEIGHTS} into the torch hub's checkpoints "
                                  "folder, pass --inception-weights PATH, or use --features clip.")


def weights_digest(module: nn.Module) -> str:
    """12 hex digits of sha256 over every tensor of the module's state: the ids name the weights themselves, so
    two CLIP runs both called `clip` at step 2 never share cached reference features."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def fidelity_inception(cls: type, weights: Path, features_list: list[str], **options: Any) -> nn.Module:
    """torch-fidelity's InceptionV3 (`cls`: its extractor, or torchmetrics' subclass) with the weights of `weights`,
    giving `features_list`. torch-fidelity's constructor unpickles the weights file it is given with
    weights_only=False (it would run a crafted file's code), and there is no constructor without weights: it gets an
    in-memory copy of the tensors, loaded safely first."""
    state = pretrained.load_state_dict(weights, "the InceptionV3 weights file")
    copy = io.BytesIO()
    torch.save(state, copy)
    copy.seek(0)
    try:
        return cls(name="inception-v3-compat", features_list=features_list, feature_extractor_weights_path=copy,
                   **options)
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
        detail = " ".join(str(err).split("\n", 1)[-1].split())[:200]
        raise UserError(f"{weights} is not torch-fidelity's InceptionV3 state dict ({detail}).") from None


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 pool features (2048-d), resized the TF1 way (`antialias=False`), so
    scores are comparable with published FIDs."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = fidelity_inception(NoTrainInceptionV3, weights, ["2048"], antialias=False)
        self.num_features = 2048
        self.id = f"inception-v3-compat:{weights.name}:sha256={weights_digest(self.net)}:antialias=False"

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
        self.id = f"{name}:sha256={weights_digest(model)}"
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
            spec = str(newest_run(runs_root, families=["clip"]).path)
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
    from huggingface_hub import constants

    if name not in open_clip.list_models():
        raise UserError(f"--clip-model: {name!r} is not an open_clip model name (see open_clip.list_models()).")
    path = Path(source).expanduser()
    is_file = path.suffix in (".pt", ".pth", ".bin", ".safetensors")
    if is_file and not path.is_file():
        raise UserError(f"--clip-model {name}:{source}: the weights file does not exist.")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not is_file and source not in tags:
        raise UserError(f"--clip-model {name}:{source}: {source!r} is neither a weights file (.pt, .pth, .bin, "
                        f".safetensors) nor a pretrained tag of {name} ({', '.join(tags) or 'it has none'}).")
    try:
        with pretrained.open_clip_logs_silenced():
            model = open_clip.create_model(name, pretrained=str(path) if is_file else source)
    # open_clip says "Failed to download weights for tag ..." when the hub has no answer and the cache no file;
    # any other failure is the file's (a crafted pickle, a damaged or mismatched checkpoint)
    except Exception as err:
        if is_file or "Failed to download" not in str(err):
            raise UserError(f"--clip-model {name}:{source} cannot be loaded: {pretrained.unloadable(err)}.") from None
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"--clip-model {name}:{source} is not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set.",
                            hint="Fetch it once online, or give the weights as a file: --clip-model "
                                 f"{name}:/path/weights.pt.") from None
        raise UserError(f"could not fetch --clip-model {name}:{source} from the Hugging Face hub into "
                        f"{constants.HF_HUB_CACHE} (no connection?).",
                        hint=f"Give the weights as a file instead: --clip-model {name}:/path/weights.pt.") from None
    return OpenClipModel(model, open_clip.get_tokenizer(name), f"{name}:{source}").to(device)
