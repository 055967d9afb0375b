"""unCLIP (DALL-E 2): Hierarchical Text-Conditional Image Generation with CLIP Latents.

Ramesh, Dhariwal, Nichol, Chu, Chen 2022, arXiv:2204.06125. https://arxiv.org/abs/2204.06125

unCLIP generates an image x from a caption y in two stages (section 2, eq. 1):
    P(x | y) = P(x | z_i, y) P(z_i | y),
a *prior* P(z_i | y) that turns the caption (and its CLIP text embedding z_t) into a CLIP image
embedding z_i, and a *decoder* P(x | z_i, y), a diffusion model that inverts CLIP's image encoder.
Two diffusion upsamplers then raise the resolution (64 -> 256 -> 1024 in the paper).

This file composes its siblings (the only model file allowed to): `clip.CLIP` for the embeddings,
`ddpm.GaussianDiffusion` for every diffusion process, and `guided.UNet` for the decoder and the
upsamplers.

What is implemented (section numbers of the paper)
- Diffusion prior (2.2): a decoder-only Transformer with a causal mask over, in order, the
  caption's tokens, z_t, a time-step embedding, the noised z_i and a final learned query whose
  output predicts the clean z_i (not the noise), trained with MSE; cosine schedule, T = 1000;
  the text conditioning dropped 10% of the time for classifier-free guidance; strided sampling;
  two samples per caption, keeping the one with the larger z_i . z_t.
- AR prior (2.2): z_i reduced by PCA (fitted on training embeddings, components ordered by
  decreasing eigenvalue), each component quantised into 1024 buckets, and a causal Transformer that
  predicts the bucket tokens after a prefix of the encoded caption, z_t and a token for the
  quantised z_i . z_t; at sampling the dot-product token is drawn from the top half of its
  predicted distribution.
- Decoder (2.1): GLIDE's text-conditional UNet (`guided.UNet`) with z_i projected and added to the
  time embedding and projected into 4 extra context tokens joined to the text encoder's outputs;
  z_i zeroed 10% and the caption dropped 50% of the time in training, for classifier-free
  guidance; learned variance (Improved DDPM's hybrid loss); strided sampling.
- Upsamplers (2.1, appendix C): convolution-only ADM UNets without text, given the upsampled
  low-resolution image; conditioning augmentation by a Gaussian blur (kernel 3, sigma 0.6) for
  the first and a BSR-style degradation for the second; trained on random crops; DDIM sampling.
- Image variations (3.1), interpolations (3.2, slerp of z_i with DDIM-inverted x_T) and text
  diffs (3.3, slerp from z_i toward z_d = normalize(z_t - z_t0)).

Deviations from the paper, said openly
- Embedding scale: the paper multiplies z_i by 17.2 so that, with D = 1024, each coordinate has
  the variance of ImageNet pixels in [-1, 1] (17.2^2 / 1024 = 0.29). Here the scale is
  `embed_std * sqrt(D)`, so the per-coordinate RMS is `embed_std`: 1.0 (unit variance) in the
  small presets, 17.2 / 32 in the paper's.
- Diffusion prior sampling: the paper uses Analytic-DPM's variances (Bao et al. 2022) on 64
  strided steps; here the respaced process uses the fixed posterior variance beta_tilde
  (`ddpm.GaussianDiffusion`, "fixed_small").
- The AR prior's text encoder feeds the latent decoder as a prefix of its outputs (the paper:
  "encoding them as a prefix"); the paper's latent decoder context of 384 cannot hold its 256 text
  tokens plus 321 others, so the exact layout there is unknown.
- The tiny preset's AR prior quantises into 32 buckets, not 1024: in 400 steps a 1024-way
  softmax per token stays near uniform (loss 6.2 nats against ln 1024 = 6.9; test cosine of the
  samples with the true z_i 0.55), while 32 buckets learn (0.88) and still round-trip the
  embeddings at cosine 0.996. The paper preset keeps 1024.
- The AR prior is also trained with the caption dropped 10% of the time (the paper says nothing of
  it), so that it can sample without a caption (`sample(n)` with no prompt).
- Upsamplers: the blur is applied to every training input and never at sampling (the paper does
  not say how often); the BSR degradation leaves out JPEG compression (it needs an image codec)
  and draws one set of parameters per batch; ADM's middle-block attention is removed (the paper:
  "neither upsampler uses attention"); they predict eps with a fixed variance (sampled with DDIM,
  so a learned variance would be unused).
- The tiny preset's second upsampler trains with the first stage's blur instead of BSR, which
  taught it to round the corners of the shapes' squares (measured in `_tiny`'s docstring).
- The tiny preset's decoder and upsamplers predict v (Salimans & Ho 2022) instead of eps. After
  the few hundred to few thousand steps a CPU allows, an eps model has not learnt the noise's
  per-image mean (its error there equals the mean's own spread), and 1 / sqrt(alpha_bar) amplifies
  that error into the predicted x_0 at large t: whole images come out tinted (black backgrounds
  red or green). Measured on the tiny DDPM after 400 steps, the per-image mean error of x_0_hat at
  t = 800 / 950 was 0.62 / 2.49 with eps and 0.13 / 0.13 with v, which predicts the image itself
  where the noise is large. The paper presets keep eps.
- The decoder multiplies the unit-norm z_i by sqrt(D) before its two projections (unit variance
  per coordinate, the scale a linear layer's initialisation expects); the paper does not say how
  z_i enters. Without it the tiny decoder ignored position for its whole run (see `Decoder`).
- Parameter counts: the paper's Table 3 gives "1B" for both priors, but appendix C gives shapes
  whose blocks alone count 1.21B (diffusion prior: one Transformer, width 2048, 24 blocks) and
  2.0B (AR prior: text encoder 2048 x 24 plus latent decoder 1664 x 24); with CLIP's 49,408-token
  embedding the presets count 1.33B and 2.12B. The presets follow the stated shapes.

Glossary (paper -> code)
  y            caption                                      `caption`, token ids `text`
  z_t          CLIP text embedding (unit norm)              `z_t`
  z_i          CLIP image embedding (unit norm)             `z_i`
  z_i^(t)      noised (scaled) image embedding at step t    `x_t` in the prior
  f_theta      prior network predicting the clean z_i       `DiffusionPrior.forward`
  s            classifier-free guidance scale               `guidance_scale`
  PCA          principal components of z_i, by eigenvalue   `ARPrior.components`
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import ddpm
import guided


# --- configs ---

@dataclass
class DiffusionPriorConfig:
    width: int = 2048  # Transformer width (appendix C)
    layers: int = 24  # Transformer blocks (appendix C)
    heads: int = 32  # attention heads (Table 3: text encoder heads)
    text_ctx: int = 256  # caption tokens (Table 3: text encoder context)
    timesteps: int = 1000  # diffusion steps T (Table 3)
    schedule: str = "cosine"  # noise schedule (Table 3)
    sample_steps: int = 64  # strided sampling steps (appendix C)
    embed_std: float = 0.5375  # per-coordinate RMS of the scaled z: 17.2 / sqrt(1024) (appendix C)
    cond_drop: float = 0.1  # probability of dropping the text conditioning (section 2.2)


@dataclass
class ARPriorConfig:
    text_width: int = 2048  # text encoder width (appendix C)
    text_layers: int = 24  # text encoder blocks
    text_heads: int = 32  # text encoder heads
    text_ctx: int = 256  # caption tokens
    width: int = 1664  # latent decoder width (appendix C)
    layers: int = 24  # latent decoder blocks
    heads: int = 26  # latent decoder heads
    components: int = 319  # principal components kept (section 2.2: 319 of 1024)
    buckets: int = 1024  # quantisation buckets per component and for z_i . z_t (section 2.2)
    cond_drop: float = 0.1  # caption dropout (not in the paper; lets the prior sample without one)


def _decoder_unet(**kw):
    """GLIDE's 3.5B text-conditional 64x64 model (Nichol et al. 2021, section 4; unCLIP Table 3):
    512 channels, 3 residual blocks per level, multipliers 1,2,3,4, attention at 32, 16, 8 with
    64-channel heads, a 24-block 2048-wide text encoder over 256 tokens, learned variance, cosine
    schedule, dropout 0.1; plus the CLIP embedding (ViT-H/16: 1024 dimensions) as `cond`."""
    base = dict(image_size=64, model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1, learn_sigma=True,
                cond_dim=1024, text_ctx=256, xf_width=2048, xf_layers=24, xf_heads=32, vocab_size=50257,
                noise_schedule="cosine", p_uncond=0.0)
    return guided.ADMConfig(**{**base, **kw})


@dataclass
class DecoderConfig:
    unet: guided.ADMConfig = field(default_factory=_decoder_unet)  # the GLIDE UNet
    context_tokens: int = 4  # extra context tokens projected from z_i (section 2.1)
    z_drop: float = 0.1  # probability z_i is set to zero in training (section 2.1)
    text_drop: float = 0.5  # probability the caption is dropped in training (section 2.1)
    sample_steps: int = 250  # default strided sampling steps (appendix C)
    prediction: str = "eps"  # what the UNet predicts: "eps" (GLIDE) or "v" (Salimans & Ho 2022)


def _upsampler_unet(**kw):
    """An unconditional, attention-free ADMNet upsampler (appendix C, Table 3)."""
    base = dict(image_size=256, low_res_size=64, model_channels=320, channel_mult=(1, 2, 3, 4),
                num_res_blocks=3, attention_resolutions=(), num_head_channels=-1, learn_sigma=False, dropout=0.1,
                noise_schedule="cosine", p_uncond=0.0)
    return guided.ADMConfig(**{**base, **kw})


@dataclass
class UpsamplerConfig:
    unet: guided.ADMConfig = field(default_factory=_upsampler_unet)  # the ADMNet (low_res_size > 0)
    degradation: str = "blur"  # conditioning augmentation: "blur" (stage 1) or "bsr" (stage 2)
    crop_fraction: float = 0.25  # training crops, as a fraction of the target side (Table 3)
    prediction: str = "eps"  # what the UNet predicts: "eps" (ADM) or "v" (Salimans & Ho 2022)
    sample_steps: int = 27  # default DDIM steps (appendix C: 27 for 256, 15 for 1024)


CLIPConfig = clip.CLIPConfig  # (a field below is named `clip`, shadowing the module)

# ViT-H/16 CLIP of appendix C: 256x256 images, width 1280, 32 blocks; text width 1024, 24 blocks
CLIP_VIT_H_16 = clip.CLIPConfig(image_size=256, patch_size=16, vision_width=1280, vision_layers=32,
                                vision_heads=16, embed_dim=1024, text_width=1024, text_layers=24,
                                text_heads=16)


@dataclass
class UnCLIPConfig:
    image_size: int = 1024  # side of the final images (the second upsampler's output)
    in_channels: int = 3  # image channels
    prior: str = "diffusion"  # which prior: "diffusion" or "ar" (section 2.2)
    clip: CLIPConfig = field(default_factory=lambda: CLIP_VIT_H_16)  # the frozen embedder
    diffusion_prior: DiffusionPriorConfig = field(default_factory=DiffusionPriorConfig)
    ar_prior: ARPriorConfig = field(default_factory=ARPriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # 64x64 in the paper
    upsampler1: UpsamplerConfig = field(default_factory=UpsamplerConfig)  # 64 -> 256
    upsampler2: UpsamplerConfig = field(default_factory=lambda: UpsamplerConfig(
        unet=_upsampler_unet(image_size=1024, low_res_size=256, model_channels=192, num_res_blocks=2,
                             channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, noise_schedule="linear"),
        degradation="bsr", sample_steps=15))  # 256 -> 1024


def _tiny():
    """CPU-sized stack for the shapes data: clip.py's tiny CLIP on 32x32, a 32x32 decoder, and
    upsamplers 32 -> 64 -> 128 (the paper: 64 -> 256 -> 1024). The decoder works at 32, not 16:
    at 16 pixels a small circle and a small square are a few pixels each, and even the true images
    shrunk to 16 and enlarged again show the right shape only ~80% of the time (pixel judge). Its
    targets are the images drawn at 32 (`extra_image_sizes`), not the 128-pixel ones shrunk.

    Deviation from the paper: both upsamplers train with the Gaussian blur; the paper gives the
    last stage the BSR degradation. On these shapes BSR teaches the 64 -> 128 stage to round the
    corners of squares: on the same inputs and noise, the test images through both upsamplers keep
    their shape 97.4-97.9% of the time with blur (three training seeds) against 95.3-96.9% with
    BSR, and the decoder's images 72.4-75.0% against 70.8-72.4% (docs/results.md).

    The second upsampler samples with 3 DDIM steps (the paper: 15 at 1024). With few steps DDIM
    stays near the network's estimate of the mean, which for a flat square keeps its corners; more
    steps round them. On the same inputs and noise the decoder's images keep their shape 84.0% of
    the time with 3 steps against 81.8% with 5 (600 test captions), the background is half as
    light, and the test images keep 98.7% either way (docs/results.md has every measure)."""
    return UnCLIPConfig(
        image_size=128,
        clip=clip.PRESETS["tiny"],
        diffusion_prior=DiffusionPriorConfig(width=128, layers=4, heads=4, text_ctx=48, sample_steps=32,
                                             embed_std=1.0),
        ar_prior=ARPriorConfig(text_width=64, text_layers=2, text_heads=2, text_ctx=48, width=128, layers=4,
                               heads=4, components=16, buckets=32),
        decoder=DecoderConfig(unet=guided.ADMConfig(
            image_size=32, model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,),
            num_head_channels=32, norm_groups=8, learn_sigma=True, cond_dim=64, text_ctx=48, xf_width=64,
            xf_layers=1, xf_heads=2, noise_schedule="cosine", p_uncond=0.0), sample_steps=50, prediction="v"),
        upsampler1=UpsamplerConfig(unet=guided.ADMConfig(
            image_size=64, low_res_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
            attention_resolutions=(), num_head_channels=-1, learn_sigma=False, noise_schedule="cosine",
            p_uncond=0.0),
            degradation="blur", crop_fraction=0.25, sample_steps=10, prediction="v"),
        upsampler2=UpsamplerConfig(unet=guided.ADMConfig(
            image_size=128, low_res_size=64, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
            attention_resolutions=(), num_head_channels=-1, learn_sigma=False, noise_schedule="linear",
            p_uncond=0.0),
            degradation="blur", crop_fraction=0.25, sample_steps=3, prediction="v"))


PRESETS = {
    # CPU in minutes on the shapes data (see _tiny)
    "tiny": _tiny(),
    # the paper's stack (Table 3 and appendix C), counted on the meta device: CLIP ViT-H/16
    # 986,339,841; diffusion prior 1,325,014,016 (AR prior 2,119,465,472); decoder 3,565,434,374;
    # upsamplers 729,702,083 and 282,059,139 (Table 3: 1B, 1B, 3.5B, 700M, 300M)
    "unclip": UnCLIPConfig(),
}


# --- helpers ---

def make_diffusion(schedule, T, **kw):
    """A `ddpm.GaussianDiffusion`; its float64 tables stay on the CPU even when the model is built on
    the meta device (parameter counting)."""
    with torch.device("cpu"):
        return ddpm.GaussianDiffusion(ddpm.make_beta_schedule(schedule, T), **kw)


def check_prediction(prediction, part):
    """The decoder and upsamplers predict eps (the paper) or v; ddpm's x_0 is not offered."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"unclip: unknown {part} prediction {prediction!r}; use 'eps' or 'v'")


