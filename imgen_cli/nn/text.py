"""The text encoder every generator family conditions on: an open_clip text tower and its BPE tokenizer.

A caption becomes three tensors (`TextStates`): the per-token states after the tower's final LayerNorm, for
cross-attention; a mask of the real tokens, SOT up to and including EOT; and the pooled embedding (the EOT
state, projected), a global vector for adaptive norms. The tower is either built small and trained with the
generator (`text_name` empty: the offline default) or taken from a pretrained open_clip CLIP, whose image
tower is dropped. Either can be frozen.

The tower is CLIP's causal transformer, so no state of a real token depends on the padding after EOT. The
mask comes from the EOT position (EOT has the largest id, so `argmax` finds it), never from `id != 0`:
id 0 is "!", a real token.

Classifier-free guidance needs a null condition. imgen's (as aMUSEd's) is this encoder's encoding of the
empty prompt, sequence and pooled vector alike; `drop_condition` swaps it in for training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from imgen_cli.errors import UserError
from imgen_cli.pretrained import open_clip_logs_silenced, unloadable


@dataclass
class TextEncoderConfig:
    """The text fields of a family config. Families inherit them, so recipes and `--set` reach them flat
    (`model.text_width=128`), prefixed to stay clear of the generator's own width and depth."""

    # an open_clip model whose text tower is used: a built-in name (ViT-B-32) or local-dir:/path of an export
    # (open_clip_config.json + weights); "" = a small tower built from the fields below
    text_name: str = ""
    text_pretrained: str = ""  # with a built-in text_name: an open_clip pretrained tag or a local checkpoint file
    text_width: int = 256  # scratch tower only, like layers and heads; a named tower brings its own
    text_layers: int = 4
    text_heads: int = 4
    text_context: int = 77  # tokens per caption, SOT and EOT included (77 is CLIP's; short captions need fewer)
    text_frozen: bool = False  # no gradient into the tower (the usual choice for a pretrained one)

    def validate(self) -> None:
        if self.text_pretrained and not self.text_name:
            raise UserError("model.text_pretrained needs model.text_name, the open_clip model the weights are for.")
        if not self.text_name:
            for name in ("text_width", "text_layers", "text_heads"):
                if getattr(self, name) < 1:
                    raise UserError(f"model.{name} must be at least 1, got {getattr(self, name)}.")
            if self.text_width % self.text_heads:
                raise UserError(f"model.text_width {self.text_width} is not divisible by "
                                f"model.text_heads {self.text_heads}.")
        if self.text_context < 2:
            raise UserError(f"model.text_context must be at least 2 (SOT and EOT), got {self.text_context}.")


@dataclass
class TextStates:
    """An encoded batch of captions."""

    states: Tensor  # [B, L, width] per-token states, for cross-attention
    mask: Tensor  # [B, L] bool, True = a real token (SOT .. EOT)
    pooled: Tensor  # [B, embed_dim] the projected EOT state, for adaptive norms

    def __len__(self) -> int:
        return self.states.shape[0]

    def where(self, replace: Tensor, other: TextStates) -> TextStates:
        """Per sample: `other`'s encoding where `replace` [B] is True, this one's elsewhere."""
        return TextStates(torch.where(replace[:, None, None], other.states, self.states),
                          torch.where(replace[:, None], other.mask, self.mask),
                          torch.where(replace[:, None], other.pooled, self.pooled))

    @staticmethod
    def cat(parts: list[TextStates]) -> TextStates:
        """Along the batch, e.g. unconditional and conditional halves for one guided forward."""
        return TextStates(torch.cat([p.states for p in parts]), torch.cat([p.mask for p in parts]),
                          torch.cat([p.pooled for p in parts]))


def drop_condition(text: TextStates, null: TextStates, p: float,
                   generator: torch.Generator | None = None) -> tuple[TextStates, Tensor]:
    """Conditioning dropout for classifier-free guidance: each sample draws u ~ U(0, 1) and takes the null
    condition iff u < p (the inverted test, a known bug of public Muse trainers, drops 1 - p instead).
    Returns the mixed encoding and the [B] mask of samples that were dropped."""
    u = torch.rand(len(text), generator=generator, device=text.states.device)
    dropped = u < p
    return text.where(dropped, null), dropped


