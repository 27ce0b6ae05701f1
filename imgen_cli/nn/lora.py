"""Low-rank adapters (LoRA, Hu et al. 2021) on a family's network, through peft.

A LoRA run adapts a base run (`train.init`): the base's weights are loaded first, then peft wraps the chosen
linear layers, W x + (alpha / r) B A x with A, B of rank r (B starts at zero, so training starts at the base),
and only A and B train, are averaged by the EMA and are written to the checkpoints. Loading a LoRA run rebuilds
the same: the base from its checkpoint, the adapters from the run's. `merged` folds the adapters into the
weights (peft's merge), giving the family's plain network back.

Which layers: `train.lora_targets` (names or name suffixes of linear layers), by default every linear layer of
the network's attention and MLP modules (`OWNERS`: imgen's Attention and MLP, DiffiT's TMSA, the diffusers
backbones' Attention and FeedForward), not the embeddings' or the conditioning's; the text encoder's attention
projections only with `train.lora_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from imgen_cli.errors import UserError

ADAPTER = "default"  # peft's adapter name; one adapter per run
# the modules whose linear layers are adapted by default: imgen's Attention and MLP, DiffiT's TMSA, and diffusers'
# Attention and FeedForward (UVit2DModel's and Transformer2DModel's)
OWNERS = ("Attention", "MLP", "TMSA", "FeedForward")
# a text encoder's attention projections: transformers' CLIP (q_proj ... out_proj) and T5 (q, k, v, o), and the
# output projection of open_clip's attention
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "q", "k", "v", "o")


def target_layers(model: nn.Module, targets: Sequence[str] = ()) -> list[str]:
    """The full names of the linear layers outside the text encoder that `targets` name (a name or a name's
    suffix), or by default that lie inside an attention or MLP module (`OWNERS`)."""
    owners = {name for name, module in model.named_modules() if type(module).__name__ in OWNERS}

    def chosen(name: str) -> bool:
        if targets:
            return any(name == t or name.endswith("." + t) for t in targets)
        return any(name.startswith(owner + ".") for owner in owners)

    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not name.startswith("text_encoder.") and chosen(name)]
    if not names:
        raise UserError(f"train.lora_targets {', '.join(targets) or 'default'} name no linear layer of this "
                        f"network.")
    return names


def text_layers(model: nn.Module) -> list[str]:
    """The text encoder's attention projections (`TEXT_TARGETS`: transformers' CLIP and T5, open_clip's output
    projection; open_clip's fused input projection is no linear layer), where it is part of the network."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith("text_encoder.")
             and name.rpartition(".")[2] in TEXT_TARGETS]
    if not names:
        raise UserError("train.lora_text adapts the text encoder, but a frozen pretrained transformers encoder is "
                        "kept outside the network; add --set model.text_frozen=false (its weights stay frozen: "
                        "only the adapters train).")
    return names


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = (),
                 text: bool = False) -> list[str]:
    """Wrap the target layers of `model` (and with `text`, the text encoder's attention projections) in place
    with rank-r adapters (alpha 0 = r: scale 1) and freeze everything else; returns the wrapped layers' names."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = target_layers(model, targets) + (text_layers(model) if text else [])
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=layers, lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))
    return layers


def is_adapter(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters' entries of a state dict: what a LoRA run's checkpoints hold."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def merged(model: nn.Module) -> nn.Module:
    """`model` with every adapter folded into its layer's weight (W + (alpha / r) B A) and the wrappers removed,
    in place: the family's plain network, whose state dict has the base's keys."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def write_merged_run(trained: Any, out: Path, weights: str) -> None:
    """`imgen export RUN --merge --out NEW`: a LoRA run (loaded with its `weights`, "ema" or "raw") with its
    adapters folded into its base, written as an ordinary run: its config without the adapters (recording what
    it was merged from, under `merged`) and the merged weights at the run's step."""
    from imgen_cli.runs import RunDir

    cfg, path, step = trained.config, trained.run.path, trained.checkpoint.step
    if not cfg.train.lora:
        raise UserError(f"{path} has no LoRA adapters to merge (train.lora is 0); it is a whole network already.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not an empty folder.")
    state = merged(trained.model).state_dict()
    config = trained.run.read_config()
    config["train"] |= {"lora": 0, "lora_alpha": 0.0, "lora_targets": []}
    config["merged"] = {"run": str(path), "step": step, "weights": weights, "base": cfg.train.init}
    run = RunDir(out)
    run.write_config(config)
    run.save_checkpoint(step, state, state, {"step": step, "merged": str(path)}, keep_last=1)
