"""The discrete-token rows of `bench/peers.py`: imgen's VQ-Diffusion and Muse against diffusers' discrete
Transformer2DModel + VQDiffusionScheduler, diffusers' UVit2DModel + AmusedScheduler (aMUSEd) and lucidrains'
muse-maskgit-pytorch.

Every side conditions on precomputed text states of the same shape: the peers take them as inputs, and imgen's
frozen text tower runs once in the builder and is memoised (`_memoise_text`), so the family's own `loss` and
sampler run unchanged while the tower costs nothing in the timed step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, Transformer2DModel, UVit2DModel, VQDiffusionScheduler
from diffusers.schedulers.scheduling_vq_diffusion import index_to_log_onehot
from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE
from muse_maskgit_pytorch import t5 as maskgit_t5
from muse_maskgit_pytorch.muse_maskgit_pytorch import gumbel_sample, top_k
from peers import Row, Side, side, trainable
from torch import Tensor
from transformers import T5Config

from imgen_cli.models.muse import Muse, MuseConfig, choice_temperatures, decode_steps, guidance_scales
from imgen_cli.models.vq_diffusion import VQDiffusion, VQDiffusionConfig, denoise_steps
from imgen_cli.nn.text import TextEncoder, TextEncoderConfig, TextStates

WIDTH, DEPTH, HEADS, MLP_RATIO = 256, 4, 4, 4.0
GRID, CODEBOOK = 16, 1024  # 16 x 16 = 256 tokens
BATCH = 8
TEXT_CONTEXT, TEXT_WIDTH = 16, 256
# the text tower imgen's side is built with: frozen, so it is no part of the trainable parameters (as the peers'
# text encoders are not); it encodes the captions once, in the builder (see `_memoise_text`)
TEXT = dict(text_width=TEXT_WIDTH, text_context=TEXT_CONTEXT, text_frozen=True)
TIMESTEPS = 100  # VQ-Diffusion's T
SAMPLE_T = TIMESTEPS // 2  # the VQ-Diffusion sampling step timed: from t to t - 1, about half the tokens masked
MUSE_STEPS = 12  # Muse's decoding steps; the first is timed
GUIDANCE = 3.0
COND_DROPOUT = 0.1
AUX_WEIGHT = 5e-4  # VQ-Diffusion's auxiliary x0 cross-entropy weight (imgen's default for text)
LR, BETAS = 2e-4, (0.9, 0.99)
SEED = 0
PROMPTS = ["a red circle above a blue square", "two green triangles on a white background",
           "a small yellow star left of a large purple circle", "an orange square", "three blue circles in a row",
           "a pink triangle below a grey square", "a black star inside a white circle",
           "a cyan square and a magenta triangle"]
CAPTIONS = [PROMPTS[i % len(PROMPTS)] for i in range(BATCH)]

_SIZE = (f"{DEPTH} blocks of width {WIDTH}, {HEADS} heads, MLP x{MLP_RATIO:g}; {GRID}x{GRID} = {GRID * GRID} tokens "
         f"of K = {CODEBOOK} codes; batch {BATCH}; cross-attention to {TEXT_CONTEXT} precomputed text states of "
         f"width {TEXT_WIDTH}; AdamW lr {LR:g} betas {BETAS} on every side; guidance {GUIDANCE:g}, cond and "
         f"uncond in one forward of {2 * BATCH} unless noted")


# --- shared inputs and glue ---------------------------------------------------------------------------------


def _tokens(device: torch.device) -> Tensor:
    """The fixed batch of token grids [B, g, g] every side trains on."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, CODEBOOK, (BATCH, GRID, GRID), generator=generator).to(device)


def _half_masked(tokens: Tensor, mask_id: int) -> Tensor:
    """A mid-chain state [B, L] of the flattened tokens: about half the positions MASK."""
    generator = torch.Generator().manual_seed(SEED + 1)
    masked = torch.rand(tokens.shape, generator=generator).to(tokens.device) < 0.5
    return torch.where(masked, mask_id, tokens)


