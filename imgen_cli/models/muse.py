"""Muse: text-to-image generation by masked modelling of VQ tokens (Chang et al. 2023; decoding from MaskGIT).

An image is a grid of N tokens of a frozen VQGAN, ids 0..K-1; id K is [MASK]. Training replaces a random subset
of each image's tokens by MASK, at a rate drawn from a cosine schedule (biased to high rates), and a
bidirectional transformer that cross-attends to the caption's text states predicts them with cross-entropy.
Generation starts from all-MASK and decodes in T parallel steps: sample every masked token, keep the most
confident, re-mask the rest so that floor(U0 gamma((k+1)/T)) stay masked; the last step keeps everything.
Editing reuses that loop: inpainting starts from the source tokens with a hole of MASK, and mask-free editing
repeatedly re-masks a few random tokens and resamples them under the target prompt.

The network is imgen's transformer by default; `backbone = "uvit2d"` is aMUSEd's (diffusers' UVit2DModel: conv
stages around a transformer with RMSNorm, GEGLU and micro-conditioning), which `imgen import` brings in with its
published weights. The masking, decoding, guidance and editing below drive either one alike.

Classifier-free guidance mixes the conditional and unconditional logits, l_c + t (l_c - l_u) with s = 1 + t;
the unconditional branch sees the text encoder's empty-prompt encoding, which training substitutes for a
fraction of the captions. A super-resolution stage is this model on a finer grid that also sees the coarse
tokens of the same image: a small self-attention encoder turns them into states that join the text states
as cross-attention context.

The schedule, the masking, the loss and the decoding loops are module-level functions beside the network,
so that each rule of the specification (reference/muse.md) can be checked on its own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion.guidance import guided as guided_logits
from imgen_cli.errors import UserError, require
from imgen_cli.nn.text import TextStates, build_text_encoder, drop_condition, unconditional
from imgen_cli.nn.tokens import GridEmbedding, TokenFamily, TokenTransformerConfig, gumbel, pixel_to_token_mask
from imgen_cli.nn.transformer import TransformerStack

SCHEDULES = ("cosine", "linear", "power")
LOSS_NORMS = ("token", "sequence")
CHOICE_SCHEDULES = ("amused", "maskgit")
BACKBONES = ("transformer", "uvit2d")

# guided logits [B, N, K] for the current tokens [B, N] (MASK where unknown) at step k
Predictor = Callable[[Tensor, int], Tensor]
T = TypeVar("T")


@dataclass
class MuseConfig(TokenTransformerConfig):
    """Muse's hyperparameters; the transformer's and the text encoder's come with TokenTransformerConfig."""

    schedule: str = "cosine"  # gamma(r), the masked fraction: cosine | linear | power
    schedule_exponent: float = 2.0  # power schedule: gamma(r) = 1 - r**exponent
    min_mask_rate: float = 0.0  # floor on the training masking rate (MaskGIT lists 0.5)
    contiguous_mask_prob: float = 0.0  # share of training samples masked as one rectangle (helps inpainting)
    label_smoothing: float = 0.1
    loss_norm: str = "token"  # average over all masked tokens of the batch | per sequence first (MaskGIT)
    cond_dropout: float = 0.1  # share of captions replaced by the null (empty-prompt) condition
    # > 0: a super-resolution model conditioned on the lowres_grid x lowres_grid tokens of the same image
    # downsampled by grid / lowres_grid, encoded by lowres_depth self-attention blocks
    lowres_grid: int = 0
    lowres_depth: int = 2
    guidance: float = 4.0  # the guidance scale sample, edit and eval use unless told (aMUSEd's pipeline: 10)
    # the network: imgen's transformer (width, depth, heads, mlp_ratio) | uvit2d, aMUSEd's UVit2DModel of diffusers
    backbone: str = "transformer"
    uvit2d: dict[str, Any] = field(default_factory=dict)  # uvit2d: the UVit2DModel config, as diffusers saves it
    # uvit2d: aMUSEd's micro-conditioning [original width, original height, crop top, crop left, aesthetic score];
    # [] = its pipeline's default, [image size, image size, 0, 0, 6]
    micro_conds: list[float] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        require(self.backbone in BACKBONES,
                f"unknown model.backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}.")
        require(self.backbone != "uvit2d" or bool(self.uvit2d),
                "model.backbone uvit2d needs model.uvit2d, the UVit2DModel config (imgen import writes it).")
        require(self.backbone == "uvit2d" or not (self.uvit2d or self.micro_conds),
                "model.uvit2d and model.micro_conds belong to model.backbone uvit2d.")
        require(not self.micro_conds or len(self.micro_conds) == 5,
                f"model.micro_conds has 5 values (width, height, crop top, crop left, aesthetic score), "
                f"got {self.micro_conds!r}.")
        require(self.backbone == "transformer" or self.condition == "text",
                "a class-conditional Muse (model.condition=class) has imgen's transformer as its backbone.")
        require(self.backbone == "transformer" or not self.lowres_grid,
                "a super-resolution Muse (model.lowres_grid) has imgen's transformer as its backbone.")
        require(math.isfinite(self.guidance) and self.guidance >= 0,
                f"model.guidance must be a finite scale >= 0, got {self.guidance}.")
        require(self.schedule in SCHEDULES,
                f"unknown model.schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        require(self.schedule_exponent > 0, f"model.schedule_exponent must be > 0, got {self.schedule_exponent}.")
        require(0 <= self.min_mask_rate <= 1, f"model.min_mask_rate must be in [0, 1], got {self.min_mask_rate}.")
        require(0 <= self.contiguous_mask_prob <= 1,
                f"model.contiguous_mask_prob must be in [0, 1], got {self.contiguous_mask_prob}.")
        require(0 <= self.label_smoothing < 1, f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        require(self.loss_norm in LOSS_NORMS,
                f"unknown model.loss_norm {self.loss_norm!r}; choose one of {', '.join(LOSS_NORMS)}.")
        require(0 <= self.cond_dropout < 1, f"model.cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        require(self.lowres_grid >= 0 and self.lowres_depth >= 1,
                "model.lowres_grid must be >= 0 and model.lowres_depth >= 1.")


# --- schedules ---------------------------------------------------------------------------------------------


def mask_schedule(r: float, kind: str = "cosine", exponent: float = 2.0) -> float:
    """gamma(r), the fraction of tokens masked at progress r in [0, 1], clipped to [1e-6, 1].

    Python floats (float64) on purpose: in float32 gamma(8/12) is 0.49999997, so 256 tokens at step 7 of 12
    would keep 127 masked instead of 128.
    """
    if kind == "cosine":
        gamma = math.cos(math.pi / 2 * r)
    elif kind == "linear":
        gamma = 1 - r
    elif kind == "power":
        gamma = 1 - r**exponent
    else:
        raise ValueError(f"unknown mask schedule {kind!r}")
    return min(1.0, max(1e-6, gamma))


def choice_temperatures(steps: int, temperature: float | Sequence[float] = (2.0, 0.0),
                        schedule: str = "amused") -> list[float]:
    """tau_k, the scale of the Gumbel noise on the confidences at each step.

    "amused": linspace(start, end, T) for a pair (start, end); a scalar t means (t, 0.01). "maskgit":
    t (1 - (k + 1) / T) for a scalar t. Each step's value comes from k, never by shrinking the previous
    one (open-muse v1 compounds the decay, and the noise vanishes after a few steps).
    """
    if schedule == "maskgit":
        if not isinstance(temperature, (int, float)):
            raise UserError("the maskgit choice-temperature schedule takes one starting temperature, not a pair.")
        return [temperature * (1 - (k + 1) / steps) for k in range(steps)]
    if schedule != "amused":
        raise UserError(f"unknown choice-temperature schedule {schedule!r}; choose one of "
                        f"{', '.join(CHOICE_SCHEDULES)}.")
    start, end = (temperature, 0.01) if isinstance(temperature, (int, float)) else temperature
    return [start + (end - start) * k / max(steps - 1, 1) for k in range(steps)]


def guidance_scales(steps: int, guidance: float, ramp: bool = False) -> list[float]:
    """s_k per step. With the ramp, t = s - 1 grows linearly, t_k = t_max k / (T - 1): the first step is
    unguided (s_0 = 1), so the first tokens keep their diversity, and the last has the full scale."""
    if not ramp:
        return [guidance] * steps
    return [1 + (guidance - 1) * k / max(steps - 1, 1) for k in range(steps)]


# --- training ---------------------------------------------------------------------------------------------


def masked_counts(u: Tensor, n_tokens: int, kind: str = "cosine", exponent: float = 2.0,
                  min_rate: float = 0.0) -> Tensor:
    """Tokens to mask for uniform draws u [B]: n = max(1, round(N max(gamma(u), min_rate))), rounding half to
    even in float64."""
    rates = [max(mask_schedule(x, kind, exponent), min_rate) for x in u.tolist()]
    counts = (torch.tensor(rates, dtype=torch.float64) * n_tokens).round().clamp_min(1)
    return counts.long().to(u.device)


def _random_subset(counts: Tensor, n_tokens: int, generator: torch.Generator | None) -> Tensor:
    """[B, N] bool with counts[b] positions True, chosen uniformly without replacement: the first n of a
    random order (argsort of i.i.d. uniforms)."""
    order = torch.rand(len(counts), n_tokens, generator=generator, device=counts.device).argsort(dim=1)
    first = torch.arange(n_tokens, device=counts.device) < counts[:, None]
    return torch.zeros_like(first).scatter_(1, order, first)


def _randint(low: int, high: int, generator: torch.Generator | None, device: torch.device) -> int:
    """A uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item())


def _rectangle(n: int, h: int, w: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """[h, w] bool: one rectangle of about n cells at a random place; its height is drawn from
    [ceil(n / w), min(h, n)] and its width is ceil(n / height)."""
    height = _randint(-(-n // w), min(h, n), generator, device)
    width = -(-n // height)
    top, left = _randint(0, h - height, generator, device), _randint(0, w - width, generator, device)
    region = torch.zeros(h, w, dtype=torch.bool, device=device)
    region[top:top + height, left:left + width] = True
    return region


def training_mask(tokens: Tensor, mask_id: int, *, schedule: str = "cosine", exponent: float = 2.0,
                  min_rate: float = 0.0, contiguous_prob: float = 0.0, generator: torch.Generator | None = None,
                  u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forward masking of token grids [B, h, w]: per sample u ~ U(0, 1) (or the given u [B]), n tokens from
    `masked_counts`, scattered uniformly, or with probability contiguous_prob as one rectangle of about n.
    Returns the inputs (MASK at the chosen positions, the ids elsewhere) and the [B, h, w] bool mask."""
    b, h, w = tokens.shape
    if u is None:
        u = torch.rand(b, generator=generator, device=tokens.device, dtype=torch.float64)
    counts = masked_counts(u, h * w, schedule, exponent, min_rate)
    mask = _random_subset(counts, h * w, generator).view(b, h, w)
    if contiguous_prob > 0:
        regions = torch.rand(b, generator=generator, device=tokens.device) < contiguous_prob
        for i in regions.nonzero().flatten().tolist():
            mask[i] = _rectangle(int(counts[i]), h, w, generator, tokens.device)
    return torch.where(mask, mask_id, tokens), mask


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0,
                         normalisation: str = "token") -> Tensor:
    """Cross-entropy over the masked positions only: logits [B, N, K], targets and mask [B, N].

    Logits at unmasked positions take no part, so they get no gradient. The smoothed target is
    (1 - eps) onehot + eps / K over the K codes (MASK is no class). "token" averages over every masked
    token of the batch; "sequence" averages within each sample first (MaskGIT), which up-weights the tokens
    of lightly masked samples.
    """
    per_token = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=label_smoothing,
                                reduction="none")
    if normalisation == "token":
        return per_token.mean()
    counts = mask.sum(dim=1)
    # boolean indexing lists the masked tokens sample by sample, so sample b's weight repeats counts[b] times
    weights = (1.0 / counts.clamp_min(1)).repeat_interleave(counts)
    return (per_token * weights).sum() / mask.shape[0]