def resize(x, size):
    """(B, C, H, W) -> (B, C, size, size); antialiased when shrinking."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


def slerp(a, b, theta):
    """Spherical interpolation of unit vectors (section 3.2): theta = 0 gives a, theta = 1 gives b.

    slerp(a, b, theta) = sin((1 - theta) w) / sin(w) a + sin(theta w) / sin(w) b, w = arccos(a . b).
    a, b: (..., D) unit vectors; theta: float or tensor broadcastable to (..., 1).
    """
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device)
    if theta.dim() == 0:
        theta = theta.expand(*a.shape[:-1], 1)
    dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    w = torch.acos(dot)
    s = torch.sin(w)
    out = torch.sin((1 - theta) * w) / s * a + torch.sin(theta * w) / s * b
    near = dot > 1 - 1e-5  # almost parallel: sin(w) ~ 0, linear interpolation is exact enough
    return torch.where(near, (1 - theta) * a + theta * b, out)


def top_half(p):
    """A distribution over ordered buckets (B, n) restricted to its top half: the buckets wholly
    below the median get no mass, the rest is renormalised (section 2.2, the AR prior's dot token)."""
    p = p.masked_fill(p.cumsum(-1) <= 0.5 + 1e-6, 0)  # CDF(k) <= 1/2: bucket k lies below the median
    return p / p.sum(-1, keepdim=True)


def cfg_combine(out_cond, out_uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2021): uncond + s (cond - uncond).

    s = 1 is the conditional model, s = 0 the unconditional one.
    """
    return out_uncond + scale * (out_cond - out_uncond)


# --- the diffusion prior ---

class DiffusionPrior(nn.Module):
    """f_theta(z_i^(t), t, y) -> z_i: a causal Transformer over [text, z_t, t, z_i^(t), query].

    Section 2.2 of the paper; the output at the final learned query predicts the clean (scaled)
    image embedding. Embeddings enter and leave scaled by `scale` = embed_std * sqrt(D).
    """

    def __init__(self, cfg, embed_dim, vocab_size):
        super().__init__()
        self.cfg, self.embed_dim = cfg, embed_dim
        W = cfg.width
        self.scale = cfg.embed_std * math.sqrt(embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, W)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.text_ctx + 4, W))
        self.z_t_proj = nn.Linear(embed_dim, W)
        self.time_embed = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.x_proj = nn.Linear(embed_dim, W)
        self.query = nn.Parameter(0.02 * torch.randn(W))
        self.transformer = clip.Transformer(W, cfg.layers, cfg.heads)
        self.ln_final = nn.LayerNorm(W)
        self.out = nn.Linear(W, embed_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.diffusion = make_diffusion(cfg.schedule, cfg.timesteps, prediction="x_0")

    def forward(self, x_t, t, text, z_t):
        """x_t: (B, D) noised scaled z_i; t: (B,) long; text: (B, text_ctx) ids; z_t: (B, D) unit
        (zeros where dropped). Returns the predicted clean scaled z_i, (B, D)."""
        B = x_t.shape[0]
        seq = torch.cat([
            self.token_embedding(text),  # (B, L, W)
            self.z_t_proj(z_t * self.scale)[:, None],  # (B, 1, W)
            self.time_embed(guided.timestep_embedding(t, self.cfg.width))[:, None],  # (B, 1, W)
            self.x_proj(x_t)[:, None],  # (B, 1, W)
            self.query.to(x_t.dtype).expand(B, 1, -1),  # (B, 1, W)
        ], dim=1) + self.positional_embedding[:text.shape[1] + 4]  # (B, L + 4, W)
        h = self.ln_final(self.transformer(seq, causal=True))  # (B, L + 4, W)
        return self.out(h[:, -1])  # (B, D)

    def loss(self, text, z_t, z_i, null_text):
        """L_prior = E_{t, z_i^(t)} ||f_theta(z_i^(t), t, y) - z_i||^2 (section 2.2, eq. 2).

        The text conditioning (caption and z_t) is replaced by the empty caption and z_t = 0 for a
        `cond_drop` fraction of the batch, so that the same network is the unconditional model.
        """
        B = z_i.shape[0]
        drop = torch.rand(B, device=z_i.device) < self.cfg.cond_drop
        text = torch.where(drop[:, None], null_text.expand_as(text), text)
        z_t = z_t * (~drop)[:, None].to(z_t.dtype)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=z_i.device)
        terms = self.diffusion.training_losses(self, z_i * self.scale, t,
                                               model_kwargs={"text": text, "z_t": z_t})
        return terms["mse"].mean()

    @torch.no_grad()
    def sample(self, text, z_t, null_text, guidance_scale=1.0, steps=None, candidates=2):
        """z_i ~ P(z_i | y): `candidates` samples per caption, keeping the largest z_i . z_t.

        text: (B, L) ids; z_t: (B, D) unit. Strided sampling on `steps` (default the config's)
        respaced steps. Returns unit-norm z_i, (B, D).
        """
        B, D = z_t.shape
        text_k = text.repeat(candidates, 1)  # (kB, L), candidate-major
        z_t_k = z_t.repeat(candidates, 1)  # (kB, D)

        def model(x, t, text, z_t):
            if guidance_scale == 1.0:
                return self(x, t, text, z_t)
            both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null_text.expand_as(text)]),
                        torch.cat([z_t, torch.zeros_like(z_t)]))  # (2kB, D)
            cond, uncond = both.chunk(2)
            return cfg_combine(cond, uncond, guidance_scale)

        x_0 = self.diffusion.sample(model, (candidates * B, D), steps=steps or self.cfg.sample_steps,
                                    model_kwargs={"text": text_k, "z_t": z_t_k}, clip_denoised=False,
                                    device=z_t.device)
        z = F.normalize(x_0.float(), dim=-1).view(candidates, B, D)  # (k, B, D)
        best = (z * z_t[None]).sum(-1).argmax(0)  # (B,): the candidate nearest the caption
        return z[best, torch.arange(B, device=z.device)]  # (B, D)


# --- the autoregressive prior ---

class ARPrior(nn.Module):
    """P(z_i | y) as a sequence of PCA-bucket tokens, predicted by a causal Transformer.

    Section 2.2: the sequence is [encoded caption, z_t, q(z_i . z_t), q(pc_1), ..., q(pc_K)], q the
    bucket index. The PCA (mean, components ordered by decreasing eigenvalue) and the bucket ranges
    are fitted by `fit` on training embeddings and kept in buffers, so they are checkpointed.
    """

    def __init__(self, cfg, embed_dim, vocab_size):
        super().__init__()
        if cfg.components > embed_dim:
            raise ValueError(f"unclip: ar_prior.components {cfg.components} exceeds the CLIP embedding "
                             f"size {embed_dim}; lower it")
        self.cfg, self.embed_dim = cfg, embed_dim
        K, Wt, W = cfg.components, cfg.text_width, cfg.width
        # the text encoder (a causal Transformer, as CLIP's) whose outputs are the prefix
        self.token_embedding = nn.Embedding(vocab_size, Wt)
        self.text_pos = nn.Parameter(0.01 * torch.randn(cfg.text_ctx, Wt))
        self.text_transformer = clip.Transformer(Wt, cfg.text_layers, cfg.text_heads)
        self.text_ln = nn.LayerNorm(Wt)
        self.text_proj = nn.Linear(Wt, W)
        # the latent decoder
        self.z_t_proj = nn.Linear(embed_dim, W)
        self.dot_embedding = nn.Embedding(cfg.buckets, W)
        self.code_embedding = nn.Embedding(cfg.buckets, W)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.text_ctx + K + 1, W))
        self.transformer = clip.Transformer(W, cfg.layers, cfg.heads)
        self.ln_final = nn.LayerNorm(W)
        self.head = nn.Linear(W, cfg.buckets)
        for emb in (self.token_embedding, self.dot_embedding, self.code_embedding):
            nn.init.normal_(emb.weight, std=0.02)
        # fitted by `fit`: the PCA and the bucket ranges
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("components", torch.eye(embed_dim)[:K].clone())  # (K, D)
        self.register_buffer("eigenvalues", torch.ones(K))
        self.register_buffer("code_lo", -torch.ones(K))
        self.register_buffer("code_hi", torch.ones(K))
        self.register_buffer("dot_lo", -torch.ones(()))
        self.register_buffer("dot_hi", torch.ones(()))

    # PCA and quantisation

    @torch.no_grad()
    def fit(self, z_i, z_t):
        """Fits the PCA of z_i (N, D) and the bucket ranges of its components and of z_i . z_t.

        PCA: C = (Z - mu)^T (Z - mu) / (N - 1) = V diag(lambda) V^T; the components are the
        eigenvectors of the K largest eigenvalues, in decreasing order (section 2.2), each signed so
        that its largest entry is positive (the sign of an eigenvector is arbitrary).
        """
        z_i = z_i.double()
        mu = z_i.mean(0)
        cov = (z_i - mu).T @ (z_i - mu) / max(1, len(z_i) - 1)  # (D, D)
        lam, V = torch.linalg.eigh(cov)  # ascending
        order = lam.argsort(descending=True)[:self.cfg.components]
        comps = V[:, order].T  # (K, D)
        sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * sign
        self.mean.copy_(mu.float())
        self.components.copy_(comps.float())
        self.eigenvalues.copy_(lam[order].clamp(min=0).float())
        y = self.project(z_i.float())  # (N, K)
        pad = 0.05 * (y.max(0).values - y.min(0).values) + 1e-6  # room for test embeddings
        self.code_lo.copy_(y.min(0).values - pad)
        self.code_hi.copy_(y.max(0).values + pad)
        dot = (z_i.float() * z_t.float()).sum(-1)
        dpad = 0.05 * (dot.max() - dot.min()) + 1e-6
        self.dot_lo.copy_(dot.min() - dpad)
        self.dot_hi.copy_(dot.max() + dpad)

    def project(self, z):
        """z (N, D) -> PCA coordinates y = (z - mu) V_K^T, (N, K)."""
        return (z - self.mean) @ self.components.T  # (N, K)

    def unproject(self, y):
        """PCA coordinates (N, K) -> z = mu + y V_K, (N, D) (not renormalised)."""
        return self.mean + y @ self.components  # (N, D)

    def quantize(self, y, lo, hi):
        """Values -> bucket index in 0..buckets-1 of `buckets` equal bins between lo and hi."""
        n = self.cfg.buckets
        return ((y - lo) / (hi - lo) * n).floor().clamp(0, n - 1).long()

    def dequantize(self, q, lo, hi):
        """Bucket index -> the centre of its bin (round trip error <= half a bin)."""
        return lo + (q.float() + 0.5) * (hi - lo) / self.cfg.buckets

    def encode(self, z_i, z_t):
        """(z_i, z_t) -> (dot token (N,), code tokens (N, K))."""
        codes = self.quantize(self.project(z_i), self.code_lo, self.code_hi)
        dot = self.quantize((z_i * z_t).sum(-1), self.dot_lo, self.dot_hi)
        return dot, codes

    def decode(self, codes):
        """Code tokens (N, K) -> unit-norm z_i (N, D)."""
        return F.normalize(self.unproject(self.dequantize(codes, self.code_lo, self.code_hi)), dim=-1)

    # the network

    def logits(self, text, z_t, dot, codes):
        """text (B, L) ids, z_t (B, D), dot (B,), codes (B, k) with k < K: the first k codes.

        Returns (B, k + 2, buckets): row 0 predicts the dot token (from the output at z_t), row
        j >= 1 predicts code j (from the output at the dot token or code j - 1). With dot None the
        sequence stops at z_t and only row 0 exists.
        """
        h = self.text_ln(self.text_transformer(
            self.token_embedding(text) + self.text_pos[:text.shape[1]], causal=True))  # (B, L, Wt)
        parts = [self.text_proj(h), self.z_t_proj(z_t)[:, None]]  # (B, L, W), (B, 1, W)
        if dot is not None:
            parts.append(self.dot_embedding(dot)[:, None])  # (B, 1, W)
            parts.append(self.code_embedding(codes))  # (B, k, W)
        x = torch.cat(parts, dim=1)  # (B, L + 2 + k, W)
        x = x + self.positional_embedding[:x.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        return self.head(x[:, text.shape[1]:])  # (B, k + 2, buckets)

    def loss(self, text, z_t, z_i, null_text):
        """Cross-entropy of the dot token and the K code tokens given the prefix (section 2.2)."""
        B = z_i.shape[0]
        drop = torch.rand(B, device=z_i.device) < self.cfg.cond_drop
        dot, codes = self.encode(z_i, z_t)
        text = torch.where(drop[:, None], null_text.expand_as(text), text)
        z_t = z_t * (~drop)[:, None].to(z_t.dtype)
        logits = self.logits(text, z_t, dot, codes[:, :-1])  # (B, K + 1, buckets)
        target = torch.cat([dot[:, None], codes], dim=1)  # (B, K + 1)
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())

    @torch.no_grad()
    def sample(self, text, z_t, temperature=1.0, dot_top_half=True):
        """Draws the dot token (from the top half of its distribution), then the K codes in order.

        "Top half": the buckets above the median of the predicted dot-product distribution
        (section 2.2: "sample the dot product from the top half of the distribution").
        Returns unit-norm z_i, (B, D).
        """
        B = text.shape[0]
        p = self.logits(text, z_t, None, None)[:, 0].float().softmax(-1)  # (B, buckets)
        dot = torch.multinomial(top_half(p) if dot_top_half else p, 1)[:, 0]  # (B,)
        codes = torch.zeros(B, 0, dtype=torch.long, device=text.device)
        for _ in range(self.cfg.components):
            logits = self.logits(text, z_t, dot, codes)[:, -1].float()  # (B, buckets)
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1)  # (B, 1)
            codes = torch.cat([codes, nxt], dim=1)
        return self.decode(codes)


# --- the decoder ---

class Decoder(nn.Module):
    """P(x | z_i, y): GLIDE's text-conditional UNet with z_i as an extra condition (section 2.1).

    z_i is projected and added to the time embedding (the UNet's `cond` input) and projected into
    `context_tokens` extra tokens joined to the text encoder's outputs (the UNet's `context`, which
    every attention layer attends to). Trained with Improved DDPM's learned variance (hybrid loss).
    With `unet.self_condition` (not in the paper; off in every preset) the UNet also reads its own
    previous estimate of x_0 (Chen et al. 2022): on the shapes data it moved shape by a point, for
    a fifth more time a step (docs/results.md).

    The unit-norm z_i enters both projections multiplied by sqrt(D), so that its coordinates have
    unit variance, as the prior's embeddings do (appendix C) and as a linear layer's initialisation
    assumes. The paper does not say how z_i is scaled; this is a reparametrisation of the two
    projections, but it matters in short training: unscaled, the projections start ~sqrt(D) times
    too small, and a tiny decoder trained for 1,500 steps ignored position (14% right, chance is
    11%); scaled, the same run put 91% of shapes in the caption's grid cell.
    """

    def __init__(self, cfg, embed_dim):
        super().__init__()
        u = cfg.unet
        if u.cond_dim != embed_dim:
            raise ValueError(f"unclip: decoder.unet.cond_dim is {u.cond_dim} but the CLIP embedding has "
                             f"{embed_dim} dimensions; set --decoder.unet.cond-dim {embed_dim}")
        check_prediction(cfg.prediction, "decoder")
        width = u.context_dim or u.xf_width
        if width <= 0 or cfg.context_tokens <= 0:
            raise ValueError("unclip: the decoder needs context tokens: set decoder.context_tokens > 0 and "
                             "decoder.unet.xf_width (a text encoder) or decoder.unet.context_dim")
        self.cfg, self.width = cfg, width
        self.unet = guided.UNet(u)
        self.to_tokens = nn.Linear(embed_dim, cfg.context_tokens * width)
        self.diffusion = make_diffusion(u.noise_schedule, u.diffusion_steps, prediction=cfg.prediction,
                                        variance="learned_range" if u.learn_sigma else "fixed_small",
                                        loss="hybrid" if u.learn_sigma else "simple")

    def forward(self, x_t, t, z_i, tokens=None, mask=None, x_self=None):
        """x_t (B, C, H, W), t (B,), z_i (B, D) unit (zeros: no embedding), tokens/mask (B, L) of the
        caption (when the UNet has a text encoder), x_self (B, C, H, W) the previous estimate of x_0
        (unet.self_condition; None: zeros). Returns the UNet's output (B, 2C or C, H, W)."""
        B, D = z_i.shape
        z = z_i.to(x_t.dtype) * math.sqrt(D)  # unit variance per coordinate
        ctx = self.to_tokens(z).view(B, self.cfg.context_tokens, self.width)  # (B, 4, W)
        return self.unet(x_t, t, cond=z, context=ctx, tokens=tokens, mask=mask, x_self=x_self)

    @torch.compiler.disable  # host-side string work: torch.compile would specialise on every caption
    def tokenize(self, captions, device):
        """Captions -> the UNet's (tokens, mask), or (None, None) without a text encoder."""
        if not self.cfg.unet.xf_width:
            return None, None
        tokens, mask = guided.tokenize(list(captions), self.cfg.unet.text_ctx)
        return guided.host_to_device(tokens, device), guided.host_to_device(mask, device)

    def loss(self, x_0, z_i, captions):
        """The hybrid loss (Improved DDPM eq. 16) with the paper's condition dropout (section 2.1):
        z_i set to zero 10% of the time and the caption dropped (empty) 50% of the time."""
        B = x_0.shape[0]
        keep_z = (torch.rand(B, device=x_0.device) >= self.cfg.z_drop).to(z_i.dtype)
        tokens, mask = self.drop_and_tokenize(captions, x_0.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=x_0.device)
        kw = {"z_i": z_i * keep_z[:, None], "tokens": tokens, "mask": mask}
        noise = None
        if self.cfg.unet.self_condition:
            noise = torch.randn_like(x_0)
            kw["x_self"] = self.self_condition(x_0, t, noise, kw)
        terms = self.diffusion.training_losses(self, x_0, t, noise=noise, model_kwargs=kw)
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def self_condition(self, x_0, t, noise, kw, p=0.5):
        """Self-conditioning in training (Chen et al. 2022, arXiv:2208.04202, algorithm 1): for a
        random half of the batch, the model's own estimate x_0_hat(x_t, 0), computed without
        gradients, becomes the x_self input of the trained forward; zeros for the other half.
        At sampling each step gets the previous step's x_0_hat (`sample`)."""
        use = torch.rand(x_0.shape[0], device=x_0.device) < p  # (B,)
        x_self = torch.zeros_like(x_0)
        if use.any():
            x_t = self.diffusion.q_sample(x_0[use], t[use], noise[use])
            sub = {k: None if v is None else v[use] for k, v in kw.items()}
            x_self[use] = self.diffusion.p_mean_variance(self, x_t, t[use], clip_denoised=True,
                                                         model_kwargs=sub)["pred_x_0"].to(x_0.dtype)
        return x_self

    @torch.compiler.disable  # host-side string work, as `tokenize`
    def drop_and_tokenize(self, captions, device):
        """Each caption made empty with probability text_drop (drawn on the host), then tokenized."""
        drop = torch.rand(len(captions)).tolist()
        return self.tokenize(["" if r < self.cfg.text_drop else c for r, c in zip(drop, captions)], device)

    def guided_model(self, z_i, captions, guidance_scale):
        """(model, model_kwargs) for the samplers: classifier-free guidance against the model with
        z_i = 0 and the empty caption (s = 1: no guidance, one forward)."""
        tokens, mask = self.tokenize(captions, z_i.device)
        kw = {"z_i": z_i, "tokens": tokens, "mask": mask}
        if guidance_scale == 1.0:
            return self, kw
        null_tokens, null_mask = self.tokenize([""] * len(z_i), z_i.device)
        uncond = {"z_i": torch.zeros_like(z_i)}
        if tokens is not None:
            uncond.update(tokens=null_tokens, mask=null_mask)
        return guided.ClassifierFreeGuidance(self, guidance_scale, uncond), kw


# --- the upsamplers ---

def gaussian_kernel(sigma, size, device=None):
    """(size,) normalised 1-d Gaussian kernel, made on `device` (no copy from the host)."""
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blur(x, sigma, size):
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; shape kept."""
    k = gaussian_kernel(sigma, size, x.device).to(x.dtype)
    C, p = x.shape[1], size // 2
    x = F.conv2d(F.pad(x, (p, p, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, p, p), mode="reflect"), k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def bsr_degrade(x, generator=None):
    """A BSR-style degradation (Zhang et al. 2021, as used by Rombach et al.) of low-res images
    (B, C, h, w) in [-1, 1]: Gaussian blur of random width, a random down-and-up resampling with a
    random interpolation, and Gaussian noise of random level, in random order, each drawn per call.
    The JPEG step of BSR is left out (it needs an image codec; this file uses torch only)."""
    def u(a, b):
        return a + (b - a) * torch.rand((), generator=generator).item()

    def do_blur(x):
        return blur(x, u(0.2, 1.5), 5)

    def do_resize(x):
        h = x.shape[-1]
        small = max(2, round(h / u(1.0, 2.0)))
        mode = ["bilinear", "bicubic", "area"][int(torch.randint(3, (), generator=generator))]
        y = F.interpolate(x, size=(small, small), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def do_noise(x):
        level = u(0.0, 0.1)  # drawn before the noise, as always: the same stream gives the same image
        noise = torch.randn(x.shape, generator=generator)  # the generator's stream, on the CPU
        return x + level * guided.host_to_device(noise, x.device).to(x.dtype)

    for i in torch.randperm(3, generator=generator).tolist():
        x = (do_blur, do_resize, do_noise)[i](x)
    return x.clamp(-1, 1)


class Upsampler(nn.Module):
    """A diffusion upsampler (section 2.1 and appendix C): an ADM UNet with only convolutions (no
    attention, no text), the low-resolution image upsampled and concatenated with x_t.

    Training corrupts the low-resolution input (conditioning augmentation): a Gaussian blur (kernel
    3, sigma 0.6) for the first stage, a BSR-style degradation for the second; and trains on random
    crops of `crop_fraction` of the target side (the paper: one fourth), which a convolutional
    network can do because it is then applied to the whole image. Sampled with few DDIM steps.
    """

    def __init__(self, cfg):
        super().__init__()
        u = cfg.unet
        if not u.low_res_size:
            raise ValueError("unclip: an upsampler needs unet.low_res_size > 0 (its input side)")
        if u.attention_resolutions or u.xf_width or u.cond_dim:
            raise ValueError("unclip: the upsamplers are convolution-only and unconditional (appendix C): "
                             "set attention_resolutions to (), xf_width and cond_dim to 0")
        check_prediction(cfg.prediction, "upsampler")
        if cfg.degradation not in ("blur", "bsr"):
            raise ValueError(f"unclip: unknown degradation {cfg.degradation!r}; use 'blur' or 'bsr'")
        self.cfg = cfg
        self.unet = guided.UNet(u)
        # ADM's middle block always holds an attention layer; the paper's upsamplers use none
        self.unet.middle_block[1] = nn.Identity()
        self.diffusion = make_diffusion(u.noise_schedule, u.diffusion_steps, prediction=cfg.prediction,
                                        variance="learned_range" if u.learn_sigma else "fixed_small",
                                        loss="hybrid" if u.learn_sigma else "simple")

    def forward(self, x_t, t, low_res):
        return self.unet(x_t, t, low_res=low_res)

    @torch.compiler.disable  # random choices drawn on the host: torch.compile would specialise on each draw
    def degrade(self, lo):
        if self.cfg.degradation == "blur":
            return blur(lo, 0.6, 3)
        return bsr_degrade(lo)

    def loss(self, image):
        """L_simple (or hybrid) on a random crop of the target, given the degraded low-res image."""
        u = self.cfg.unet
        x_0 = resize(image, u.image_size)  # (B, C, S, S)
        low = resize(self.degrade(resize(x_0, u.low_res_size)), u.image_size)  # (B, C, S, S)
        step = 2 ** (len(u.channel_mult) - 1)  # the crop must survive the UNet's downsampling
        c = max(step, round(u.image_size * self.cfg.crop_fraction / step) * step)
        if c < u.image_size:
            i, j = torch.randint(0, u.image_size - c + 1, (2,)).tolist()
            x_0, low = x_0[..., i:i + c, j:j + c], low[..., i:i + c, j:j + c]  # (B, C, c, c)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_0.shape[0],), device=x_0.device)
        terms = self.diffusion.training_losses(self, x_0, t, model_kwargs={"low_res": low})
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def sample(self, low_res, steps=None, eta=0.0):
        """DDIM (eta = 0 by default) at the full target size from a clean low-res image."""
        u = self.cfg.unet
        B, C = low_res.shape[:2]
        return self.diffusion.sample(self, (B, C, u.image_size, u.image_size), steps=steps or self.cfg.sample_steps,
                                     eta=eta, model_kwargs={"low_res": low_res}, device=low_res.device)


# --- the model ---

class UnCLIP(nn.Module):
    """CLIP, a prior, a decoder and two upsamplers, trained in that order as phases (section 2).

    Sampling: caption -> z_t (CLIP) -> z_i (prior) -> 64x64 image (decoder) -> 256 -> 1024
    (upsamplers), at the sizes of the config. Also image variations, interpolations and text diffs
    (section 3).
    """

    phases = ("clip", "prior", "decoder", "upsampler1", "upsampler2")
    # the upsamplers see only images (section 2.1), so they need none of the phases before them:
    # on a CPU, train.py trains them in a second process while CLIP trains (train.thread_shares)
    parallel_phases = {"clip": ("upsampler1", "upsampler2")}

    def __init__(self, cfg):
        super().__init__()
        if cfg.prior not in ("diffusion", "ar"):
            raise ValueError(f"unclip: unknown prior {cfg.prior!r}; use --prior diffusion or --prior ar")
        d, u1, u2 = cfg.decoder.unet, cfg.upsampler1.unet, cfg.upsampler2.unet
        if u1.low_res_size != d.image_size or u2.low_res_size != u1.image_size or u2.image_size != cfg.image_size:
            raise ValueError(f"unclip: the sizes do not chain: decoder {d.image_size}, upsampler1 "
                             f"{u1.low_res_size} -> {u1.image_size}, upsampler2 {u2.low_res_size} -> "
                             f"{u2.image_size}, image_size {cfg.image_size}")
        self.cfg = self.config = cfg
        D, V = cfg.clip.embed_dim, cfg.clip.vocab_size
        self.clip = clip.CLIP(cfg.clip)
        if cfg.prior == "diffusion":
            self.prior = DiffusionPrior(cfg.diffusion_prior, D, V)
        else:
            self.prior = ARPrior(cfg.ar_prior, D, V)
        self.decoder = Decoder(cfg.decoder, D)
        self.upsampler1 = Upsampler(cfg.upsampler1)
        self.upsampler2 = Upsampler(cfg.upsampler2)

    @staticmethod
    def extra_image_sizes(cfg, phase):
        """Sides at which the data sets of data.py also give each image of a phase's batches (key
        `image_{S}`): the decoder's, for the decoder. Its training targets are then made from the
        source at its side (for the shapes: drawn there, with hard edges) rather than shrunk from
        `image` with antialiasing, whose soft edges the small decoder learns to draw as rounded
        corners (see `loss`). No other phase needs one, and rendering costs time."""
        return (cfg.decoder.unet.image_size,) if phase == "decoder" else ()

    def phase_module(self, phase):
        if phase not in self.phases:
            raise ValueError(f"unclip: unknown phase {phase!r}; phases are {', '.join(self.phases)}")
        return getattr(self, phase)

    @property
    def device(self):
        return self.clip.logit_scale.device

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the parameters; each part's float64 schedule tables follow them, so a
        # training step gathers from tables on its own device instead of copying them from the host
        # (a meta model, for counting parameters, keeps them on the CPU)
        out = super()._apply(fn, *args, **kwargs)
        device = self.device
        if device.type != "meta":
            for part in (self.prior, self.decoder, self.upsampler1, self.upsampler2):
                if isinstance(getattr(part, "diffusion", None), ddpm.GaussianDiffusion):
                    part.diffusion.to(device)
        return out

    # embeddings

    @torch.no_grad()
    def embed_image(self, image):
        """(B, C, H, W) in [-1, 1], any size -> unit-norm z_i (B, D), with the (frozen) CLIP."""
        return F.normalize(self.clip.encode_image(resize(image, self.cfg.clip.image_size)).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions):
        """Captions -> unit-norm z_t (B, D)."""
        tokens = self.clip.tokenize(captions, truncate=True, trim=True)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    @torch.compiler.disable  # host-side string work: torch.compile would specialise on every caption
    def prior_text(self, captions):
        """Captions -> the prior's caption tokens (B, text_ctx), CLIP's tokenizer."""
        ctx = self.prior.cfg.text_ctx
        return guided.host_to_device(clip.tokenize(list(captions), ctx, self.clip.tokenizer, truncate=True), self.device)

    # training

    def loss(self, batch, phase):
        image, captions = batch["image"], batch["caption"]
        if phase == "clip":
            return self.clip.loss({**batch, "image": resize(image, self.cfg.clip.image_size)})
        if phase == "prior":
            z_i, z_t = self.embed_image(image), self.embed_text(captions)
            null = self.prior_text([""])
            loss = self.prior.loss(self.prior_text(captions), z_t, z_i, null)
            return {"loss": loss}
        if phase == "decoder":
            # the target at the decoder's side: the data set's own rendering when the batch has one
            # (`extra_image_sizes`), else `image` shrunk. On the shapes, the 32 x 32 decoder trained
            # on hard-edged renders draws the caption's shape 47% of the time against 41% with
            # shrunk renders at 1500 steps, and 69% against 56% at 3000 (pixel judge, true z_i)
            S = self.cfg.decoder.unet.image_size
            x_0 = batch.get(f"image_{S}")
            if x_0 is None:
                x_0 = resize(image, S)
            return self.decoder.loss(x_0, self.embed_image(image), captions)
        return self.phase_module(phase).loss(image)

    @torch.no_grad()
    def prepare(self, phase, batches):
        """Before the AR prior trains: fit its PCA and bucket ranges on training embeddings."""
        if phase != "prior" or not isinstance(self.prior, ARPrior):
            return
        z_i, z_t = [], []
        for b in batches:
            z_i.append(self.embed_image(b["image"]))
            z_t.append(self.embed_text(b["caption"]))
        self.prior.fit(torch.cat(z_i), torch.cat(z_t))

    # sampling

    def _captions(self, n, prompt):
        if prompt is None:
            return [""] * n  # the null caption: the models' unconditional branch
        captions = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(captions) != n:
            raise ValueError(f"unclip: {len(captions)} prompts for {n} images; give one prompt or n of them")
        return captions

    @torch.no_grad()
    def sample_prior(self, captions, prior_guidance_scale=1.0, prior_steps=None, temperature=1.0):
        """Captions -> z_i ~ P(z_i | y), unit norm (B, D)."""
        z_t = self.embed_text(captions)
        empty = [c == "" for c in captions]
        z_t = z_t * torch.tensor([not e for e in empty], device=z_t.device, dtype=z_t.dtype)[:, None]
        text = self.prior_text(captions)
        if isinstance(self.prior, ARPrior):
            return self.prior.sample(text, z_t, temperature=temperature)
        return self.prior.sample(text, z_t, self.prior_text([""]), prior_guidance_scale, prior_steps)

    @torch.no_grad()
    def decode(self, z_i, captions, steps=None, eta=None, guidance_scale=3.0, noise=None, upsample=True,
               upsample_steps=None):
        """z_i (B, D) -> images: the decoder (ancestral sampling with the learned variance, or DDIM
        with `eta`), then both upsamplers. `noise` fixes the decoder's x_T."""
        dec = self.decoder
        S = self.cfg.decoder.unet.image_size
        model, kw = dec.guided_model(z_i, captions, guidance_scale)
        for out in dec.diffusion.sample_steps(model, (len(z_i), self.cfg.in_channels, S, S),
                                              steps=steps or dec.cfg.sample_steps, eta=eta, noise=noise,
                                              model_kwargs=kw, device=z_i.device):
            if dec.cfg.unet.self_condition:  # the next step sees this step's (guided) x_0 estimate
                kw["x_self"] = out["pred_x_0"]
        x = out["sample"]
        if upsample:
            x = self.upsampler1.sample(x, upsample_steps)
            x = self.upsampler2.sample(x, upsample_steps)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n, prompt=None, steps=None, eta=None, guidance_scale=3.0, prior_guidance_scale=1.0,
               prior_steps=None, upsample_steps=None, temperature=1.0):
        """n images for `prompt` (one caption, or a list of n); no prompt: unconditional.

        steps/eta/guidance_scale: the decoder's sampling steps, DDIM eta (None: ancestral) and
        classifier-free guidance scale; prior_*: the prior's; temperature: the AR prior's.
        Returns (n, C, image_size, image_size) in [-1, 1].
        """
        captions = self._captions(n, prompt)
        z_i = self.sample_prior(captions, prior_guidance_scale, prior_steps, temperature)
        return self.decode(z_i, captions, steps, eta, guidance_scale, upsample_steps=upsample_steps)

    @torch.no_grad()
    def reconstruct(self, x, steps=None, guidance_scale=3.0):
        """Images -> z_i -> decoded images (what the CLIP embedding keeps of them)."""
        return self.decode(self.embed_image(x), [""] * len(x), steps, None, guidance_scale)

    @torch.no_grad()
    def ddim_invert(self, x_0, z_i, captions, steps=None):
        """The decoder's x_T for images x_0 by running DDIM (eta = 0) backwards (section 3.3):
        x_{t+1} = sqrt(alpha_bar_{t+1}) x_0_hat + sqrt(1 - alpha_bar_{t+1}) eps_hat, with eps_hat
        the model's noise estimate at x_t. Returns (B, C, S, S) at the decoder's size."""
        dec = self.decoder
        diffusion = dec.diffusion.respace(steps or dec.cfg.sample_steps)
        tokens, mask = dec.tokenize(captions, x_0.device)
        x = resize(x_0, self.cfg.decoder.unet.image_size).float()
        for i in range(diffusion.num_timesteps):
            t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
            p = diffusion.p_mean_variance(dec, x, t, clip_denoised=False,
                                          model_kwargs={"z_i": z_i, "tokens": tokens, "mask": mask})
            eps = p["pred_eps"]
            ab_prev = float(diffusion.alpha_bar_prev[i])
            x_0_hat = (x - math.sqrt(1 - ab_prev) * eps) / math.sqrt(ab_prev)
            ab = float(diffusion.alpha_bar[i])
            x = math.sqrt(ab) * x_0_hat + math.sqrt(1 - ab) * eps
        return x

    def _one_image(self, image):
        return (image[None] if image.dim() == 3 else image[:1]).to(self.device)

    @torch.no_grad()
    def variations(self, image, n, steps=None, eta=1.0, guidance_scale=3.0, upsample_steps=None):
        """Image variations (section 3.1): decode the image's z_i n times with DDIM (eta > 0), so the
        details not kept by the embedding vary. image: (C, H, W) or (1, C, H, W)."""
        z_i = self.embed_image(self._one_image(image)).expand(n, -1)
        return self.decode(z_i, [""] * n, steps, eta, guidance_scale, upsample_steps=upsample_steps)

    @torch.no_grad()
    def interpolate(self, image_a, image_b, n, steps=None, guidance_scale=1.0, upsample_steps=None):
        """Interpolations (section 3.2): z_i_theta = slerp(z_i1, z_i2, theta) for n thetas from 0 to
        1, decoded with DDIM (eta = 0) from x_T = slerp of the endpoints' DDIM-inverted noises."""
        a, b = self._one_image(image_a), self._one_image(image_b)
        z = self.embed_image(torch.cat([a, b]))  # (2, D)
        x_T = self.ddim_invert(torch.cat([a, b]), z, ["", ""], steps)  # (2, C, S, S)
        theta = torch.linspace(0, 1, n, device=z.device)[:, None]  # (n, 1)
        z_theta = slerp(z[:1].expand(n, -1), z[1:].expand(n, -1), theta)  # (n, D)
        flat = x_T.flatten(1)
        norms = flat.norm(dim=1, keepdim=True)  # slerp the directions, interpolate the lengths
        dirs = slerp(F.normalize(flat[:1], dim=-1).expand(n, -1), F.normalize(flat[1:], dim=-1).expand(n, -1), theta)
        noise = (dirs * ((1 - theta) * norms[:1] + theta * norms[1:])).view(n, *x_T.shape[1:])
        return self.decode(z_theta, [""] * n, steps, 0.0, guidance_scale, noise=noise, upsample_steps=upsample_steps)

    @torch.no_grad()
    def text_diff(self, image, source, target, n, max_theta=0.5, steps=None, guidance_scale=1.0,
                  upsample_steps=None):
        """Text diffs (section 3.3): z_d = normalize(z_t - z_t0) for the target caption z_t and the
        current one z_t0; z_theta = slerp(z_i, z_d, theta) for n thetas from 0 to `max_theta`
        (the paper shows up to 0.5), decoded with DDIM from the image's inverted x_T."""
        x = self._one_image(image)
        z_i = self.embed_image(x)  # (1, D)
        z_t = self.embed_text([target, source])  # (2, D)
        z_d = F.normalize(z_t[:1] - z_t[1:], dim=-1)  # (1, D)
        x_T = self.ddim_invert(x, z_i, [""], steps)  # (1, C, S, S)
        theta = torch.linspace(0, max_theta, n, device=z_i.device)[:, None]
        z_theta = slerp(z_i.expand(n, -1), z_d.expand(n, -1), theta)  # (n, D)
        return self.decode(z_theta, [""] * n, steps, 0.0, guidance_scale, noise=x_T.expand(n, -1, -1, -1),
                           upsample_steps=upsample_steps)

    # evaluation

    @torch.no_grad()
    def evaluate(self, batch, prior_guidance_scale=1.0, prior_steps=None):
        """Per-batch figures of the embedding stages: CLIP's image -> caption top-1 retrieval among
        the batch's distinct captions, and the cosine similarity of prior samples with the true z_i."""
        image, captions = batch["image"], batch["caption"]
        z_i = self.embed_image(image)
        z_hat = self.sample_prior(captions, prior_guidance_scale, prior_steps)
        return {"clip_retrieval_top1": self.clip.retrieval_accuracy(resize(image, self.cfg.clip.image_size), captions),
                "prior_cosine": (z_hat * z_i).sum(-1).mean(),
                "caption_cosine": (self.embed_text(captions) * z_i).sum(-1).mean()}
