"""The text encoder every generator family conditions on: a caption becomes `TextStates`.

Three kinds of encoder, one output. `TextStates` holds the per-token states, for cross-attention; a mask of the
real tokens; and a pooled vector, a global condition for adaptive norms.
- open_clip's text tower with its BPE tokenizer, built small and trained with the generator (`text_name` empty:
  the default, no weights needed) or taken from a pretrained open_clip CLIP (`text_name`, `text_pretrained`),
  whose image tower is dropped. States after the final LayerNorm; the mask runs from SOT up to and including EOT
  (found as the largest id, never as `id != 0`: id 0 is "!", a real token); pooled = the projected EOT state.
- a transformers text model (`text_encoder`, any weights name of `imgen_cli.hub`): T5's encoder (Muse's choice;
  t5-v1_1, flan-t5) or CLIP's text model (VQ-Diffusion's and aMUSEd's), with the model's own tokenizer. States
  of the last layer (after the final norm) or the penultimate one (`text_layer`, aMUSEd's choice); the mask is
  the tokenizer's attention mask; pooled = CLIP's pooler output (projected, for CLIPTextModelWithProjection),
  or for T5, which has none, the mean of the real tokens' states.

A pretrained encoder is frozen unless `text_frozen=false`. A frozen transformers model is held outside the
state dict (as a tokenizer is): a run stores its pinned name, not a copy of T5-XXL's weights in every checkpoint.
A frozen encoder's states can be computed once, by `imgen tokenize --text-encoder`: the shards then carry them
(`text_encoder_record` names the encoder they came from) and training reads them (`from_batch`) instead of
running the encoder every step; prompts at sampling time go through the same encoder.

Classifier-free guidance needs a null condition. imgen's (as aMUSEd's) is this encoder's encoding of the
empty prompt, sequence and pooled vector alike; `drop_condition` swaps it in for training.

A class-conditional model (`condition = "class"`) takes class ids instead of captions through the same
interface: `ClassEncoder`, a learned embedding per class (DiT's and DiffiT's label embedding) as a one-token
sequence and as the pooled vector, so every family conditions on a class exactly where it conditions on text;
its null condition is one more learned row, the null class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    # a transformers T5 or CLIP text model: hf:ORG/REPO[/SUBFOLDER][@REVISION] or a local save_pretrained folder
    text_encoder: str = ""
    text_tokenizer: str = ""  # its tokenizer, where it is not beside the model or in the repository's tokenizer/
    text_layer: str = "last"  # transformers encoders: the states of the "last" layer or the "penultimate" one
    # an open_clip model whose text tower is used: a built-in name (ViT-B-32), hf-hub:ORG/REPO, or local-dir:/path
    # of an export (open_clip_config.json + weights); "" (and no text_encoder) = a small tower built from the
    # fields below
    text_name: str = ""
    text_pretrained: str = ""  # with a built-in text_name: an open_clip pretrained tag or a local checkpoint file
    text_width: int = 256  # scratch tower only, like layers and heads; a named tower brings its own
    text_layers: int = 4
    text_heads: int = 4
    text_context: int = 77  # tokens per caption, SOT and EOT included (77 is CLIP's; short captions need fewer)
    text_frozen: bool | None = None  # no gradient into the encoder; unset = frozen iff pretrained
    # "text": captions through the encoder above; "class": class ids (shards with {key}.cls) through a learned
    # table of num_classes + 1 rows of text_width, the last the null class
    condition: str = "text"
    num_classes: int = 0  # classes of a class-conditional model; 0 = the training shards' count

    @property
    def text_is_pretrained(self) -> bool:
        """Weights come with the encoder (a named open_clip tower without them is random, and trains)."""
        return bool(self.text_encoder or self.text_pretrained or self.text_name.startswith(("local-dir:", "hf-hub:")))

    @property
    def text_is_frozen(self) -> bool:
        return self.text_is_pretrained if self.text_frozen is None else self.text_frozen

    def validate(self) -> None:
        if self.condition not in ("text", "class"):
            raise UserError(f"model.condition must be text or class, got {self.condition!r}.")
        if self.condition == "class" and (self.text_encoder or self.text_name):
            raise UserError("a class-conditional model (model.condition=class) has no text encoder; unset "
                            "model.text_encoder and model.text_name.")
        if self.num_classes < 0 or (self.condition == "text" and self.num_classes):
            raise UserError(f"model.num_classes is the class count of a class-conditional model (model.condition="
                            f"class), got {self.num_classes}.")
        if self.text_encoder and self.text_name:
            raise UserError("model.text_encoder (a transformers model) and model.text_name (an open_clip one) are "
                            "two choices of encoder; set one.")
        if self.text_tokenizer and not self.text_encoder:
            raise UserError("model.text_tokenizer needs model.text_encoder, the transformers model it tokenizes for.")
        if self.text_layer not in ("last", "penultimate"):
            raise UserError(f"model.text_layer must be last or penultimate, got {self.text_layer!r}.")
        if self.text_pretrained and not self.text_name:
            raise UserError("model.text_pretrained needs model.text_name, the open_clip model the weights are for.")
        if not (self.text_encoder or self.text_name):  # the scratch tower's shape
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
    """Captions -> `TextStates`: the base of both kinds of encoder (see the module docstring). `width` is the
    states' size, `embed_dim` the pooled vector's."""

    width: int
    embed_dim: int
    frozen: bool
    learns_null = False  # the null condition is part of the encoder's own weights (the null class)

    def encode(self, captions: list[str]) -> TextStates:
        raise NotImplementedError

    # a frozen encoder's encoding of the empty prompt, computed once per autocast state (bf16 under autocast)
    _empty: dict[tuple[bool, bool], TextStates] | None = None

    def forward(self, captions: list[str]) -> TextStates:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.encode(list(captions))

    def from_batch(self, batch: dict) -> TextStates:
        """A training batch's captions encoded: the states the shards carry (`imgen tokenize --text-encoder`, checked
        to be this encoder's when the run starts) where the encoder is frozen, else the encoder run on them."""
        if self.frozen and "text_states" in batch:
            return TextStates(batch["text_states"], batch["text_mask"], batch["text_pooled"])
        return self(batch["caption"])

    def conditions(self, batch: dict) -> list:
        """What `generate` takes for a training batch's samples (their captions), for the previews."""
        return batch["caption"]

    def null(self, batch_size: int) -> TextStates:
        """The null condition of classifier-free guidance: the empty prompt's encoding, repeated."""
        autocast = (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
        cache = self._empty if self._empty is not None else {}
        empty = cache.get(autocast)
        if empty is None:
            empty = self([""])
            if self.frozen:  # a frozen encoder's is a constant: not one more encoder call every training step
                self._empty = {**cache, autocast: empty}
        return TextStates(empty.states.expand(batch_size, -1, -1), empty.mask.expand(batch_size, -1),
                          empty.pooled.expand(batch_size, -1))

    def _apply(self, fn: Callable, recurse: bool = True) -> TextEncoder:
        self._empty = None  # moved or cast: encode the empty prompt again where the encoder now is
        return super()._apply(fn, recurse)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The encoder `cfg` describes: class labels, a transformers model, else an open_clip tower (named or scratch)."""
    cfg.validate()
    if cfg.condition == "class":
        return ClassEncoder(cfg)
    return TransformersText(cfg) if cfg.text_encoder else OpenCLIPText(cfg)


class ClassEncoder(TextEncoder):
    """Class ids -> `TextStates`: row y of a learned table [num_classes + 1, width] as a one-token sequence and as
    the pooled vector; row num_classes is the null class of guidance (DiT's LabelEmbedder, whose dropout swaps in
    that row, as `drop_condition` does here)."""

    frozen = False
    learns_null = True

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.num_classes < 1:
            raise UserError("a class-conditional model needs model.num_classes (train sets it from the shards' "
                            "class index).")
        self.num_classes = cfg.num_classes
        self.width = self.embed_dim = cfg.text_width
        self.table = nn.Embedding(cfg.num_classes + 1, cfg.text_width)
        nn.init.normal_(self.table.weight, std=0.02)

    def encode(self, labels: Sequence[int] | Tensor) -> TextStates:
        """Class ids a user gave (checked: the null class is not one of them)."""
        bad = [int(y) for y in labels if not 0 <= int(y) < self.num_classes]
        if bad:
            raise UserError(f"class ids run from 0 to {self.num_classes - 1}, got {bad[0]}.")
        return self._embedded(torch.as_tensor(labels, dtype=torch.long, device=self.table.weight.device))

    def _embedded(self, ids: Tensor) -> TextStates:
        embedding = self.table(ids)
        return TextStates(embedding[:, None], torch.ones(len(ids), 1, dtype=torch.bool, device=ids.device), embedding)

    def from_batch(self, batch: dict) -> TextStates:
        """The labels of a training batch (the run checked them against num_classes when it started)."""
        return self._embedded(batch["label"])

    def conditions(self, batch: dict) -> list[int]:
        return batch["label"].tolist()

    def null(self, batch_size: int) -> TextStates:
        return self._embedded(torch.full((batch_size,), self.num_classes, device=self.table.weight.device))


class OpenCLIPText(TextEncoder):
    """An open_clip text tower (scratch or pretrained), part of the state dict even when frozen."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
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
        self.frozen = cfg.text_is_frozen
        if self.frozen:
            self.tower.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> OpenCLIPText:
        super().train(mode)
        if self.frozen:  # a frozen tower stays in eval mode whatever the generator around it does
            self.tower.eval()
        return self

    def encode(self, captions: list[str]) -> TextStates:
        ids = self.tokenize(captions).to(self.tower.positional_embedding.device)
        pooled, states = self.tower(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = positions[None, :] <= ids.argmax(dim=1)[:, None]
        return TextStates(states, mask, pooled)


class TransformersText(TextEncoder):
    """A transformers T5 encoder or CLIP text model and its own tokenizer; frozen, it is held outside the state
    dict (`_held`) and follows the network's device and dtype through `_apply`."""

    _held: tuple[nn.Module, ...] = ()

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        model, self.tokenizer = load_transformers_text(cfg)
        self.kind = model.config.model_type  # "t5" or "clip_text_model"
        self.penultimate = cfg.text_layer == "penultimate"
        self.context = cfg.text_context
        self.width = model.config.hidden_size  # T5's d_model, under the name every transformers config answers to
        self.embed_dim = model.config.projection_dim if _projects(model) else self.width
        self.frozen = cfg.text_is_frozen
        if self.frozen:
            self._held = (model.requires_grad_(False).eval(),)
        else:
            self.model = model

    @property
    def transformer(self) -> nn.Module:
        return self._held[0] if self._held else self.model

    def _apply(self, fn: Callable, recurse: bool = True) -> TransformersText:
        for model in self._held:  # not a submodule, yet it must follow devices and dtypes
            model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def encode(self, captions: list[str]) -> TextStates:
        model = self.transformer
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.context, truncation=True,
                                return_tensors="pt").to(model.device)
        # CLIP's attention is causal, so a real token's states never see the padding after it; run as every CLIP
        # pipeline runs it (no attention mask), its padding positions' states are the ones a consumer that reads
        # all positions (aMUSEd's UVit2D) was trained on. T5 attends both ways and needs the mask.
        mask = tokens.attention_mask if self.kind == "t5" else None
        out = model(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=self.penultimate)
        states = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        mask = tokens.attention_mask.bool()
        if self.kind == "t5":  # no pooled output: the mean of the real tokens' final states
            weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1)
        else:
            pooled = out.text_embeds if _projects(model) else out.pooler_output
        return TextStates(states, mask, pooled)