@torch.no_grad()
def _peer_text(device: torch.device) -> tuple[TextStates, TextStates]:
    """The peers' precomputed text inputs, the conditional batch and the null (empty prompt) one: imgen's
    scratch text tower of the same size, so states, masks and pooled vectors have exactly imgen's shapes."""
    torch.manual_seed(SEED)
    encoder = TextEncoder(TextEncoderConfig(**TEXT)).to(device)
    empty = encoder([""])
    null = TextStates(empty.states.expand(BATCH, -1, -1), empty.mask.expand(BATCH, -1),
                      empty.pooled.expand(BATCH, -1))
    return encoder(CAPTIONS), null


def _memoise_text(encoder: TextEncoder) -> None:
    """imgen's side gets the peers' deal: its frozen tower encodes the captions and the empty prompt once, here,
    and the family's loss and sampler read the results instead of running the tower in the timed step."""
    with torch.no_grad():
        memo = {tuple(captions): encoder(captions) for captions in (CAPTIONS, [""])}
    encoder.forward = lambda captions: memo[tuple(captions)]


def _with_dropout(cond: TextStates, null: TextStates) -> TextStates:
    """Classifier-free-guidance dropout of captions, which the diffusers models leave to the training script."""
    return cond.where(torch.rand(len(cond), device=cond.states.device) < COND_DROPOUT, null)


# --- VQ-Diffusion ---------------------------------------------------------------------------------------------


