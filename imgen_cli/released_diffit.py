"""The released latent DiffiT checkpoints (NVlabs/DiffiT: class-conditional ImageNet 256 and 512) as imgen runs.

`imgen import hf:nvidia/DiffiT/diffit_256.safetensors --out runs/diffit-256` reads the released state dict (a
.safetensors file, or a tensors-only torch file), infers the network's size
from its shapes (DiffiT-XL/2: depth 28, width 1152, 16 heads, patch 2), checks every key, and writes a
`diffit-latent` run on the SD VAE (`--vae`, stabilityai/sd-vae-ft-ema by default, the released sampler's decoder)
whose step-0 checkpoint holds the weights under imgen's names. The network is imgen's `DiffiTViT`, which is the
released one: global TMSA with the time token's qkv projection and a relative position bias over the whole grid,
no adaLN, LayerNorms without affine, a GELU-tanh MLP, LN -> SiLU -> linear at the end. What the release adds is
taken up as options of the family, not special-cased here: the class table added to the time token, ADM's
learned-range variance (`learn_sigma`, 8 output channels), DiT's order of the fixed position embedding, ADM's
discrete linear schedule (the network is told the step index i) and its 250-step respaced DDPM.

The released sampler's settings come with the run (`sample.py` and the published slurm scripts): 250 DDPM steps on
ADM's respacing, the learned variance, no clipping, guidance on the first 3 of 4 latent channels, at 256 pixels
(a 32 x 32 latent grid or smaller) the power-cosine ramp s(t) = 1 + (w - 1)(1 - cos(pi (1 - t/1000)^4)) / 2 with
w = 4.4, at 512 a constant w = 1.49; latents are decoded as z / 0.18215. Class ids are ImageNet's, with
torchvision's names ("golden retriever" is 207). The release's uint8 conversion truncates ((x + 1) 127.5); imgen's
image writer rounds, so saved pixels may differ by one level.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imgen_cli import hub, pretrained
from imgen_cli.errors import UserError

SD_VAE = "hf:stabilityai/sd-vae-ft-ema"  # the released sampler's --vae_decoder ema
SD_VAE_SCALE = 0.18215  # the scale sample.py divides latents by
GUIDANCE_256 = 4.4  # slurm_sample_256.sh's --cfg_scale
GUIDANCE_512 = 1.49  # slurm_sample_512.sh's --cfg_scale
RAMPED_UP_TO_GRID = 32  # forward_with_cfg ramps the scale for latent grids up to 32 (256 px), else constant
GUIDANCE_POWER = 4.0  # --scale_pow
GUIDED_CHANNELS = 3  # forward_with_cfg guides eps[:, :3]
CLASS_DROPOUT = 0.1  # class_dropout_prob, for fine-tuning
IMAGENET_CLASSES = 1000
# the keys of a block, released name -> imgen's (under net.blocks.N.)
BLOCK_KEYS = {"attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
              "attn.qkv_temb.weight": "attn.qkv_time.weight", "attn.qkv_temb.bias": "attn.qkv_time.bias",
              "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
              "attn.relative_position_bias_table": "attn.bias_table",
              "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
              "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias"}
TOP_KEYS = {"x_embedder.proj.weight": "net.embed.weight", "x_embedder.proj.bias": "net.embed.bias",
            "t_embedder.mlp.0.weight": "time_embed.fc1.weight", "t_embedder.mlp.0.bias": "time_embed.fc1.bias",
            "t_embedder.mlp.2.weight": "time_embed.fc2.weight", "t_embedder.mlp.2.bias": "time_embed.fc2.bias",
            "y_embedder.embedding_table.weight": "text_encoder.table.weight",
            "final_layer.linear.weight": "net.out.weight", "final_layer.linear.bias": "net.out.bias"}
CHECKED_KEYS = ("pos_embed",)  # fixed tables imgen computes: compared with its own, not copied
CHECKED_BLOCK_KEYS = ("attn.relative_position_index",)


def is_checkpoint(source: str) -> bool:
    """Whether `imgen import SOURCE` names a weights file (a released checkpoint), not a pipeline folder."""
    return source.endswith(hub.WEIGHTS_FILES)


def read_state(source: str) -> tuple[dict[str, Tensor], Path]:
    """The state dict of a weights file (local or hf:ORG/REPO/FILE), read as tensors only, and where it is."""
    path = hub.local_path(source, "imgen import")
    if not path.is_file():
        raise UserError(f"imgen import {source}: no such file.")
    return pretrained.load_state_dict(path, "imgen import"), path


def released_shape(state: dict[str, Tensor], source: str) -> dict[str, Any]:
    """The network's size read from a released state dict's shapes, every key checked against it."""
    if "blocks.0.attn.qkv_temb.weight" not in state or "y_embedder.embedding_table.weight" not in state:
        raise UserError(f"{source} is not a released DiffiT checkpoint (NVlabs/DiffiT's class-conditional latent "
                        f"DiffiT: it has no blocks.0.attn.qkv_temb or y_embedder); imgen imports those and diffusers "
                        f"pipelines.")
    width, channels, patch, _ = state["x_embedder.proj.weight"].shape
    side = math.isqrt(state["pos_embed"].shape[1])
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    out = state["final_layer.linear.weight"].shape[0] // patch**2
    shape = {"width": width, "channels": channels, "patch": patch, "grid": side * patch, "depth": depth,
             "heads": state["blocks.0.attn.relative_position_bias_table"].shape[1],
             "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
             "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1, "learn_sigma": out == 2 * channels}
    expected = {*TOP_KEYS, *CHECKED_KEYS} | {f"blocks.{n}.{key}" for n in range(depth)
                                              for key in (*BLOCK_KEYS, *CHECKED_BLOCK_KEYS)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing:
        raise UserError(f"{source} lacks {missing[0]}, a key of the released DiffiT layout ({len(missing)} missing).")
    if unexpected:
        raise UserError(f"{source} has {unexpected[0]}, a key the released DiffiT layout does not have.")
    if out not in (channels, 2 * channels):
        raise UserError(f"{source} predicts {out} channels for {channels}-channel latents; the released DiffiT "
                        f"predicts {channels}, or {2 * channels} with its variance.")
    return shape


def run_model(shape: dict[str, Any], vae: str) -> dict[str, Any]:
    """The `diffit-latent` model keys of a released network of `shape`, with its sampler's settings."""
    ramped = shape["grid"] <= RAMPED_UP_TO_GRID
    return {"vq": vae, "latent_channels": shape["channels"], "grid": shape["grid"], "latent_scale": SD_VAE_SCALE,
            "patch": shape["patch"], "width": shape["width"], "depth": shape["depth"], "heads": shape["heads"],
            "mlp_ratio": shape["mlp_ratio"], "position_axes": "column-row", "condition": "class",
            "num_classes": shape["num_classes"], "cross_attention": False, "cond_dropout": CLASS_DROPOUT,
            "process": "vp", "schedule": "discrete-linear", "time_spacing": "adm", "prediction": "eps",
            "learn_sigma": shape["learn_sigma"], "guidance": GUIDANCE_256 if ramped else GUIDANCE_512,
            "guidance_schedule": "powercos" if ramped else "constant", "guidance_power": GUIDANCE_POWER,
            "guided_channels": GUIDED_CHANNELS if shape["channels"] > GUIDED_CHANNELS else 0}