def _projects(model: nn.Module) -> bool:
    return type(model).__name__ == "CLIPTextModelWithProjection"


# the transformers classes imgen conditions on, by the `architectures` entry of a saved config.json (a config
# without one, or of a whole CLIPModel / T5 seq2seq model, takes the encoder of its model_type)
TEXT_MODELS = {"T5EncoderModel": "T5EncoderModel", "T5ForConditionalGeneration": "T5EncoderModel",
               "T5Model": "T5EncoderModel", "CLIPTextModel": "CLIPTextModel",
               "CLIPTextModelWithProjection": "CLIPTextModelWithProjection", "CLIPModel": "CLIPTextModelWithProjection"}
BY_MODEL_TYPE = {"t5": "T5EncoderModel", "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModelWithProjection"}


def load_transformers_text(cfg: TextEncoderConfig) -> tuple[nn.Module, Callable]:
    """`model.text_encoder` (and `text_tokenizer`) -> the transformers text model and its tokenizer."""
    import json

    import transformers

    from imgen_cli import hub

    path = hub.local_path(cfg.text_encoder, "model.text_encoder")
    config = path / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    name = next((TEXT_MODELS[a] for a in data.get("architectures") or () if a in TEXT_MODELS),
                BY_MODEL_TYPE.get(data.get("model_type", "")))
    if name is None:
        raise UserError(f"model.text_encoder {cfg.text_encoder} is {hub.kind_of(path)}, not a T5 or CLIP text "
                        f"model of transformers.")
    config = None
    if data.get("model_type") == "clip":  # a whole CLIPModel: its text half, with the whole's projection size
        config = transformers.CLIPTextConfig.from_pretrained(path)
        config.projection_dim = data.get("projection_dim", config.projection_dim)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists a CLIPModel's vision weights as unexpected
    try:
        model, info = getattr(transformers, name).from_pretrained(path, config=config, output_loading_info=True)
    except (OSError, ValueError) as err:  # no weights file, or one that cannot be read
        raise UserError(f"model.text_encoder {cfg.text_encoder} cannot be loaded as a {name}: "
                        f"{str(err).splitlines()[0][:200]}.") from None
    except RuntimeError:  # transformers' refusal of weights of another shape, worded for its own load report
        raise UserError(f"model.text_encoder {cfg.text_encoder} does not hold the weights its config describes "
                        f"(some are of another shape).") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    # transformers fills missing or mis-shaped weights with random ones and goes on: an encoder must be whole
    broken = list(info.get("missing_keys") or ()) + [str(k[0] if isinstance(k, tuple) else k)
                                                      for k in info.get("mismatched_keys") or ()]
    if broken:
        raise UserError(f"model.text_encoder {cfg.text_encoder} does not hold the weights its config describes "
                        f"({len(broken)} missing or of another shape, e.g. {broken[0]}).")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.text_context > positions:
        raise UserError(f"model.text_context {cfg.text_context} is longer than the {positions} positions of "
                        f"{cfg.text_encoder}.")
    return model, _tokenizer_for(cfg, path)


