"""VQ-Diffusion: text-to-image generation by discrete diffusion over VQ tokens (Gu et al. 2022), with the
learnable null condition of Improved VQ-Diffusion (Tang et al. 2022).

An image is a grid of L tokens of a frozen VQGAN, ids 0..K-1; id K is [MASK]. The forward process corrupts
each token on its own with a mask-and-replace kernel: keep it, swap it for a uniform random code, or absorb
it into MASK. With the released schedule the replace share is a constant 1e-6, so the process is all but
absorbing: at step t about t/99 of the tokens are masked. A bidirectional transformer (adaptive LayerNorm on
t, cross-attention to the caption) predicts p(x0 | x_t, y) over the K codes; a reverse step averages the
analytic posterior q(x_{t-1} | x_t, x0) over that prediction. Training minimises the variational bound (KL
terms, the decoder NLL at t = 0) plus a small auxiliary cross-entropy on x0, with t drawn by importance.

Everything runs in log space on [B, L, K+1] arrays (codes, then MASK), in float64, floored at -70 (log-zero),
and no K x K matrix is ever built: every kernel, one-step, cumulative or strided, has the same three numbers
(alpha, beta, gamma), and applying it to a distribution is two logaddexps. The schedule, the posterior, the
loss terms and the samplers are module-level functions beside the network, so that each rule of the
specification (reference/vq_diffusion.md) can be checked on its own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from imgen_cli.diffusion.guidance import guided as guided_logits
from imgen_cli.errors import UserError, require
from imgen_cli.nn.text import TextStates, build_text_encoder, drop_condition, unconditional
from imgen_cli.nn.tokens import GridEmbedding, TokenFamily, TokenTransformerConfig, gumbel, pixel_to_token_mask
from imgen_cli.nn.transformer import TransformerStack

LOG_ZERO = -70.0
FLOOR = 1e-30  # probabilities are floored here before a log, so no -inf (and no -inf - -inf = NaN) appears
# (alpha_bar start, alpha_bar end, gamma_bar start, gamma_bar end), linear in t. The released code's schedule
# ends almost fully masked; the paper's masks 90% at the end and replaces the other 10%.
SCHEDULES = {"released": (0.99999, 0.000009, 0.000009, 0.99999), "paper": (0.99999, 0.000009, 0.000009, 0.9)}
SAMPLERS = ("posterior", "purity")
BACKBONES = ("transformer", "transformer2d")
FAST_MODES = ("exact", "official")

# (tokens x_t [B, L], step t) -> log p(x0 | x_t) [B, L, K+1], guided and truncated, MASK entry log-zero
Predictor = Callable[[Tensor, int], Tensor]


@dataclass
class VQDiffusionConfig(TokenTransformerConfig):
    """VQ-Diffusion's hyperparameters; the transformer's and the text encoder's come with TokenTransformerConfig."""

    timesteps: int = 100  # T
    schedule: str = "released"  # released | paper (see SCHEDULES)
    final_mask_rate: float = 0.0  # gamma_bar at t = T-1; 0 = the schedule's (0.99999 released, 0.9 paper)
    aux_weight: float = 5e-4  # lambda of the auxiliary x0 cross-entropy (5e-4 for text, 1e-3 for classes)
    importance_sampling: bool = True  # draw t by sqrt of its recent loss once every t has been seen 10 times
    cond_dropout: float = 0.1  # share of captions replaced by the null condition
    learnable_null: bool = True  # the null is a learned array of text states (Improved); else the empty prompt
    guidance: float = 3.0  # the guidance scale sample, edit and eval use unless told (ITHQ's pipeline: 5)
    # the network: imgen's transformer (width, depth, heads, mlp_ratio) | transformer2d, diffusers'
    # Transformer2DModel for discrete latents (the released VQ-Diffusion as diffusers holds it)
    backbone: str = "transformer"
    transformer2d: dict[str, Any] = field(default_factory=dict)  # its config, as diffusers saves it

    def validate(self) -> None:
        super().validate()
        require(self.backbone in BACKBONES,
                f"unknown model.backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}.")
        require(self.backbone == "transformer" or self.condition == "text",
                "a class-conditional VQ-Diffusion (model.condition=class) has imgen's transformer as its backbone.")
        require((self.backbone == "transformer2d") == bool(self.transformer2d),
                "model.transformer2d (the Transformer2DModel config, which imgen import writes) goes with "
                "model.backbone transformer2d.")
        require(math.isfinite(self.guidance) and self.guidance >= 0,
                f"model.guidance must be a finite scale >= 0, got {self.guidance}.")
        require(self.timesteps >= 2, f"model.timesteps must be at least 2, got {self.timesteps}.")
        require(self.schedule in SCHEDULES,
                f"unknown model.schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        alpha_end = SCHEDULES[self.schedule][1]
        require(self.final_mask_rate == 0 or 0 < self.final_mask_rate <= 1 - alpha_end,
                f"model.final_mask_rate must be in (0, {1 - alpha_end:g}] (or 0 for the schedule's), "
                f"got {self.final_mask_rate}.")
        require(self.aux_weight >= 0, f"model.aux_weight must be >= 0, got {self.aux_weight}.")
        require(0 <= self.cond_dropout < 1, f"model.cond_dropout must be in [0, 1), got {self.cond_dropout}.")


# --- the forward process ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A mask-and-replace transition: a code stays w.p. alpha + beta, becomes each other code w.p. beta and
    MASK w.p. gamma (alpha + K beta + gamma = 1); MASK stays MASK. Float64 tensors that broadcast over
    [B, L, K+1], i.e. shaped [B, 1, 1], or scalars."""

    alpha: Tensor
    beta: Tensor
    gamma: Tensor

    def log(self, name: str) -> Tensor:
        return getattr(self, name).clamp_min(FLOOR).log()

    def apply(self, log_v: Tensor) -> Tensor:
        """log(Q v) for log-distributions log_v [..., K+1] whose code entries sum to 1 (a distribution over
        x0, or one with a log-zero MASK entry): codes alpha v_k + beta, MASK (1 - gamma) v_K + gamma."""
        codes = torch.logaddexp(log_v[..., :-1] + self.log("alpha"), self.log("beta"))
        mask = torch.logaddexp(log_v[..., -1:] + (1 - self.gamma).clamp_min(FLOOR).log(), self.log("gamma"))
        return torch.cat([codes, mask], dim=-1)


class MaskReplaceSchedule:
    """The cumulative schedule alpha_bar_t, gamma_bar_t for t = 0..T-1 (float64), plus an identity entry
    (alpha_bar = 1, gamma_bar = 0: clean data) at index T, which is where t - 1 = -1 resolves.

    Every kernel comes from these two arrays: from s to t, alpha = alpha_bar_t / alpha_bar_s,
    1 - gamma = (1 - gamma_bar_t) / (1 - gamma_bar_s), beta = (1 - alpha - gamma) / K (K, not K+1: an early
    bug of the released code). The one-step kernel Q_t is the one from t - 1, the cumulative one from -1.
    """

    def __init__(self, codebook_size: int, timesteps: int = 100, kind: str = "released",
                 final_mask_rate: float = 0.0):
        a0, a1, g0, g1 = SCHEDULES[kind]
        g1 = final_mask_rate or g1
        r = torch.arange(timesteps, dtype=torch.float64) / (timesteps - 1)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.alpha_bar = torch.cat([a0 + r * (a1 - a0), one])
        self.gamma_bar = torch.cat([g0 + r * (g1 - g0), zero])
        self.codebook_size, self.timesteps, self.kind = codebook_size, timesteps, kind

    def _at(self, values: Tensor, t: Tensor | int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        index = torch.where(t < 0, self.timesteps, t)
        # a step per sample [B] broadcasts over [B, L, K+1]; one step for all stays a scalar
        return values.to(device)[index].reshape((*index.shape, 1, 1) if index.dim() else ())

    def between(self, s: Tensor | int, t: Tensor | int, device: torch.device | str = "cpu") -> Kernel:
        """The kernel from step s to step t > s (s = -1: from clean data, the cumulative kernel)."""
        a_s, a_t = self._at(self.alpha_bar, s, device), self._at(self.alpha_bar, t, device)
        g_s, g_t = self._at(self.gamma_bar, s, device), self._at(self.gamma_bar, t, device)
        alpha = a_t / a_s
        gamma = 1 - (1 - g_t) / (1 - g_s)
        beta = ((1 - alpha - gamma) / self.codebook_size).clamp_min(0)
        return Kernel(alpha, beta, gamma)

    def cumulative(self, t: Tensor | int, device: torch.device | str = "cpu") -> Kernel:
        """Q_bar_t, from x0 to x_t (the identity at t = -1)."""
        return self.between(-1, t, device)

    def step(self, t: Tensor | int, device: torch.device | str = "cpu") -> Kernel:
        """Q_t, from x_{t-1} to x_t."""
        return self.between(torch.as_tensor(t) - 1, t, device)


def log_onehot(tokens: Tensor, classes: int) -> Tensor:
    """[B, L] ids -> [B, L, classes] log of the one-hot, floored (float64)."""
    return F.one_hot(tokens, classes).double().clamp_min(FLOOR).log()


def q_sample(x0: Tensor, t: Tensor, schedule: MaskReplaceSchedule, generator: torch.Generator | None = None) -> Tensor:
    """x_t ~ q(x_t | x0) for ids x0 [B, L] and steps t [B], drawn directly: MASK w.p. gamma_bar, x0 w.p.
    alpha_bar, else a uniform code (which is x0 again w.p. 1/K, so x0 has alpha_bar + beta_bar in all)."""
    kernel = schedule.cumulative(t, x0.device)
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    gamma, alpha = kernel.gamma.view(-1, 1), kernel.alpha.view(-1, 1)
    replaced = torch.randint(0, schedule.codebook_size, x0.shape, generator=generator, device=x0.device)
    return torch.where(u < gamma, schedule.codebook_size, torch.where(u < gamma + alpha, x0, replaced))


def posterior(log_x0: Tensor, x_t: Tensor, t: Tensor | int, s: Tensor | int, schedule: MaskReplaceSchedule) -> Tensor:
    """log p(x_s | x_t) = log sum_j q(x_s | x_t, x0 = j) p(x0 = j), for s < t (s = t - 1 for the ordinary
    step, s = -1 at t = 0): [B, L, K+1], clamped to [-70, 0].

    log_x0 [B, L, K+1] is log p(x0) (a one-hot gives the true posterior, a prediction the model's); it may be
    unnormalised (truncated), as the result is linear in p. Per position, in O(K):
    l_j = log p_j - log Q_bar_t(x_t | j), normalised by z; then log[Q_bar_s e^l] + log Q_{s->t}(x_t | .) + z.
    """
    k = schedule.codebook_size
    device = x_t.device
    q_t, q_s, q_st = schedule.cumulative(t, device), schedule.cumulative(s, device), schedule.between(s, t, device)
    masked = (x_t == k)[..., None]
    is_xt = F.one_hot(x_t.clamp(max=k - 1), k).bool()  # [B, L, K]: code j equals x_t (meaningless where masked)
    log_likelihood = torch.where(masked, q_t.log("gamma"),
                                 torch.where(is_xt, (q_t.alpha + q_t.beta).log(), q_t.log("beta")))
    ell = log_x0[..., :k] - log_likelihood
    ell = torch.cat([ell, torch.full_like(ell[..., :1], LOG_ZERO)], dim=-1)
    z = ell.logsumexp(dim=-1, keepdim=True)
    spread = q_s.apply(ell - z)
    code_to_xt = torch.where(masked, q_st.log("gamma"),
                             torch.where(is_xt, (q_st.alpha + q_st.beta).log(), q_st.log("beta")))
    mask_to_xt = torch.where(masked, 0.0, LOG_ZERO)
    return (spread + torch.cat([code_to_xt, mask_to_xt.expand_as(spread[..., :1])], dim=-1) + z).clamp(LOG_ZERO, 0)


def log_x0_from_logits(logits: Tensor) -> Tensor:
    """Network logits [B, L, K] -> log p(x0) [B, L, K+1]: log_softmax in float64, a log-zero MASK entry."""
    logp = F.log_softmax(logits.double(), dim=-1)
    return torch.cat([logp, torch.full_like(logp[..., :1], LOG_ZERO)], dim=-1).clamp(LOG_ZERO, 0)


# --- training -------------------------------------------------------------------------------------------------


def bound_terms(log_x0_pred: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                schedule: MaskReplaceSchedule) -> tuple[Tensor, Tensor]:
    """Per sample [B]: L_t, the bound's term (KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) summed over
    positions for t >= 1, the decoder NLL -log p(x0 | x_1) at t = 0), and L_aux, the cross-entropy of the
    x0 prediction over all positions."""
    k = schedule.codebook_size
    true = posterior(log_onehot(x0, k + 1), x_t, t, t - 1, schedule)
    model = posterior(log_x0_pred, x_t, t, t - 1, schedule)
    kl = (true.exp() * (true - model)).sum(dim=-1)
    nll = -model.gather(-1, x0[..., None]).squeeze(-1)
    main = torch.where((t == 0)[:, None], nll, kl).sum(dim=1)
    aux = -log_x0_pred.gather(-1, x0[..., None]).squeeze(-1).sum(dim=1)
    return main, aux


class TimestepSampler(nn.Module):
    """Importance sampling of t: uniform until every t has been seen more than 10 times, then
    p(t) proportional to sqrt(h_t) + 1e-4, h_t an EMA of L_t^2 (h_0 taken from h_1, whose term is the NLL).

    Its history is a buffer: in checkpoints (a resumed run keeps it), copied (not averaged) by the EMA, and
    gathered from every rank before each update so the ranks agree. Updates go sample by sample, so a t
    drawn twice in a batch updates twice (a scatter would keep only the last)."""

    def __init__(self, timesteps: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.register_buffer("loss_sq", torch.zeros(timesteps))
        self.register_buffer("counts", torch.zeros(timesteps, dtype=torch.long))

    def probabilities(self) -> Tensor:
        timesteps = len(self.counts)
        if not self.enabled or not bool((self.counts > 10).all()):
            return torch.full((timesteps,), 1 / timesteps, dtype=torch.float64, device=self.counts.device)
        h = self.loss_sq.double().clone()
        h[0] = h[1]
        weights = h.sqrt() + 1e-4
        return weights / weights.sum()

    def sample(self, batch: int, device: torch.device,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """t [B] and p(t) [B]."""
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, p[t]

    @torch.no_grad()
    def record(self, t: Tensor, losses: Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(x) for x in (t, losses) for _ in range(dist.get_world_size())]
            n = dist.get_world_size()
            dist.all_gather(gathered[:n], t.contiguous())
            dist.all_gather(gathered[n:], losses.contiguous())
            t, losses = torch.cat(gathered[:n]), torch.cat(gathered[n:])
        for step, loss in zip(t.tolist(), losses.float().tolist(), strict=True):
            self.loss_sq[step] = 0.9 * self.loss_sq[step] + 0.1 * loss**2
            self.counts[step] += 1


def aux_weight_at(t: Tensor, timesteps: int) -> Tensor:
    """w(t) = 2 - t / T, the auxiliary loss's weight (2 at t = 0, 1.01 at t = 99)."""
    return 2 - t.double() / timesteps


# --- sampling ---------------------------------------------------------------------------------------------------


def stride_for(timesteps: int, steps: int) -> int:
    """The stride of fast sampling for about `steps` calls: round(T / steps), at least 1."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}.")
    return max(1, round(timesteps / steps))


def timestep_list(start: int, stride: int) -> list[int]:
    """start, start - stride, ... down to >= 0, then 0: 100, 51, 26 calls for T = 100 and strides 1, 2, 4."""
    steps = list(range(start, -1, -stride))
    return steps if steps[-1] == 0 else [*steps, 0]


def guided_log_probs(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Guidance on x0 log-probabilities over the K codes: l_u + w (l_c - l_u), renormalised, clamped; the
    conditional ones themselves at w = 1."""
    return F.log_softmax(guided_logits(cond, uncond, scale), dim=-1).clamp(LOG_ZERO, 0)


def truncate(log_p: Tensor, rate: float) -> Tensor:
    """Top-r truncation of log p(x0) [..., K+1]: keep a code iff the mass of the codes ranked above it is < r
    (the top-1 always stays); the rest become log-zero. Not renormalised: the posterior is linear in p."""
    if rate >= 1:
        return log_p
    codes = log_p[..., :-1]
    sorted_logp, order = codes.sort(dim=-1, descending=True)
    mass = sorted_logp.exp().cumsum(dim=-1)
    # the mass above each code is the running sum up to the one before it (subtracting p itself would round)
    kept_sorted = torch.cat([torch.ones_like(mass[..., :1], dtype=torch.bool), mass[..., :-1] < rate], dim=-1)
    keep = torch.empty_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return torch.cat([codes.masked_fill(~keep, LOG_ZERO), log_p[..., -1:]], dim=-1)


def official_source(t: int, stride: int) -> int:
    """The step whose one-step posterior the released sample_fast applies at step t: t - stride + 1 (whose
    target t - stride is right, but whose likelihood is that of one step, not of `stride`), and t itself at
    t <= stride - 1. Under stride 4 a masked token is still masked before the last step w.p. 0.245."""
    return t - stride + 1 if t > stride - 1 else t


def denoise_steps(predict: Predictor, x: Tensor, timesteps: Sequence[int], schedule: MaskReplaceSchedule, *,
                  fast: str = "exact", known: Tensor | None = None, known_mask: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """The reverse process from x [B, L] at timesteps[0] down through the listed steps; yields x after each.

    From step t the chain goes to the next listed step s (-1 after 0). "exact": the posterior of the strided
    kernel from s to t; "official" (parity with the released sample_fast): the one-step posterior of
    `official_source`, which targets s but reveals tokens too slowly. The step at t = 0 resamples every position; its
    draw is over the codes only, so no MASK survives. With `known` [B, L] and known_mask [B, L] (True = keep),
    the kept positions are put back after every step (inpainting).
    """
    stride = timesteps[0] - timesteps[1] if len(timesteps) > 1 else 1
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        log_x0 = predict(x, t)
        if fast == "exact":
            log_xs = posterior(log_x0, x, t, s, schedule)
        else:
            source = official_source(t, stride)
            log_xs = posterior(log_x0, x, source, source - 1, schedule)
        if s < 0:
            log_xs = log_xs[..., :-1]
        x = (log_xs + gumbel(log_xs.shape, generator, x.device, torch.float64)).argmax(dim=-1)
        if known is not None:
            x = torch.where(known_mask, known, x)
        yield x


def purity_steps(predict: Predictor, x: Tensor, timesteps: Sequence[int], schedule: MaskReplaceSchedule, *,
                 rule: str = "purity", sharpen: float = 1.0, known: Tensor | None = None,
                 known_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """The high-quality sampler of Improved VQ-Diffusion: each listed step but the last reveals an even share
    of the masked tokens, and revealed tokens never change until the last step (t = 0), an ordinary
    posterior step that resamples every position.

    Per call: candidates are drawn at every position from p(x0) (sharpened to p^(1 + r s_i) by purity when
    r > 0); among the masked positions, n are chosen without replacement with probability proportional to
    their score: uniform (rule "uniform") or purity s_i = max_k p_i(k) / max_{j,k} p_j(k) over all positions j
    ("purity"; the normalisation only sets how much it sharpens, as the choice is proportional). The
    n of a step make the revealed count follow floor(M (i + 1) / calls); the last masked token goes with
    its predecessor rather than alone.
    """
    k = schedule.codebook_size
    initial = (x == k).sum(dim=1)
    calls = len(timesteps) - 1
    for i, t in enumerate(timesteps[:-1]):
        masked = x == k
        target_revealed = initial * (i + 1) // calls
        remaining = masked.sum(dim=1)
        count = target_revealed - (initial - remaining)
        count = torch.where(remaining - count == 1, remaining, count)
        log_p = predict(x, t)[..., :k]
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)
        best = log_p.max(dim=-1).values.exp()  # [B, L]
        purity = best / best.amax(dim=1, keepdim=True).clamp_min(FLOOR)  # j: every position, revealed ones too
        if sharpen > 0:
            log_p = F.log_softmax(log_p * (1 + sharpen * purity)[..., None], dim=-1)
        candidates = (log_p + gumbel(log_p.shape, generator, x.device, log_p.dtype)).argmax(dim=-1)
        score = purity if rule == "purity" else torch.ones_like(purity)
        keys = score.clamp_min(FLOOR).log() + gumbel(score.shape, generator, x.device, score.dtype)
        keys = keys.masked_fill(~masked, -torch.inf)
        rank = torch.empty_like(x).scatter_(1, keys.argsort(dim=1, descending=True, stable=True),
                                            torch.arange(x.shape[1], device=x.device).expand_as(x))
        x = torch.where(masked & (rank < count[:, None]), candidates, x)
        yield x
    yield from denoise_steps(predict, x, [0], schedule, known=known, known_mask=known_mask, generator=generator)


def token_mask_start(schedule: MaskReplaceSchedule, hole_fraction: float) -> int:
    """The step inpainting starts from: the first t with gamma_bar_t >= the hole's share of the grid, where
    the training marginal masks about as much (holes of 0.1 / 0.25 / 0.4 / 0.5 start at 10 / 25 / 40 / 50)."""
    reached = (schedule.gamma_bar[:-1] >= hole_fraction - 1e-12).nonzero()
    return int(reached[0]) if len(reached) else schedule.timesteps - 1


# --- network ----------------------------------------------------------------------------------------------------


def normalized(text: TextStates) -> TextStates:
    """The text states as the blocks attend to them: each token's state L2-normalised (VQ-Diffusion's choice)."""
    return TextStates(F.normalize(text.states, dim=-1), text.mask, text.pooled)


class VQDiffusion(TokenFamily):
    """The denoising transformer (VQ-Diffusion-B's block): token + row + column embeddings; blocks of
    self-attention and cross-attention to the L2-normalised text states, both after LayerNorms modulated by
    a learned embedding of t, and an MLP; then LN and a K-way head. The null condition of guidance is a
    learned array of text states (not normalised, in the EMA and checkpoints) or the empty prompt's
    encoding. The tokenizer is held as `TokenFamily` holds it: frozen, outside the state dict."""

    family = "VQ-Diffusion"
    block_types = TransformerStack.block_types
    position_tables = ("embed.rows", "embed.cols")  # the token grid's rows and columns (imgen's backbone)
    preview_steps = 10  # stride 10: 11 calls

    def __init__(self, cfg: VQDiffusionConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        k, _ = self.attach_tokenizer(cfg.vq, tokenizer, cfg.codebook_size, cfg.grid)
        d = cfg.width
        self.mask_id = k
        self.schedule = MaskReplaceSchedule(k, cfg.timesteps, cfg.schedule, cfg.final_mask_rate)
        self.text_encoder = build_text_encoder(cfg)
        self.null_states = None
        if cfg.learnable_null and not self.text_encoder.learns_null:  # a class table learns its null class
            self.null_states = nn.Parameter(torch.randn(cfg.text_context, self.text_encoder.width))
        self.timestep_sampler = TimestepSampler(cfg.timesteps, cfg.importance_sampling)
        self.transformer2d = None
        if cfg.backbone == "transformer2d":
            self.transformer2d = Transformer2D(cfg.transformer2d, k, self.grid, cfg.timesteps, self.text_encoder.width)
            return
        self.embed = GridEmbedding(k + 1, self.grid, d)
        self.time_embed = nn.Embedding(cfg.timesteps, d)
        nn.init.trunc_normal_(self.time_embed.weight, std=0.02)
        self.transformer = TransformerStack(d, cfg.depth, cfg.heads, cfg.mlp_ratio,
                                            context_dim=self.text_encoder.width, cond_dim=d)
        self.head = nn.Linear(d, k)  # K classes: x0 is never MASK
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.transformer2d.model.device if self.transformer2d is not None else self.head.weight.device

    def encode_text(self, captions: Sequence[str]) -> TextStates:
        return normalized(self.text_encoder(list(captions)))

    def null_condition(self, batch: int) -> TextStates:
        if self.null_states is None:
            return normalized(self.text_encoder.null(batch))
        states = self.null_states.expand(batch, -1, -1)
        return TextStates(states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device),
                          states.new_zeros(batch, self.text_encoder.embed_dim))

    def forward(self, tokens: Tensor, t: Tensor, text: TextStates) -> Tensor:
        """Logits [B, L, K] of p(x0 | x_t = tokens [B, L], t [B], text)."""
        if self.transformer2d is not None:
            return self.transformer2d(tokens, t, text.states)
        h = self.transformer(self.embed(tokens), text.states, text.mask, self.time_embed(t))
        return self.head(h)

    # --- training ---

    def loss(self, batch: dict) -> dict[str, Tensor]:
        cfg = self.cfg
        x0 = self.batch_tokens(batch).flatten(1)
        b, n = x0.shape
        if self.training:
            t, p_t = self.timestep_sampler.sample(b, x0.device)
        else:  # validation: the plain bound, uniform over t
            t = torch.randint(0, cfg.timesteps, (b,), device=x0.device)
            p_t = torch.full((b,), 1 / cfg.timesteps, dtype=torch.float64, device=x0.device)
        x_t = q_sample(x0, t, self.schedule)
        text = normalized(self.text_encoder.from_batch(batch))
        if cfg.cond_dropout > 0:
            text, _ = drop_condition(text, self.null_condition(b), cfg.cond_dropout)
        log_x0 = log_x0_from_logits(self(x_t, t, text))
        main, aux = bound_terms(log_x0, x0, x_t, t, self.schedule)
        if self.training:
            self.timestep_sampler.record(t, main.detach())
        total = (main + cfg.aux_weight * aux_weight_at(t, cfg.timesteps) * aux) / p_t
        masked = x_t == self.mask_id
        correct = (log_x0.detach().argmax(dim=-1) == x0) & masked
        accuracy = correct.sum() / masked.sum().clamp_min(1)
        return {"loss": total.sum().float() / (b * n), "vb": (main / n).mean().float(),
                "aux": (aux / n).mean().float(), "acc": accuracy}

    # --- sampling ---

    def _predictor(self, prompts: Sequence[str], guidance: float, truncation: float,
                   negative_prompts: Sequence[str] | None) -> Predictor:
        """log p(x0 | x_t) with guidance and truncation, in that order (then the posterior). The prompts are
        encoded once; the unconditional branch (the null, or negative prompts) runs in the same forward."""
        if not 0 < truncation <= 1:
            raise UserError(f"truncation is the probability mass kept, in (0, 1]; got {truncation}.")
        guidance = self.cfg.guidance if guidance is None else guidance
        cond = self.encode_text(prompts)
        b = len(prompts)

        def steps_of(t: int, batch: int) -> Tensor:
            return torch.full((batch,), t, device=self.device, dtype=torch.long)

        if abs(guidance - 1) < 1e-3:
            return lambda x, t: truncate(log_x0_from_logits(self(x, steps_of(t, b), cond)), truncation)
        both = TextStates.cat([unconditional(self.encode_text, self.null_condition(b), negative_prompts, b), cond])

        def predict(x: Tensor, t: int) -> Tensor:
            logits = self(torch.cat([x, x]), steps_of(t, 2 * b), both).double()
            uncond_logp, cond_logp = F.log_softmax(logits, dim=-1).chunk(2)
            guided = guided_log_probs(cond_logp, uncond_logp, guidance)
            return truncate(torch.cat([guided, torch.full_like(guided[..., :1], LOG_ZERO)], dim=-1), truncation)

        return predict

    def _sampler(self, predict: Predictor, x: Tensor, timesteps: list[int], sampler: str, fast: str,
                 known: Tensor | None, known_mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if fast not in FAST_MODES:
            raise UserError(f"unknown fast-sampling mode {fast!r}; choose one of {', '.join(FAST_MODES)}.")
        if sampler == "purity":
            steps = purity_steps(predict, x, timesteps, self.schedule, known=known, known_mask=known_mask,
                                 generator=generator)
        else:
            steps = denoise_steps(predict, x, timesteps, self.schedule, fast=fast, known=known,
                                  known_mask=known_mask, generator=generator)
        return deque(steps, maxlen=1).pop()

    def _start(self, batch: int, generator: torch.Generator | None) -> Tensor:
        """x_{T-1}: all MASK under the released schedule; a draw of q(x_{T-1}) (masked or uniform codes)
        under a schedule that leaves tokens unmasked at the end."""
        shape = (batch, self.tokens_per_sample)
        if self.schedule.kind == "released" and not self.cfg.final_mask_rate:
            return torch.full(shape, self.mask_id, device=self.device)
        noise = torch.randint(0, self.codebook_size, shape, generator=generator, device=self.device)
        return q_sample(noise, torch.full((batch,), self.cfg.timesteps - 1, device=self.device), self.schedule,
                        generator)

    @torch.no_grad()
    def generate_tokens(self, prompts: Sequence[str], *, steps: int = 50, guidance: float | None = None,
                        truncation: float = 1.0, sampler: str = "posterior", fast: str = "exact",
                        negative_prompts: Sequence[str] | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
        """Token grids [B, g, g] for B prompts: the reverse process from x_{T-1} in about `steps` calls
        (stride round(T / steps); see `timestep_list`).

        guidance is w (1 = unguided; None = the run's model.guidance); truncation the top-r rate (1 = off);
        sampler "posterior" (the standard one) or "purity" (Improved's high-quality sampler); fast "exact"
        (strided posterior) or "official". The generator must live on the model's device."""
        timesteps = timestep_list(self.cfg.timesteps - 1, stride_for(self.cfg.timesteps, steps))
        predict = self._predictor(prompts, guidance, truncation, negative_prompts)
        x = self._sampler(predict, self._start(len(prompts), generator), timesteps, sampler, fast, None, None,
                          generator)
        return x.view(len(prompts), self.grid, self.grid)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, steps: int = 50, guidance: float | None = None,
                 truncation: float = 1.0,
                 sampler: str = "posterior", fast: str = "exact", negative_prompts: Sequence[str] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for B prompts: `generate_tokens` (same options), decoded."""
        return self.decode(self.generate_tokens(prompts, steps=steps, guidance=guidance, truncation=truncation,
                                                sampler=sampler, fast=fast, negative_prompts=negative_prompts,
                                                generator=generator))

    # --- editing ---

    @torch.no_grad()
    def edit_tokens(self, tokens: Tensor, token_mask: Tensor | None, prompts: Sequence[str], *, steps: int = 50,
                    guidance: float | None = None, start: int | None = None, truncation: float = 1.0,
                    sampler: str = "posterior", negative_prompts: Sequence[str] | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Edit token grids [B, g, g] towards the prompts.

        With token_mask [B, g, g] (True = regenerate): inpainting. The masked tokens become MASK and the chain
        runs from `start` (default: where the training marginal masks as much as the largest hole) to 0, the
        known tokens put back after every step, so they come out bit-identical. Without: mask-free
        re-synthesis, x_start ~ q(x_start | tokens) over the whole grid (default start T/2; larger changes
        more), then the chain under the new prompts."""
        b = tokens.shape[0]
        flat = tokens.flatten(1).to(self.device)
        if token_mask is None:
            start = self.cfg.timesteps // 2 if start is None else start
            known, keep = None, None
            x = q_sample(flat, torch.full((b,), start, device=self.device), self.schedule, generator)
        else:
            keep = ~token_mask.flatten(1).to(self.device)
            known = flat
            hole = float((~keep).float().mean(dim=1).max())
            start = token_mask_start(self.schedule, hole) if start is None else start
            x = torch.where(keep, flat, self.mask_id)
        if not 0 <= start < self.cfg.timesteps:
            raise UserError(f"the edit's start step must be in [0, {self.cfg.timesteps - 1}], got {start}.")
        timesteps = timestep_list(start, stride_for(self.cfg.timesteps, steps))
        predict = self._predictor(prompts, guidance, truncation, negative_prompts)
        x = self._sampler(predict, x, timesteps, sampler, "exact", known, keep, generator)
        return x.view_as(tokens)

    @torch.no_grad()
    def edit(self, images: Tensor, mask: Tensor | None, prompts: Sequence[str], *, steps: int = 50,
             guidance: float | None = None, start: int | None = None, truncation: float = 1.0,
             sampler: str = "posterior",
             negative_prompts: Sequence[str] | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Edit images [B, 3, H, W] in [0, 1]: inpaint where the pixel mask [B, 1, H, W] is True (a token is
        regenerated if any pixel of its cell is), or re-synthesise mask-free without a mask; the options are
        `edit_tokens`'. Returns images in [0, 1], all decoded from tokens (compositing the source pixels back
        is the caller's choice)."""
        tokenizer = self.require_tokenizer("edit images")
        images = images.to(self.device)
        token_mask = None if mask is None else pixel_to_token_mask(mask.to(self.device), tokenizer.downsample_factor)
        tokens = self.edit_tokens(tokenizer.encode(images), token_mask, prompts, steps=steps, guidance=guidance,
                                  start=start, truncation=truncation, sampler=sampler,
                                  negative_prompts=negative_prompts, generator=generator)
        return tokenizer.decode(tokens)


class Transformer2D(nn.Module):
    """The released VQ-Diffusion network as diffusers holds it (Transformer2DModel for discrete latents: AdaLayerNorm
    on t in every block, GELU-approximate MLPs), reused as the published weights' own module, behind the family's
    forward. It reads every text state (no text mask, as its pipeline runs it) and returns log p(x0) over the K
    codes, which `log_x0_from_logits` leaves unchanged."""

    def __init__(self, config: dict[str, Any], codebook_size: int, grid: int, timesteps: int, text_width: int):
        from diffusers import Transformer2DModel

        super().__init__()
        try:
            self.model = Transformer2DModel(**config)
        except (TypeError, ValueError) as err:
            raise UserError(f"model.transformer2d is not a Transformer2DModel config ({err}).") from None
        c = self.model.config
        for name, value, expected in (("num_vector_embeds", c.num_vector_embeds, codebook_size + 1),
                                      ("sample_size", c.sample_size, grid),
                                      ("num_embeds_ada_norm", c.num_embeds_ada_norm, timesteps),
                                      ("cross_attention_dim", c.cross_attention_dim, text_width)):
            require(value == expected, f"model.transformer2d has {name} {value}, but this model needs {expected} "
                                       f"(K + 1 codes, the token grid side, T steps, the text width).")

    def forward(self, tokens: Tensor, t: Tensor, states: Tensor) -> Tensor:
        """log p(x0) [B, L, K] for tokens [B, L] at steps t [B]. Its AdaLayerNorm takes one step for the whole
        batch, so a batch of several steps (training's) runs one forward per distinct step."""
        out = None
        for step in t.unique():
            rows = (t == step).nonzero().flatten()
            log_p = self.model(tokens[rows], states[rows], timestep=step).sample.transpose(1, 2)
            out = log_p.new_empty(len(t), *log_p.shape[1:]) if out is None else out
            out[rows] = log_p
        return out


PRESETS: dict[str, dict] = {
    # tests: a 4x4 grid of K=64 codes (the tiny vqgan's), a tiny scratch text tower; milliseconds per step
    "tiny": dict(codebook_size=64, grid=4, width=64, depth=2, heads=4, text_width=32, text_layers=1,
                 text_heads=2, text_context=16),
    # the CPU shapes recipe: 64x64 images -> 8x8 tokens of the small vqgan (K and grid from --vq), short captions
    "small": dict(width=256, depth=6, heads=4, text_width=128, text_layers=2, text_heads=4, text_context=32),
    # VQ-Diffusion-B (19 blocks of 1024, 16 heads) for the GPU COCO recipe: 256px -> 16x16 tokens, K=8192;
    # a scratch text tower by default, a frozen pretrained CLIP one with text_name/text_pretrained
    "base": dict(width=1024, depth=19, heads=16, text_width=512, text_layers=8, text_heads=8, text_context=77),
}