def imgen_state(state: dict[str, Tensor], network: torch.nn.Module, source: str) -> dict[str, Tensor]:
    """The released weights under imgen's names, for `network` (the run's `LatentDiffiT`). The time embedding's
    first linear reads [sin | cos] features in imgen and [cos | sin] in the release, so its input columns swap
    halves; the fixed position embedding and relative-position index must be the ones imgen computes."""
    from imgen_cli.models.diffit_latent import DiffiTViT

    mapped = {imgen: state[released] for released, imgen in TOP_KEYS.items()}
    fc1 = mapped["time_embed.fc1.weight"]
    half = fc1.shape[1] // 2
    mapped["time_embed.fc1.weight"] = torch.cat([fc1[:, half:], fc1[:, :half]], dim=1)
    net: DiffiTViT = network.net
    for n, block in enumerate(net.blocks):
        mapped |= {f"net.blocks.{n}.{imgen}": state[f"blocks.{n}.{released}"] for released, imgen in BLOCK_KEYS.items()}
        if not torch.equal(state[f"blocks.{n}.attn.relative_position_index"].long(), block.attn.bias_index.cpu()):
            raise UserError(f"{source}: blocks.{n}.attn.relative_position_index is not the Swin-style index of the "
                            f"{net.blocks[0].attn.bias_index.shape[0]}-token grid that DiffiT's attention uses.")
    position = state["pos_embed"].reshape(net.position.shape).float()
    if not torch.allclose(position, net.position.cpu(), atol=1e-4):
        raise UserError(f"{source}: its pos_embed is not DiT's fixed sin-cos embedding of the grid, the one the "
                        f"released DiffiT writes.")
    return mapped


def class_names(num_classes: int) -> list[str]:
    """ImageNet's category names (torchvision's, in the standard class order) for a 1000-class checkpoint."""
    if num_classes != IMAGENET_CLASSES:
        return [str(i) for i in range(num_classes)]
    from torchvision.models import ResNet50_Weights  # its weights' metadata: the 1000 names, in order

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def import_checkpoint(source: str, out: Path, vae: str | None) -> dict[str, Any]:
    """`imgen import CHECKPOINT --out RUN [--vae NAME]` (module docstring); returns what config.json records of the
    import."""
    from imgen_cli.pipelines import imported_run
    from imgen_cli.runs import RunDir
    from imgen_cli.train.setup import run_config

    state, path = read_state(source)
    shape = released_shape(state, source)
    cfg, pretrained, network = imported_run("diffit-latent", run_model(shape, vae or SD_VAE))
    mapped = imgen_state(state, network, source)
    result = network.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:  # the key map covers the network; a change to it shows here
        raise UserError(f"{source}: imgen's network of this size has keys the release lacks "
                        f"({(result.missing_keys or result.unexpected_keys)[0]}).")
    config = run_config(cfg, pretrained, class_names(shape["num_classes"]))
    config["imported"] = {"source": source, "pipeline": "DiffiT", "weights": source, "files": hub.file_hashes(path),
                          "revision": hub.commit_of(path.parent) if hub.is_hub_name(source) else None}
    run = RunDir(out)
    run.write_config(config)
    weights = network.state_dict()
    run.save_checkpoint(0, weights, weights, {"step": 0, "imported": source}, keep_last=1)
    return config["imported"]