def _tokenizer_for(cfg: TextEncoderConfig, model_path: Path) -> Callable:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_tokenizer_source(cfg, model_path)[1])


def _tokenizer_source(cfg: TextEncoderConfig, model_path: Path) -> tuple[str, Path]:
    """The name and folder of the encoder's tokenizer: `text_tokenizer` if set, else the model's own folder, else
    the `tokenizer` folder beside it (a pipeline's layout: text_encoder/ and tokenizer/ side by side)."""
    from imgen_cli import hub

    if cfg.text_tokenizer:
        name, path = cfg.text_tokenizer, hub.local_path(cfg.text_tokenizer, "model.text_tokenizer")
    elif _has_tokenizer(model_path):
        name, path = cfg.text_encoder, model_path
    elif hub.is_hub_name(cfg.text_encoder):  # hf:ORG/REPO/text_encoder -> hf:ORG/REPO/tokenizer, same revision
        encoder = hub.parse(cfg.text_encoder, "model.text_encoder")
        sibling = hub.HubName(encoder.repo, str(Path(encoder.subfolder).parent / "tokenizer"), encoder.revision)
        name, path = str(sibling), hub.fetch(sibling, "the tokenizer of model.text_encoder")
    else:
        name, path = cfg.text_encoder, model_path.parent / "tokenizer"
    if not _has_tokenizer(path):
        raise UserError(f"model.text_encoder {cfg.text_encoder} has no tokenizer beside it ({name}); name one with "
                        f"model.text_tokenizer.")
    return name, path