def imgen_vqdiffusion(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    model = VQDiffusion(VQDiffusionConfig(codebook_size=CODEBOOK, grid=GRID, width=WIDTH, depth=DEPTH, heads=HEADS,
                                          mlp_ratio=MLP_RATIO, timesteps=TIMESTEPS, aux_weight=AUX_WEIGHT,
                                          cond_dropout=COND_DROPOUT, **TEXT)).to(device).train()
    _memoise_text(model.text_encoder)
    batch = {"tokens": _tokens(device), "caption": CAPTIONS}
    predict = model._predictor(CAPTIONS, GUIDANCE, 1.0, None)  # truncation 1: off, as on the peer
    x_t = _half_masked(batch["tokens"].flatten(1), model.mask_id)
    params = trainable(model)
    return side("imgen VQDiffusion", params, lambda: model.loss(batch)["loss"],
                lambda: next(denoise_steps(predict, x_t, [SAMPLE_T, SAMPLE_T - 1], model.schedule)), device, dtype,
                lr=LR, betas=BETAS)


def _vq_noised(scheduler: VQDiffusionScheduler, x0: Tensor, t: int) -> Tensor:
    """x_t ~ q(x_t | x0) at one step t, from the scheduler's cumulative schedule: MASK w.p. gamma_bar_t, x0 w.p.
    alpha_bar_t, else a uniform code (diffusers ships the reverse process only)."""
    alpha, gamma = scheduler.log_cumprod_at[t].exp(), scheduler.log_cumprod_ct[t].exp()
    u = torch.rand(x0.shape, device=x0.device)
    codes = torch.randint(0, CODEBOOK, x0.shape, device=x0.device)
    return torch.where(u < gamma, scheduler.mask_class, torch.where(u < gamma + alpha, x0, codes))


def _vq_loss(scheduler: VQDiffusionScheduler, log_x0: Tensor, x0: Tensor, x_t: Tensor, t: int) -> Tensor:
    """VQ-Diffusion's loss per token at a step t >= 1 for log p(x0) [B, K, L]: KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)), both posteriors from the scheduler's own q_posterior, plus the auxiliary x0 cross-entropy
    weighted by 2 - t/T (the paper's)."""
    true = scheduler.q_posterior(index_to_log_onehot(x0, CODEBOOK), x_t, t)
    model = scheduler.q_posterior(log_x0, x_t, t)
    kl = (true.exp() * (true - model)).sum(dim=1)
    aux = -log_x0.gather(1, x0[:, None]).squeeze(1)
    return (kl + AUX_WEIGHT * (2 - t / TIMESTEPS) * aux).mean()


def diffusers_vqdiffusion(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    # VQ-Diffusion's discrete transformer; "gelu-approximate" gives imgen's MLP (the released model's is a GEGLU)
    net = Transformer2DModel(num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, num_layers=DEPTH,
                             num_vector_embeds=CODEBOOK + 1, sample_size=GRID, cross_attention_dim=TEXT_WIDTH,
                             activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm",
                             num_embeds_ada_norm=TIMESTEPS).to(device).train()
    scheduler = VQDiffusionScheduler(num_vec_classes=CODEBOOK + 1, num_train_timesteps=TIMESTEPS)
    scheduler.set_timesteps(TIMESTEPS, device)  # moves the schedule's tables to the device
    steps = torch.arange(TIMESTEPS, device=device)  # the model's timestep input, indexed without a host copy
    x0 = _tokens(device).flatten(1)
    cond, null = _peer_text(device)
    both = TextStates.cat([null, cond])
    x_t = _half_masked(x0, scheduler.mask_class)

    def loss() -> Tensor:
        # one t for the whole batch: the AdaLayerNorm of diffusers' blocks splits its embedding along dim 0,
        # so it takes a single timestep per call
        t = int(torch.randint(1, TIMESTEPS, ()))
        noised = _vq_noised(scheduler, x0, t)
        text = _with_dropout(cond, null)
        log_x0 = net(noised, encoder_hidden_states=text.states, encoder_attention_mask=text.mask,
                     timestep=steps[t]).sample
        return _vq_loss(scheduler, log_x0, x0, noised, t)

    def update() -> None:
        # the pipeline's step: guidance on log p(x0), renormalised, log-zero floored, then the scheduler
        log_x0 = net(torch.cat([x_t, x_t]), encoder_hidden_states=both.states, encoder_attention_mask=both.mask,
                     timestep=steps[SAMPLE_T]).sample
        uncond, conditional = log_x0.chunk(2)
        guided = uncond + GUIDANCE * (conditional - uncond)
        guided = (guided - guided.logsumexp(dim=1, keepdim=True)).clamp(-70)
        scheduler.step(guided, SAMPLE_T, x_t)

    params = trainable(net)
    return side("diffusers Transformer2DModel + VQDiffusionScheduler", params, loss, update, device, dtype, lr=LR,
                betas=BETAS)


# --- Muse ---------------------------------------------------------------------------------------------------


def imgen_muse(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    cfg = MuseConfig(codebook_size=CODEBOOK, grid=GRID, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_ratio=MLP_RATIO,
                     cond_dropout=COND_DROPOUT, **TEXT)
    model = Muse(cfg).to(device).train()
    _memoise_text(model.text_encoder)
    batch = {"tokens": _tokens(device), "caption": CAPTIONS}
    predict = model._predictor(CAPTIONS, guidance_scales(MUSE_STEPS, GUIDANCE), None, None)
    temperatures = choice_temperatures(MUSE_STEPS)
    start = torch.full((BATCH, GRID * GRID), model.mask_id, device=device)

    def update() -> None:
        next(decode_steps(predict, start, model.mask_id, steps=MUSE_STEPS, choice_temperatures=temperatures,
                          schedule=cfg.schedule, exponent=cfg.schedule_exponent))

    params = trainable(model)
    return side("imgen Muse", params, lambda: model.loss(batch)["loss"], update, device, dtype, lr=LR,
                betas=BETAS)


def _cosine_masked(tokens: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """aMUSEd's training masking: per sample a rate cos(pi/2 u), u ~ U(0, 1), of the tokens (at least one) at
    random positions become MASK. Returns the inputs and the labels (-100 where not masked)."""
    b, n = tokens.shape[0], tokens[0].numel()
    rate = torch.cos(torch.rand(b, device=tokens.device) * torch.pi / 2)
    counts = (rate * n).round().clamp(min=1)
    masked = torch.rand(b, n, device=tokens.device).argsort(dim=-1) < counts[:, None]
    masked = masked.view_as(tokens)
    return torch.where(masked, mask_id, tokens), torch.where(masked, tokens, -100)


def diffusers_uvit(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    micro_dim = WIDTH // 4  # aMUSEd's micro-conditioning encoding at its ratio to the width (256 of 1024)
    # no conv stages (num_res_blocks=0), so the network is its transformer like imgen's; its feed-forward is a
    # GEGLU, whose hidden width 2/3 of MLP_RATIO x WIDTH gives the parameters of imgen's GELU MLP (aMUSEd's rule)
    net = UVit2DModel(hidden_size=WIDTH, in_channels=WIDTH, block_out_channels=WIDTH, num_res_blocks=0,
                      num_hidden_layers=DEPTH, num_attention_heads=HEADS, block_num_heads=HEADS,
                      intermediate_size=int(WIDTH * MLP_RATIO * 2 / 3), vocab_size=CODEBOOK + 1,
                      codebook_size=CODEBOOK, encoder_hidden_size=TEXT_WIDTH, cond_embed_dim=TEXT_WIDTH,
                      micro_cond_encode_dim=micro_dim, micro_cond_embed_dim=5 * micro_dim,
                      sample_size=GRID).to(device).train()
    scheduler = AmusedScheduler(mask_token_id=CODEBOOK)
    scheduler.set_timesteps(MUSE_STEPS, (2, 0), device)
    tokens = _tokens(device)
    cond, null = _peer_text(device)
    both = TextStates.cat([null, cond])
    # the aMUSEd pipeline's micro-conditioning: image width and height (a 16x tokenizer's), crop top-left,
    # aesthetic score
    micro = torch.tensor([GRID * 16, GRID * 16, 0, 0, 6], dtype=torch.float32, device=device).expand(BATCH, -1)
    start = torch.full((BATCH, GRID, GRID), CODEBOOK, device=device)

    def loss() -> Tensor:
        inputs, labels = _cosine_masked(tokens, CODEBOOK)
        text = _with_dropout(cond, null)
        logits = net(inputs, encoder_hidden_states=text.states, pooled_text_emb=text.pooled, micro_conds=micro)
        return F.cross_entropy(logits, labels, ignore_index=-100)

    def update() -> None:
        logits = net(torch.cat([start, start]), encoder_hidden_states=both.states, pooled_text_emb=both.pooled,
                     micro_conds=torch.cat([micro, micro]))
        uncond, conditional = logits.chunk(2)
        scheduler.step(uncond + GUIDANCE * (conditional - uncond), scheduler.timesteps[0], start)

    params = trainable(net)
    return side("diffusers UVit2DModel + AmusedScheduler", params, loss, update, device, dtype, lr=LR,
                betas=BETAS)


def muse_maskgit(device: torch.device, dtype: torch.dtype) -> Side:
    torch.manual_seed(SEED)
    # MaskGit sizes its text projection from a T5 config it would download; a local config of the precomputed
    # states' width stands in (equal to WIDTH, so the projection is the identity), and T5 itself is never run
    maskgit_t5.T5_CONFIGS["precomputed"] = {"config": T5Config(d_model=TEXT_WIDTH)}
    # flash=False: its "flash" path never reaches torch's SDPA (attend.py raises before it) and falls back to
    # memory-efficient-attention-pytorch's Python-level chunked kernel; the einsum path is the plain one
    transformer = MaskGitTransformer(num_tokens=CODEBOOK, seq_len=GRID * GRID, dim=WIDTH, depth=DEPTH, heads=HEADS,
                                     dim_head=WIDTH // HEADS, ff_mult=MLP_RATIO, t5_name="precomputed", flash=False)
    # MaskGit requires a VQGAN to check the codebook size against; the smallest one, never run on token input
    vae = VQGanVAE(dim=16, layers=1, codebook_size=CODEBOOK, use_vgg_and_gan=False)
    maskgit = MaskGit(image_size=GRID, transformer=transformer, vae=vae, cond_drop_prob=COND_DROPOUT).to(device).train()
    tokens = _tokens(device)
    cond, _ = _peer_text(device)
    # MaskGit finds the text padding from all-zero states, as its T5 encoder zeroes them
    text_embeds = cond.states.masked_fill(~cond.mask[..., None], 0.0)
    mask_id = transformer.mask_id
    start = torch.full((BATCH, GRID * GRID), mask_id, device=device)
    scores = torch.zeros(start.shape, device=device)

    def update() -> None:
        # one iteration of MaskGit.generate's loop (which also draws a tqdm bar and decodes with the VAE):
        # re-mask the least confident, predict with guidance (two forwards of B), top-k filter, sample, re-score
        ids = start.scatter(1, scores.topk(GRID * GRID, dim=-1).indices, mask_id)
        logits = transformer.forward_with_cond_scale(ids, text_embeds=text_embeds, cond_scale=GUIDANCE)
        sampled = gumbel_sample(top_k(logits, 0.9), temperature=1.0)
        is_mask = ids == mask_id
        sampled = torch.where(is_mask, sampled, ids)
        (1 - logits.softmax(dim=-1).gather(2, sampled[..., None])).squeeze(-1).masked_fill(~is_mask, -1e5)

    # its self-conditioning feed-forward (built even with self_cond=False) and its top-level norm never run
    unused = {id(p) for module in (transformer.self_cond_to_init_embed, transformer.norm) for p in module.parameters()}
    params = [p for p in transformer.parameters() if id(p) not in unused]
    return side("muse-maskgit-pytorch MaskGit", params, lambda: maskgit(tokens, text_embeds=text_embeds), update,
                device, dtype, lr=LR, betas=BETAS)


ROWS = [
    Row("vqdiffusion",
        f"{_SIZE}; T = {TIMESTEPS}. Train: the bound's KL between the true and the model posterior plus the "
        f"auxiliary x0 cross-entropy (weight {AUX_WEIGHT:g}), captions dropped at {COND_DROPOUT:g}; imgen draws "
        f"t per sample by importance sampling and works in float64, diffusers takes one uniform t >= 1 per batch "
        f"(its AdaLayerNorm accepts a single timestep) and VQDiffusionScheduler.q_posterior's float32. Sample: "
        f"one guided step from t = {SAMPLE_T} to {SAMPLE_T - 1} on a half-masked grid, imgen's float64 posterior "
        f"vs VQDiffusionScheduler.step. Architecture: the same block (adaptive LN on t before self- and "
        f"cross-attention, GELU MLP, biases, row + column embeddings); imgen embeds t once for all blocks and has "
        f"a learnable null condition, diffusers embeds t in each norm; both mask the text padding",
        imgen_vqdiffusion, [diffusers_vqdiffusion]),
    Row("muse",
        f"{_SIZE}. Train: masked-token cross-entropy at a cosine-schedule masking rate, captions dropped at "
        f"{COND_DROPOUT:g} (imgen adds label smoothing {MuseConfig.label_smoothing:g}). Sample: the first of "
        f"{MUSE_STEPS} decoding steps from all-MASK (imgen's decode_steps / AmusedScheduler.step / MaskGit's loop "
        f"with its top-k 0.9 filter). "
        f"Architecture: imgen's pre-LN blocks (LayerNorm, biases, GELU MLP, SDPA) with adaptive norms on the "
        f"pooled text before both attentions, text padding masked; UVit2DModel without its conv stages "
        f"(num_res_blocks=0, so it has no positional signal, which costs nothing), RMSNorm, no biases, adaptive "
        f"norms before all three sublayers, GEGLU of hidden {int(WIDTH * MLP_RATIO * 2 / 3)}, micro-conditioning, "
        f"no text mask (it takes none); MaskGit with 1-D position embeddings, qk-normalised attention with a null "
        f"key, no biases, GEGLU of hidden {int(WIDTH * MLP_RATIO * 2 / 3)}, no adaptive norms or pooled text, "
        f"text padding masked, einsum attention (flash=False), and guidance as two forwards of {BATCH}",
        imgen_muse, [diffusers_uvit, muse_maskgit]),
]