# --- decoding -----------------------------------------------------------------------------------------------


def masked_count_after_step(k: int, steps: int, initial: int, current: int, kind: str = "cosine",
                            exponent: float = 2.0) -> int:
    """L, the tokens left masked after step k of `steps`, for U0 = `initial` masked at the start and M =
    `current` masked now: clamp(floor(U0 gamma((k + 1) / T)), 1, M - 1). Every step therefore reveals a token
    while two or more are masked, one stays masked until the last step, and the last step reveals all.
    U0 is the hole size, not N: with N a small hole would reveal one token a step and the rest at the end."""
    if k == steps - 1 or current == 0:
        return 0
    target = math.floor(initial * mask_schedule((k + 1) / steps, kind, exponent))
    return max(1, min(target, current - 1))


def _sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Ids drawn from softmax(logits / temperature) by the Gumbel-max trick; the argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits / temperature + gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)


def _last(items: Iterable[T], default: T | None = None) -> T | None:
    remaining = deque(items, maxlen=1)
    return remaining.pop() if remaining else default


def decode_steps(predict: Predictor, tokens: Tensor, mask_id: int, *, steps: int, choice_temperatures: Sequence[float],
                 schedule: str = "cosine", exponent: float = 2.0, token_temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Iterative parallel decoding (MaskGIT) of tokens [B, N] whose MASK entries are unknown.

    Yields the tokens after each step, MASK where re-masked; the last yield has no MASK left. At step k:
    sample every position from the guided logits (at token_temperature) and keep the known ids; rate each
    newly sampled token by its log-probability under the guided logits (known tokens: +inf, so they are
    never re-masked), add Gumbel noise scaled by tau_k, and re-mask exactly the L lowest, ties broken by
    position (comparing with the L-th value instead would mask fewer than L on ties).
    """
    n_tokens = tokens.shape[1]
    initial = (tokens == mask_id).sum(dim=1).tolist()
    positions = torch.arange(n_tokens, device=tokens.device).expand_as(tokens)
    x = tokens
    for k in range(steps):
        logits = predict(x, k).float()
        known = x != mask_id
        sampled = torch.where(known, x, _sample(logits, token_temperature, generator))
        if k == steps - 1:
            yield sampled
            return
        current = (~known).sum(dim=1).tolist()
        keep_masked = torch.tensor([masked_count_after_step(k, steps, u0, m, schedule, exponent)
                                    for u0, m in zip(initial, current, strict=True)], device=x.device)
        confidence = F.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)
        confidence = confidence.masked_fill(known, math.inf)
        confidence = confidence + choice_temperatures[k] * gumbel(confidence.shape, generator, x.device)
        # each position's rank by confidence (a stable sort: ties go to the lower position); the L lowest re-mask
        order = confidence.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        x = torch.where(rank < keep_masked[:, None], mask_id, sampled)
        yield x


def mask_free_edit_steps(predict: Predictor, tokens: Tensor, mask_id: int, *, iterations: int, n_edit: int,
                         top_k: int = 3, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Mask-free editing (Muse): each iteration masks n_edit random positions of tokens [B, N], predicts them
    under the target prompt and resamples each from its top_k logits; no other position changes. Yields the
    tokens and the [B, N] bool positions chosen, after every iteration; each iterate is a valid result."""
    n_tokens = tokens.shape[1]
    counts = torch.full((len(tokens),), n_edit, device=tokens.device)
    for i in range(iterations):
        chosen = _random_subset(counts, n_tokens, generator)
        logits = predict(torch.where(chosen, mask_id, tokens), i).float()
        values, candidates = logits.topk(top_k, dim=-1)
        pick = _sample(values, 1.0, generator)
        tokens = torch.where(chosen, candidates.gather(-1, pick[..., None]).squeeze(-1), tokens)
        yield tokens, chosen


# --- network --------------------------------------------------------------------------------------------------


class Muse(TokenFamily):
    """The masked token transformer (reference block of the spec): token + row + column embeddings, blocks
    of self-attention, cross-attention to the projected text states (plus low-res token states for
    super-res) and an MLP, adaptive norms driven by the pooled text embedding, then LN and a K-way head.

    The VQ tokenizer is held as `TokenFamily` holds it: frozen, outside the state dict.
    """

    family = "Muse"
    block_types = TransformerStack.block_types  # the units the engine shards and recomputes
    position_tables = ("embed.rows", "embed.cols")  # the token grid's rows and columns (imgen's backbone)

    def __init__(self, cfg: MuseConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.attach_tokenizer(cfg.vq, tokenizer, cfg.codebook_size, cfg.grid)
        if cfg.lowres_grid and (cfg.lowres_grid >= self.grid or self.grid % cfg.lowres_grid):
            raise UserError(f"model.lowres_grid {cfg.lowres_grid} must divide the {self.grid}x{self.grid} token "
                            f"grid and be smaller.")
        k, d = self.codebook_size, cfg.width
        self.mask_id = k
        self.text_encoder = build_text_encoder(cfg)
        self.uvit = self.lowres = None
        if cfg.backbone == "uvit2d":
            size = self.image_size
            self.uvit = UVit2D(cfg.uvit2d, k, self.grid, self.text_encoder, cfg.micro_conds or [size, size, 0, 0, 6])
            return
        self.embed = GridEmbedding(k + 1, self.grid, d)
        self.context = nn.Sequential(nn.Linear(self.text_encoder.width, d), nn.LayerNorm(d))
        if cfg.lowres_grid:  # low-res tokens are always known: no MASK row
            self.lowres = nn.Sequential(GridEmbedding(k, cfg.lowres_grid, d),
                                        TransformerStack(d, cfg.lowres_depth, cfg.heads, cfg.mlp_ratio))
        self.transformer = TransformerStack(d, cfg.depth, cfg.heads, cfg.mlp_ratio, context_dim=d,
                                            cond_dim=self.text_encoder.embed_dim)
        self.head = nn.Linear(d, k)  # K classes: MASK is never predicted, so never sampled
        for linear in (self.context[0], self.head):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    @property
    def device(self) -> torch.device:
        return self.uvit.model.device if self.uvit is not None else self.head.weight.device

    def _lowres_tokens(self, images: Tensor) -> Tensor:
        """The coarse tokens a super-res model sees: the images downsampled by grid / lowres_grid, encoded."""
        factor = self.grid // self.cfg.lowres_grid
        small = F.interpolate(images.float(), size=(images.shape[-2] // factor, images.shape[-1] // factor),
                              mode="area")
        return self.require_tokenizer("encode low-resolution images").encode(small)

    def condition(self, text: TextStates, lowres_tokens: Tensor | None = None) -> TextStates:
        """Encoded captions -> what the blocks attend to: the projected text states (then, for a super-res
        model, the encoded low-res tokens [B, h', w']) with their mask, and the pooled vector for the norms."""
        if self.uvit is not None:  # UVit2D projects the text states itself
            return text
        context, mask = self.context(text.states), text.mask
        if self.lowres is not None:
            side = self.cfg.lowres_grid
            if lowres_tokens is None or tuple(lowres_tokens.shape[1:]) != (side, side):
                raise UserError(f"this is a super-resolution Muse model: it needs the {side}x{side} tokens of the "
                                f"low-resolution image.")
            lowres = self.lowres(lowres_tokens.flatten(1))
            context = torch.cat([context, lowres], dim=1)
            mask = torch.cat([mask, mask.new_ones(lowres.shape[:2])], dim=1)
        return TextStates(context, mask, text.pooled)

    def forward(self, tokens: Tensor, condition: TextStates) -> Tensor:
        """Logits [B, N, K] for token ids [B, N] (row-major grid, MASK = K) under `condition`."""
        if self.uvit is not None:
            return self.uvit(tokens, self.mask_id, condition)
        h = self.transformer(self.embed(tokens), condition.states, condition.mask, condition.pooled)
        return self.head(h)

    # --- training ---

    def _training_tokens(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        tokens = self.batch_tokens(batch)
        images = batch.get("image")
        if self.lowres is None:
            return tokens, None
        if images is None:
            raise UserError("a super-resolution Muse model trains on images (for their low-resolution tokens), "
                            "but the batch holds only tokens.")
        return tokens, self._lowres_tokens(images)

    def loss(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        tokens, lowres = self._training_tokens(batch)
        inputs, masked = training_mask(tokens, self.mask_id, schedule=cfg.schedule, exponent=cfg.schedule_exponent,
                                       min_rate=cfg.min_mask_rate, contiguous_prob=cfg.contiguous_mask_prob)
        text = self.text_encoder.from_batch(batch)
        if cfg.cond_dropout > 0:  # on this batch's encoded captions, so the dropped ones really are null
            text, _ = drop_condition(text, self.text_encoder.null(len(text)), cfg.cond_dropout)
        logits = self(inputs.flatten(1), self.condition(text, lowres))
        targets, masked = tokens.flatten(1), masked.flatten(1)
        loss = masked_cross_entropy(logits, targets, masked, cfg.label_smoothing, cfg.loss_norm)
        accuracy = (logits.detach().argmax(dim=-1) == targets)[masked].float().mean()
        return {"loss": loss, "acc": accuracy, "mask_rate": masked.float().mean()}

    # --- sampling ---

    def _predictor(self, prompts: Sequence[str], scales: Sequence[float], negative_prompts: Sequence[str] | None,
                   lowres_tokens: Tensor | None) -> Predictor:
        """The guided logits of the decoding loops. The prompts are encoded once for all steps, and the
        unconditional half (the null, or the negative prompts) runs in the same forward as the conditional."""
        cond = self.condition(self.text_encoder(list(prompts)), lowres_tokens)
        if all(s == 1 for s in scales):  # l_c + 0 (l_c - l_u) = l_c: no unconditional pass needed
            return lambda x, k: self(x, cond)
        uncond_text = unconditional(self.text_encoder, self.text_encoder.null(len(prompts)), negative_prompts,
                                    len(prompts))
        both = TextStates.cat([self.condition(uncond_text, lowres_tokens), cond])

        def predict(x: Tensor, k: int) -> Tensor:
            uncond, cond_logits = self(torch.cat([x, x]), both).chunk(2)
            return guided_logits(cond_logits, uncond, scales[k])

        return predict

    @torch.no_grad()
    def generate_tokens(self, prompts: Sequence[str], *, steps: int = 12, guidance: float | None = None,
                        guidance_ramp: bool = False, negative_prompts: Sequence[str] | None = None,
                        token_temperature: float = 1.0, choice_temperature: float | Sequence[float] = (2.0, 0.0),
                        choice_schedule: str = "amused", generator: torch.Generator | None = None,
                        lowres_tokens: Tensor | None = None, init_tokens: Tensor | None = None,
                        known_mask: Tensor | None = None) -> Tensor:
        """Token grids [B, g, g] for B prompts by iterative parallel decoding.

        guidance is s (1 = unguided; None = the run's model.guidance); guidance_ramp grows it from 1 over the
        steps; negative prompts take the place of the null in the unconditional branch. choice_temperature and
        choice_schedule set tau_k (see `choice_temperatures`). init_tokens [B, g, g] start the decoding instead
        of all-MASK: their MASK entries, and with known_mask [B, g, g] (True = keep) every position it leaves
        out, are generated; the kept ones come out bit-identical. The generator must live on the model's device.
        """
        if steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}.")
        b, n = len(prompts), self.grid * self.grid
        x = torch.full((b, n), self.mask_id, device=self.device)
        if init_tokens is not None:
            x = init_tokens.flatten(1).to(self.device)
            if known_mask is not None:
                x = torch.where(known_mask.flatten(1).to(self.device), x, self.mask_id)
        guidance = self.cfg.guidance if guidance is None else guidance
        predict = self._predictor(prompts, guidance_scales(steps, guidance, guidance_ramp), negative_prompts,
                                  lowres_tokens)
        decoded = decode_steps(predict, x, self.mask_id, steps=steps,
                               choice_temperatures=choice_temperatures(steps, choice_temperature, choice_schedule),
                               schedule=self.cfg.schedule, exponent=self.cfg.schedule_exponent,
                               token_temperature=token_temperature, generator=generator)
        return _last(decoded).view(b, self.grid, self.grid)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, steps: int = 12, guidance: float | None = None,
                 guidance_ramp: bool = False, negative_prompts: Sequence[str] | None = None,
                 generator: torch.Generator | None = None, lowres_tokens: Tensor | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for B prompts: `generate_tokens` (same options), decoded."""
        tokens = self.generate_tokens(prompts, steps=steps, guidance=guidance, guidance_ramp=guidance_ramp,
                                      negative_prompts=negative_prompts, generator=generator,
                                      lowres_tokens=lowres_tokens)
        return self.decode(tokens)

    # --- editing ---

    @torch.no_grad()
    def edit_tokens(self, tokens: Tensor, token_mask: Tensor | None, prompts: Sequence[str], *, steps: int = 12,
                    guidance: float | None = None, generator: torch.Generator | None = None, iterations: int = 100,
                    edit_fraction: float = 0.08, top_k: int = 3, guidance_ramp: bool = False,
                    negative_prompts: Sequence[str] | None = None, lowres_tokens: Tensor | None = None) -> Tensor:
        """Edit token grids [B, g, g] towards the prompts.

        With token_mask [B, g, g] (True = regenerate): inpainting. The masked tokens are decoded in `steps`
        steps with U0 = their count (guided as `generate_tokens` is), the others stay bit-identical.
        Without: mask-free editing, `iterations` rounds of resampling round(edit_fraction N) random tokens
        from their top_k logits at guidance s; zero iterations return the tokens unchanged.
        """
        if token_mask is not None:
            return self.generate_tokens(prompts, steps=steps, guidance=guidance, guidance_ramp=guidance_ramp,
                                        generator=generator, negative_prompts=negative_prompts,
                                        lowres_tokens=lowres_tokens, init_tokens=tokens, known_mask=~token_mask)
        n_edit = max(1, round(edit_fraction * self.grid * self.grid))
        guidance = self.cfg.guidance if guidance is None else guidance
        predict = self._predictor(prompts, [guidance] * iterations, negative_prompts, lowres_tokens)
        flat = tokens.flatten(1).to(self.device)
        edited = mask_free_edit_steps(predict, flat, self.mask_id, iterations=iterations, n_edit=n_edit,
                                      top_k=top_k, generator=generator)
        return _last((x for x, _ in edited), flat).view_as(tokens)

    @torch.no_grad()
    def edit(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], *, steps: int = 12,
             guidance: float | None = None, guidance_ramp: bool = False, negative_prompts: Sequence[str] | None = None,
             generator: torch.Generator | None = None, iterations: int = 100,
             lowres_tokens: Tensor | None = None) -> Tensor:
        """Edit images [B, 3, H, W] in [0, 1]: inpaint where the pixel mask [B, 1, H, W] is True (a token is
        regenerated if any pixel of its cell is), or edit mask-free without a mask. Returns images in [0, 1],
        all decoded from tokens (compositing the unmasked source pixels back is the caller's choice).
        A super-res model is conditioned on the source's low-res tokens unless lowres_tokens is given."""
        tokenizer = self.require_tokenizer("edit images")
        images = images.to(self.device)
        token_mask = None if mask is None else pixel_to_token_mask(mask.to(self.device), tokenizer.downsample_factor)
        if self.lowres is not None and lowres_tokens is None:
            lowres_tokens = self._lowres_tokens(images)
        tokens = self.edit_tokens(tokenizer.encode(images), token_mask, prompts, steps=steps, guidance=guidance,
                                  guidance_ramp=guidance_ramp, negative_prompts=negative_prompts,
                                  generator=generator, iterations=iterations, lowres_tokens=lowres_tokens)
        return tokenizer.decode(tokens)

    def preview_options(self, images: Tensor) -> dict:
        """A super-res model's preview samples are conditioned on the real images' low-res tokens."""
        return {} if self.lowres is None else {"lowres_tokens": self._lowres_tokens(images)}


class UVit2D(nn.Module):
    """aMUSEd's network, diffusers' UVit2DModel (reused: it is the published checkpoints' own module), behind
    Muse's forward. Its MASK is its last vocabulary row (8255 for K = 8192, the rows between unused), not K; it
    reads every text state (aMUSEd's CLIP penultimate states, padding included: it takes no text mask) and the
    pooled one, and a micro-conditioning vector that imgen holds fixed per run."""

    def __init__(self, config: dict[str, Any], codebook_size: int, grid: int, text: nn.Module,
                 micro_conds: Sequence[float]):
        from diffusers import UVit2DModel

        super().__init__()
        try:
            self.model = UVit2DModel(**config)
        except TypeError as err:
            raise UserError(f"model.uvit2d is not a UVit2DModel config ({err}).") from None
        c = self.model.config
        require(c.codebook_size == codebook_size,
                f"model.uvit2d predicts {c.codebook_size} codes, but the tokenizer has {codebook_size}.")
        require((c.encoder_hidden_size, c.cond_embed_dim) == (text.width, text.embed_dim),
                f"model.uvit2d reads text states of width {c.encoder_hidden_size} and a pooled vector of "
                f"{c.cond_embed_dim}, but the text encoder gives {text.width} and {text.embed_dim}.")
        require(not c.downsample or grid % 2 == 0, f"model.uvit2d halves the token grid, which is {grid}x{grid}.")
        self.grid, self.mask_row = grid, c.vocab_size - 1
        self.register_buffer("micro_conds", torch.tensor([float(v) for v in micro_conds]), persistent=False)

    def forward(self, tokens: Tensor, mask_id: int, condition: TextStates) -> Tensor:
        """Logits [B, N, K] for token ids [B, N] whose MASK is `mask_id`."""
        b = tokens.shape[0]
        ids = torch.where(tokens == mask_id, self.mask_row, tokens).view(b, self.grid, self.grid)
        micro = self.micro_conds.to(condition.states.dtype).expand(b, -1)
        logits = self.model(ids, condition.states, condition.pooled, micro)  # [B, K, h, w]
        return logits.flatten(2).transpose(1, 2)


PRESETS: dict[str, dict] = {
    # tests: a 4x4 grid of K=64 codes (the tiny vqgan's), a tiny scratch text tower; milliseconds per step
    "tiny": dict(codebook_size=64, grid=4, width=64, depth=2, heads=4, text_width=32, text_layers=1,
                 text_heads=2, text_context=16, lowres_depth=1),
    # the CPU shapes recipe: 64x64 images -> 8x8 tokens of the small vqgan (K and grid from --vq), short
    # captions; about 0.6 s per batch of 32 on two CPU cores (14M parameters, 6M of them the text vocabulary)
    "small": dict(width=256, depth=6, heads=4, text_width=128, text_layers=2, text_heads=4, text_context=32),
    # the GPU COCO recipe: 256px -> 16x16 tokens, K=8192 (the base vqgan); a scratch text tower by default,
    # a pretrained one with text_name/text_pretrained (e.g. ViT-B-32 and a local checkpoint, text_frozen)
    "base": dict(width=1024, depth=16, heads=16, text_width=512, text_layers=8, text_heads=8, text_context=77,
                 lowres_depth=4),
}