def text_encoder_record(cfg: TextEncoderConfig) -> dict[str, Any]:
    """What identifies the caption states a transformers encoder gives (the shards' record of `imgen tokenize
    --text-encoder`): a hash of its weights and tokenizer (their files' SHA-256, not their names: a pinned and an
    unpinned name of the same commit are the same encoder) and the layer read; and the context length."""
    import hashlib

    from imgen_cli import hub

    model_path = hub.local_path(cfg.text_encoder, "model.text_encoder")
    tokenizer_name, tokenizer_path = _tokenizer_source(cfg, model_path)
    parts = f"{hub.folder_digest(model_path)}:{hub.folder_digest(tokenizer_path)}:{cfg.text_layer}"
    digest = hashlib.sha256(parts.encode()).hexdigest()[:16]
    return {"text_encoder": cfg.text_encoder, "text_tokenizer": tokenizer_name, "text_layer": cfg.text_layer,
            "text_context": cfg.text_context, "hash": digest}


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                              "spiece.model"))


def _pretrained_tower(cfg: TextEncoderConfig) -> nn.Module:
    """The text tower of open_clip model `text_name`, with the weights of `text_pretrained` or of a
    `local-dir:` export (random without either)."""
    name, pretrained = cfg.text_name, cfg.text_pretrained
    local_dir = name.startswith("local-dir:")
    if local_dir and not (Path(name.removeprefix("local-dir:")) / "open_clip_config.json").is_file():
        raise UserError(f"model.text_name {name}: no open_clip_config.json in that directory.")
    from_hub = name.startswith("hf-hub:")
    try:
        model_cfg = open_clip.get_model_config(name)  # an hf-hub: config is fetched into the Hugging Face cache
    except Exception as err:  # offline miss, unknown repository, no connection: huggingface_hub's many types
        from imgen_cli import hub

        raise UserError(f"model.text_name {name}: its open_clip_config.json could not be read from the Hugging Face "
                        f"hub or the cache {hub.cache_dir()} ({type(err).__name__}).",
                        "Downloads are off with HF_HUB_OFFLINE=1: run once online to fill the cache.") from None
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
    if not (pretrained or local_dir or from_hub):
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