class TextEncoder(nn.Module):
    """Captions -> `TextStates`, through an open_clip text tower (see the module docstring)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        cfg.validate()
        if cfg.text_name:
            self.tower = _pretrained_tower(cfg)
            self.tokenize = open_clip.get_tokenizer(cfg.text_name, context_length=cfg.text_context)
        else:
            self.tower = TextTransformer(context_length=cfg.text_context, width=cfg.text_width,
                                         heads=cfg.text_heads, layers=cfg.text_layers, output_dim=cfg.text_width)
            self.tokenize = open_clip.SimpleTokenizer(context_length=cfg.text_context)
        self.tower.output_tokens = True  # forward returns the per-token states besides the pooled vector
        self.width = self.tower.width
        self.embed_dim = self.tower.output_dim
        self.frozen = cfg.text_frozen
        if self.frozen:
            self.tower.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:  # a frozen tower stays in eval mode whatever the generator around it does
            self.tower.eval()
        return self

    def forward(self, captions: list[str]) -> TextStates:
        ids = self.tokenize(list(captions)).to(self.tower.positional_embedding.device)
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            pooled, states = self.tower(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = positions[None, :] <= ids.argmax(dim=1)[:, None]
        return TextStates(states, mask, pooled)

    def null(self, batch_size: int) -> TextStates:
        """The null condition of classifier-free guidance: the empty prompt's encoding, repeated."""
        empty = self([""])
        return TextStates(empty.states.expand(batch_size, -1, -1), empty.mask.expand(batch_size, -1),
                          empty.pooled.expand(batch_size, -1))


def _pretrained_tower(cfg: TextEncoderConfig) -> nn.Module:
    """The text tower of open_clip model `text_name`, with the weights of `text_pretrained` or of a
    `local-dir:` export (random without either)."""
    name, pretrained = cfg.text_name, cfg.text_pretrained
    local_dir = name.startswith("local-dir:")
    if name.startswith("hf-hub:"):
        raise UserError(f"model.text_name {name} would be downloaded from the Hugging Face hub; imgen downloads "
                        f"nothing: use a built-in name with a local checkpoint, or local-dir:/path of an export.")
    if local_dir and not (Path(name.removeprefix("local-dir:")) / "open_clip_config.json").is_file():
        raise UserError(f"model.text_name {name}: no open_clip_config.json in that directory.")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UserError(f"model.text_name {name!r} is not an open_clip model.",
                        "See open_clip.list_models() for the names, e.g. ViT-B-32.")
    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise UserError(f"open_clip model {name} has a Hugging Face text tower, which imgen does not support; "
                        f"choose a CLIP text transformer such as ViT-B-32.")
    positions = text_cfg.get("context_length", 77)
    if cfg.text_context > positions:
        raise UserError(f"model.text_context {cfg.text_context} is longer than the {positions} positions of "
                        f"{name}'s text tower.")
    # the tower at the configured length: a shorter context keeps the first positional embeddings
    text_cfg["context_length"] = cfg.text_context
    tower = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    if not (pretrained or local_dir):
        return tower
    looks_like_file = Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained
    if looks_like_file and not Path(pretrained).is_file():
        raise UserError(f"model.text_pretrained {pretrained} does not exist.",
                        "Give a local open_clip checkpoint file or a pretrained tag whose weights are cached.")
    try:
        with open_clip_logs_silenced():
            clip = open_clip.create_model(name, pretrained=pretrained or None)
    # open_clip reports a failed download, an unknown tag and an unreadable or mismatched file with
    # several exception types; each is the same user-fixable problem
    except Exception as err:
        reason = unloadable(err) if looks_like_file else str(err).splitlines()[0][:200].rstrip(".")
        raise UserError(f"could not load the {name} text encoder weights {pretrained!r}: {reason}.",
                        "Give a local checkpoint file, or a published open_clip tag (fetched into the Hugging Face "
                        "cache the first time; with HF_HUB_OFFLINE=1 only the cache is read).") from None
    # CLIP keeps the text modules at its top level under the tower's own names; CustomTextCLIP nests them
    state = (clip.text if isinstance(clip, open_clip.CustomTextCLIP) else clip).state_dict()
    state["positional_embedding"] = state["positional_embedding"][: cfg.text_context]
    tower.load_state_dict({key: state[key] for key in tower.state_dict()})
    return tower


def learned_null(state: Tensor, pooled: Tensor, batch: int, length: int) -> TextStates:
    """The learned null condition of guidance as a batch of text states: the learned state [width] at
    position 0 (the only real key), zeros after it, and the learned pooled vector [embed_dim]."""
    states = torch.cat([state.expand(batch, 1, -1), state.new_zeros(batch, length - 1, state.shape[0])], dim=1)
    mask = torch.arange(length, device=states.device).expand(batch, -1) == 0
    return TextStates(states, mask, pooled.expand(batch, -1))


def unconditional(encode: Callable[[list[str]], TextStates], null: TextStates,
                  negative_prompts: Sequence[str] | None, count: int) -> TextStates:
    """The branch guidance pushes away from: the null condition, or the negative prompts (one per prompt)
    through the family's own `encode`."""
    if negative_prompts is None:
        return null
    if len(negative_prompts) != count:
        raise UserError(f"{len(negative_prompts)} negative prompts for {count} prompts; give one each.")
    return encode(list(negative_prompts))
