"""DALL-E: Zero-Shot Text-to-Image Generation (Ramesh et al. 2021, arXiv:2102.12092).

Two stages, one ELB (paper eq. 1):

    ln p(x, y) >= E_{z ~ q_phi(z | x)} [ ln p_theta(x | y, z) - beta * KL(q_phi(y, z | x) || p_psi(y, z)) ]

1. Stage one (phase "dvae", section 2.1, appendix A): a discrete VAE. The encoder gives K logits
   at each cell of an (H/f, W/f) grid; q_phi is the categorical they define. Training relaxes the
   categorical with the Gumbel-softmax at temperature tau (annealed 1 -> 1/16), uses the uniform
   prior over the K codes (KL weight beta ramped 0 -> 6.6), and the logit-Laplace likelihood for
   the pixels (appendix A.3; the tiny preset uses a logit-normal, see below). Layout as in the authors' release (openai/DALL-E dall_e/encoder.py,
   decoder.py): bottleneck resblocks scaled by 1 / n_layers^2, a 7x7 input conv, max-pooling in the
   encoder, nearest upsampling in the decoder, 1x1 convs next to the relaxation.
2. Stage two (phase "transformer", section 2.2, appendix B.1): a decoder-only Transformer p_psi over
   one stream [start-of-text, caption tokens, per-position padding tokens, start-of-image, image
   tokens]. Image tokens are the argmax of the frozen encoder's logits. Image inputs get a row and a
   column embedding; the text and image cross-entropies are each averaged over their own tokens and
   weighted 1/8 and 7/8.

Sampling draws captions (or takes a prompt) and then image tokens, with temperature, top-k and
nucleus (top-p) filtering, and can rerank `candidates` samples per caption with any scorer
`rerank(images, captions) -> scores`; sample.py builds it from a CLIP checkpoint (section 2.5's
contrastive reranking). This file does not import clip.py.

Deviations from the paper (said here once, and again where they happen):
- Attention is dense and causal. The paper's sparse row / column / convolutional masks over the
  image part (appendix B.1) are not implemented: on 64 tiny image tokens they save nothing and
  the dense mask lets every token see more, not less.
- Text is byte-level (UTF-8 bytes of the lowercased caption, ids 0..255) with no vocabulary file,
  instead of the paper's BPE with 16384 tokens and 10% BPE dropout. `text_vocab_size` keeps the
  paper's 16384 in the `dalle-12b` preset so the parameter count is right; bytes use the first 256.
- The pixel likelihood of the `dalle-12b` preset is the paper's logit-Laplace integrated over each
  8-bit value's bin (as PixelCNN++ discretizes its logistic), not its density: on the shapes data,
  whose flat colours a decoder can match exactly, the density lets b -> 0 and the loss run to
  -infinity. The discretized version is a probability (a code length, >= 0).
- The `tiny` preset uses the logit-normal instead (the same phi, logit and sigmoid readout, with a
  Gaussian of fixed sigma in place of the Laplace; `pixel_likelihood`). On the shapes data, where
  about 94% of the pixels are black, every logit-Laplace variant we tried (the density, the
  discretized one, a floor on b, a fixed b) trained a dVAE whose reconstructions were black: the
  Laplace's location is a median, so a pixel stays black until the codes make its colour more
  likely than black there, and until then the encoder gets no pull toward carrying colour; a learned
  b adds a second way out (a broad b where a shape may be; the discretized version's edge bins,
  which own all the mass beyond 0 and 255, make that hedge cheap). The Gaussian's location is a
  mean, which moves toward a colour as soon as the colour is possible, so the codes pick up colour
  within a few hundred steps (the default run: the colour of every one of 200 test images right
  from the argmax tokens). Its sigma is fixed: a learned per-pixel scale is what let the
  logit-Laplace hedge, and we did not try a learned sigma.
- Transformer blocks are pre-LayerNorm GPT-2 blocks (GELU MLP of width 4d, init N(0, 0.02), residual
  projections scaled by 1/sqrt(2 * n_layer)); the paper does not publish its block or init.
- Schedules run on the fraction of the phase done (set_progress) so short runs keep their shape;
  the `dalle-12b` preset uses the paper's 5000 / 3M (beta) and 150000 / 3M (tau) fractions.

Glossary (paper -> code):
    x            image, in [-1, 1] at the interface; x01 in [0, 1]; x_mapped = phi(x01) in (eps, 1-eps)
    phi          map_pixels: x -> (1 - 2 eps) x + eps, eps = 0.1 (appendix A.3)
    q_phi(z|x)   softmax of encoder logits, `logits` (B, K, h, w)
    K            image_vocab_size (8192 in the paper)
    tau          Gumbel-softmax temperature, self.tau
    beta         KL weight, self.beta
    y            relaxed one-hot sample, `y_soft` (B, K, h, w); also the caption, `text`
    mu, ln_b     logit-Laplace location and log-scale, decoder output (B, 2C, H, W)
    sigma        logit-normal scale (fixed), logit_normal_sigma; the logit-normal uses mu, not ln_b
    z            image tokens (B, h * w), argmax of the encoder logits
    p_psi        the Transformer, DALLETransformer
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- config ---


@dataclass
class DALLEConfig:
    image_size: int = 32  # H = W of the images (256 in the paper)
    in_channels: int = 3  # C
    # dVAE (appendix A.1, openai/DALL-E dall_e/encoder.py and decoder.py)
    image_vocab_size: int = 512  # K, codebook size (8192 in the paper)
    n_hid: int = 32  # width of the first encoder group; groups use 1, 2, 4, 8 x n_hid (256)
    n_init: int = 64  # width after the decoder's input 1x1 conv (128)
    group_count: int = 3  # resolution groups; the grid is image_size / 2^(group_count - 1) (4)
    n_blk_per_group: int = 1  # bottleneck resblocks per group (2)
    logit_laplace_eps: float = 0.1  # eps of phi (appendix A.3)
    # pixel likelihood: "logit-laplace" (appendix A.3, learned scale b) or "logit-normal" (fixed sigma;
    # see the module docstring and the tiny preset)
    pixel_likelihood: str = "logit-laplace"
    logit_normal_sigma: float = 0.4  # sigma of the logit-normal, in logit units
    beta_max: float = 6.6  # final KL weight (section 2.1; see the tiny preset)
    beta_ramp: float = 0.1  # fraction of the dVAE phase over which beta rises 0 -> beta_max (5000/3M)
    tau_start: float = 1.0  # initial Gumbel-softmax temperature
    tau_end: float = 1.0 / 16  # final temperature (section 2.1)
    tau_anneal: float = 0.5  # fraction of the dVAE phase over which tau falls (150000/3M)
    # Transformer (section 2.2, appendix B.1)
    text_vocab_size: int = 256  # caption token vocabulary; bytes use ids 0..255 (16384 BPE in the paper)
    text_len: int = 48  # text positions including start-of-text (256 in the paper)
    n_layer: int = 4  # Transformer blocks (64)
    n_head: int = 4  # attention heads (62)
    d_model: int = 128  # width (3968 = 62 x 64)
    text_loss_weight: float = 1.0 / 8  # weight of the text cross-entropy; images get 1 - it (7/8)


PRESETS: dict[str, DALLEConfig] = {
    # CPU, minutes: 32x32 shapes, an 8x8 grid of 512 codes, a 4-layer Transformer (0.27M dVAE +
    # 1.0M Transformer params). The loss is divided by C H W, so beta weighs each grid cell's KL
    # against the C H W / hw pixel values it covers: 192 in the paper, 48 here. beta = 6.6 * 48 / 192
    # keeps the paper's balance per cell (with 6.6, our short tiny runs collapsed to the uniform
    # prior). The pixel likelihood is the logit-normal (sigma 0.4), not the logit-Laplace, which left
    # this dVAE black (module docstring). tau falls over the first 30% of the phase rather than the
    # paper's 5% (150k of 3M updates), so the encoder gets a couple of hundred steps, not a few
    # dozen, at the warm end of the relaxation; 30% is the value we tried, not a tuned one.
    "tiny": DALLEConfig(beta_max=6.6 * 48 / 192, pixel_likelihood="logit-normal", tau_anneal=0.3),
    # Paper: 256x256 images, 32x32 grid of 8192 codes (appendix A.1); 64 layers, 62 heads,
    # d_model 3968, 256 text tokens of a 16384 vocabulary (appendix B.1). The Transformer has
    # 12.29e9 parameters (paper: "12-billion"), the dVAE 98e6.
    "dalle-12b": DALLEConfig(
        image_size=256,
        image_vocab_size=8192,
        n_hid=256,
        n_init=128,
        group_count=4,
        n_blk_per_group=2,
        beta_ramp=5000 / 3_000_000,
        tau_anneal=150_000 / 3_000_000,
        text_vocab_size=16384,
        text_len=256,
        n_layer=64,
        n_head=62,
        d_model=3968,
    ),
}


# --- helpers ---


def cosine_ramp(frac: float, start: float, end: float) -> float:
    """Half-cosine from `start` (frac 0) to `end` (frac >= 1), the paper's "cosine schedule"."""
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def map_pixels(x01: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(x) = (1 - 2 eps) x + eps: [0, 1] -> [eps, 1 - eps] (appendix A.3), away from logit's poles."""
    return (1 - 2 * eps) * x01 + eps


def unmap_pixels(x_mapped: torch.Tensor, eps: float) -> torch.Tensor:
    """phi^{-1}, clamped to [0, 1]."""
    return ((x_mapped - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x_mapped: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """-ln f(x | mu, b) of the logit-Laplace density (appendix A.3), elementwise, in nats.

    f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b), x in (0, 1): the density of
    sigmoid(L) for L ~ Laplace(mu, b). All inputs (B, C, H, W).
    """
    x, mu, ln_b = x_mapped.float(), mu.float(), ln_b.float()
    return (
        math.log(2.0) + ln_b + torch.log(x * (1 - x)) + (torch.logit(x) - mu).abs() * torch.exp(-ln_b)
    )


def discretized_logit_laplace_nll(x01: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor, eps: float) -> torch.Tensor:
    """-ln P(pixel value) under the logit-Laplace of appendix A.3 integrated over the value's 8-bit bin.

    Pixel value k / 255 owns the bin [(k - 1/2) / 255, (k + 1/2) / 255], mapped by phi and logit to
    [t_lo, t_hi]; P = F(t_hi) - F(t_lo) with the Laplace CDF F(t) = 1/2 exp((t - mu) / b) below mu,
    1 - 1/2 exp(-(t - mu) / b) above. The bins of 0 and 255 reach to -inf and +inf, so the 256
    probabilities sum to 1. (The paper uses the density f itself; see the module docstring.)
    x01 (B, C, H, W) in [0, 1]; mu, ln_b (B, C, H, W); result in nats, elementwise, computed in fp32.
    """
    mu, b = mu.float(), torch.exp(ln_b.float())
    k = (x01.float() * 255).round()

    def edge(v):  # pixel value -> logit of phi(value)
        return torch.logit(map_pixels(v.clamp(0, 1), eps))

    # +-1e3 stands for +-inf: far past any mu, and finite, so no inf reaches a gradient
    t_lo = torch.where(k <= 0, torch.full_like(k, -1e3), edge((k - 0.5) / 255))
    t_hi = torch.where(k >= 255, torch.full_like(k, 1e3), edge((k + 0.5) / 255))
    z_lo, z_hi = (t_lo - mu) / b, (t_hi - mu) / b
    # log(1 - exp(z_lo - z_hi)) is shared by the two one-sided cases
    log_gap = torch.log((-torch.expm1(z_lo - z_hi)).clamp(min=1e-30))
    below = math.log(0.5) + z_hi + log_gap  # whole bin below mu
    above = math.log(0.5) - z_lo + log_gap  # whole bin above mu
    inside = torch.log((1 - 0.5 * torch.exp(z_lo.clamp(max=0)) - 0.5 * torch.exp(-z_hi.clamp(min=0))).clamp(min=1e-30))
    return -torch.where(z_hi <= 0, below, torch.where(z_lo >= 0, above, inside))


def logit_normal_nll(x_mapped: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """-ln f(x | mu, sigma) of the logit-normal density, elementwise, in nats: the logit-Laplace of
    appendix A.3 with the Laplace replaced by a Gaussian of fixed scale.

    f(x | mu, sigma) = 1 / (sigma sqrt(2 pi) x (1 - x)) * exp(-(logit(x) - mu)^2 / (2 sigma^2)), x in (0, 1):
    the density of sigmoid(L) for L ~ N(mu, sigma^2). x_mapped, mu (B, C, H, W).
    """
    x, mu = x_mapped.float(), mu.float()
    return (
        0.5 * math.log(2 * math.pi) + math.log(sigma) + torch.log(x * (1 - x))
        + (torch.logit(x) - mu) ** 2 / (2 * sigma**2)
    )


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then nucleus (Holtzman et al. 2019) filtering: tokens outside get -inf. (B, V) -> (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Conv2d(nn.Conv2d):
    """'Same' convolution with the release's init: w ~ N(0, 1 / (n_in * kw^2)), b = 0."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__(n_in, n_out, kw, padding=(kw - 1) // 2)
        if not self.weight.is_meta:  # meta tensors hold no values (and init on them is slow)
            nn.init.normal_(self.weight, std=1 / math.sqrt(n_in * kw**2))
            nn.init.zeros_(self.bias)


# Copied from guided.host_to_device
def host_to_device(t, device):
    """A tensor made on the CPU (token ids, targets) -> `device` without stalling the host: on CUDA
    through pinned memory with an asynchronous copy, since a copy from pageable memory first waits
    for the GPU to finish its queue (a host-device synchronisation in every training step)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --- dVAE blocks (appendix A.1) ---


class EncoderBlock(nn.Module):
    """Bottleneck resblock: id(x) + post_gain * (relu, 3x3, relu, 3x3, relu, 3x3, relu, 1x1)(x).

    post_gain = 1 / n_layers^2 is the "small constant" on outgoing activations (section 2.1).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), Conv2d(n_in, n_hid, 3),
            nn.ReLU(), Conv2d(n_hid, n_hid, 3),
            nn.ReLU(), Conv2d(n_hid, n_hid, 3),
            nn.ReLU(), Conv2d(n_hid, n_out, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(EncoderBlock):
    """As EncoderBlock, but the bottleneck is (1x1, 3x3, 3x3, 3x3), as in the release's decoder."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers)
        n_hid = n_out // 4
        self.res_path = nn.Sequential(
            nn.ReLU(), Conv2d(n_in, n_hid, 1),
            nn.ReLU(), Conv2d(n_hid, n_hid, 3),
            nn.ReLU(), Conv2d(n_hid, n_hid, 3),
            nn.ReLU(), Conv2d(n_hid, n_out, 3),
        )  # fmt: skip


class Encoder(nn.Module):
    """x_mapped (B, C, H, W) -> logits of q_phi (B, K, H/f, W/f), f = 2^(group_count - 1).

    7x7 input conv; groups of widths n_hid * (1, 2, 4, 8, ...) with a 2x max-pool after every group
    but the last; relu and a 1x1 conv to the K logits.
    """

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in range(cfg.group_count)]
        layers: list[nn.Module] = [Conv2d(cfg.in_channels, cfg.n_hid, 7)]
        n_in = cfg.n_hid
        for g, width in enumerate(widths):
            for _ in range(cfg.n_blk_per_group):
                layers.append(EncoderBlock(n_in, width, n_layers))
                n_in = width
            if g < cfg.group_count - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), Conv2d(n_in, cfg.image_vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x_mapped: torch.Tensor) -> torch.Tensor:
        return self.blocks(x_mapped)


class Decoder(nn.Module):
    """y (B, K, h, w) one-hot or relaxed -> (mu, ln_b), each (B, C, h*f, w*f).

    1x1 input conv; groups of widths n_hid * (.., 4, 2, 1) with 2x nearest upsampling after every
    group but the last; relu and a 1x1 conv to 2C maps: C for mu, C for ln b (appendix A.3).
    """

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in reversed(range(cfg.group_count))]
        layers: list[nn.Module] = [Conv2d(cfg.image_vocab_size, cfg.n_init, 1)]
        n_in = cfg.n_init
        for g, width in enumerate(widths):
            for _ in range(cfg.n_blk_per_group):
                layers.append(DecoderBlock(n_in, width, n_layers))
                n_in = width
            if g < cfg.group_count - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), Conv2d(n_in, 2 * cfg.in_channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, ln_b = self.blocks(y).chunk(2, dim=1)  # (B, C, H, W) each
        return mu, ln_b


class DiscreteVAE(nn.Module):
    """Encoder q_phi and decoder p_theta of stage one; the phase module of phase "dvae"."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def pixel_nll(self, x01: torch.Tensor, mu: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
        """-ln p_theta(x | y) per pixel value, in nats: the config's pixel_likelihood. All (B, C, H, W)."""
        eps = self.cfg.logit_laplace_eps
        if self.cfg.pixel_likelihood == "logit-normal":  # the decoder's ln_b maps go unused
            return logit_normal_nll(map_pixels(x01.float(), eps), mu, self.cfg.logit_normal_sigma)
        return discretized_logit_laplace_nll(x01, mu, ln_b, eps)

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> z (B, h * w): argmax of the logits, no Gumbel noise (section 2.2)."""
        x_mapped = map_pixels((x.float() + 1) / 2, self.cfg.logit_laplace_eps)
        return self.encoder(x_mapped).argmax(dim=1).flatten(1)  # (B, h * w)

    def decode_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, h * w) -> image (B, C, H, W) in [-1, 1]: x_hat = phi^{-1}(sigmoid(mu)) (appendix A.3)."""
        grid = self.cfg.image_size // 2 ** (self.cfg.group_count - 1)
        y = F.one_hot(z.view(-1, grid, grid), self.cfg.image_vocab_size)  # (B, h, w, K)
        mu, _ = self.decoder(y.permute(0, 3, 1, 2).float())  # (B, C, H, W)
        x01 = unmap_pixels(torch.sigmoid(mu.float()), self.cfg.logit_laplace_eps)
        return x01 * 2 - 1


# --- Transformer blocks (appendix B.1, dense attention) ---


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional key/value cache for sampling."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). With `cache`, x continues the cached sequence and is appended."""
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        # (B, nh, T, hs) each
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, nh, T_past + T, hs)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        T_k = k.shape[2]
        if T == T_k:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # query i sits at position T_k - T + i and sees keys up to it
            mask = torch.ones(T, T_k, dtype=torch.bool, device=x.device).tril(T_k - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.c_proj(y)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class DALLETransformer(nn.Module):
    """p_psi(y, z): decoder-only Transformer over [text stream (text_len), image stream (h * w)].

    Text stream ids (appendix B.1, fig. 10): 0..text_vocab_size-1 are caption tokens,
    text_vocab_size + j is the learned padding token of text position j, and the last id is
    start-of-text. Image stream ids: 0..K-1 are codes, K is start-of-image. The image input at
    position k is [start-of-image, z_0, ..., z_{N-2}][k] and carries the row and column embedding
    of grid cell k, the cell whose token it predicts.
    """

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // 2 ** (cfg.group_count - 1)
        d = cfg.d_model
        self.pad_id = cfg.text_vocab_size  # + j for position j
        self.sot_id = cfg.text_vocab_size + cfg.text_len
        self.soi_id = cfg.image_vocab_size
        self.text_emb = nn.Embedding(cfg.text_vocab_size + cfg.text_len + 1, d)
        self.text_pos_emb = nn.Embedding(cfg.text_len, d)
        self.image_emb = nn.Embedding(cfg.image_vocab_size + 1, d)
        self.row_emb = nn.Embedding(self.grid, d)
        self.col_emb = nn.Embedding(self.grid, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        # the next text token is a caption token or a padding token, never start-of-text
        self.to_text_logits = nn.Linear(d, cfg.text_vocab_size + cfg.text_len)
        self.to_image_logits = nn.Linear(d, cfg.image_vocab_size)
        if not self.ln_f.weight.is_meta:  # meta tensors hold no values (and init on them is slow)
            self.init_weights()

    def init_weights(self) -> None:
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed_text(self, text: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Text-stream ids (B, T) at positions start..start+T-1 -> (B, T, d)."""
        pos = torch.arange(start, start + text.shape[1], device=text.device)
        return self.text_emb(text) + self.text_pos_emb(pos)

    def embed_image(self, image_in: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image-stream inputs (B, T) at cells start..start+T-1 -> (B, T, d), plus row and column embeddings."""
        cell = torch.arange(start, start + image_in.shape[1], device=image_in.device)
        return self.image_emb(image_in) + self.row_emb(cell // self.grid) + self.col_emb(cell % self.grid)

    def run(self, x: torch.Tensor, caches: list[dict] | None = None) -> torch.Tensor:
        """Embedded inputs (B, T, d) -> final hidden states (B, T, d)."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def forward(self, text: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, text_len), z (B, N) -> text logits (B, text_len - 1, V_text), image logits (B, N, K).

        Text logits at position j predict text[:, j + 1]; image logits at cell k predict z[:, k].
        """
        soi = torch.full_like(z[:, :1], self.soi_id)
        image_in = torch.cat([soi, z[:, :-1]], dim=1)  # (B, N)
        x = torch.cat([self.embed_text(text), self.embed_image(image_in)], dim=1)  # (B, text_len + N, d)
        h = self.run(x)
        T = self.cfg.text_len
        return self.to_text_logits(h[:, : T - 1]), self.to_image_logits(h[:, T:])


# --- the model ---


class DALLE(nn.Module):
    """DALL-E: the dVAE (phase "dvae") and the Transformer prior over text and image tokens ("transformer")."""

    phases = ("dvae", "transformer")

    def __init__(self, config: DALLEConfig):
        super().__init__()
        cfg = config
        if cfg.text_vocab_size < 256:
            raise ValueError(f"text_vocab_size must be at least 256 for byte tokens, got {cfg.text_vocab_size}")
        if cfg.image_size % 2 ** (cfg.group_count - 1):
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^(group_count - 1)")
        if cfg.pixel_likelihood not in ("logit-laplace", "logit-normal"):
            raise ValueError(f"pixel_likelihood must be 'logit-laplace' or 'logit-normal', got {cfg.pixel_likelihood!r}")
        if cfg.logit_normal_sigma <= 0:
            raise ValueError(f"logit_normal_sigma must be positive, got {cfg.logit_normal_sigma}")
        if cfg.n_hid % 4 or cfg.n_hid < 4:
            raise ValueError(f"n_hid must be a positive multiple of 4 (bottleneck width n_hid / 4), got {cfg.n_hid}")
        self.config = cfg
        self.dvae = DiscreteVAE(cfg)
        self.transformer = DALLETransformer(cfg)
        self.grid = self.transformer.grid
        # schedules, set by set_progress; plain floats, nothing to checkpoint
        self.tau = cfg.tau_start
        self.beta = 0.0

    def phase_module(self, phase: str) -> nn.Module:
        if phase == "dvae":
            return self.dvae
        if phase == "transformer":
            return self.transformer
        raise ValueError(f"unknown phase {phase!r}; DALL-E has phases {self.phases}")

    def set_progress(self, step: int, total_steps: int, phase: str) -> None:
        """Cosine schedules of appendix A.2: tau 1 -> 1/16, beta 0 -> 6.6, over fractions of the phase."""
        if phase != "dvae":
            return
        frac = step / max(total_steps, 1)
        cfg = self.config
        self.tau = cosine_ramp(frac / cfg.tau_anneal if cfg.tau_anneal > 0 else 1.0, cfg.tau_start, cfg.tau_end)
        self.beta = cosine_ramp(frac / cfg.beta_ramp if cfg.beta_ramp > 0 else 1.0, 0.0, cfg.beta_max)

    # --- text tokens ---

    @torch.compiler.disable  # host-side string work: torch.compile would specialise on every caption
    def tokenize(self, captions: list[str], strict: bool = False) -> torch.Tensor:
        """Captions -> text-stream ids (B, text_len): [start-of-text, bytes of the lowercased caption, pads].

        Captions longer than text_len - 1 bytes are cut (the paper keeps at most 256 BPE tokens);
        with strict=True they are an error instead (prompts at sampling time).
        """
        T = self.config.text_len
        rows = []
        for caption in captions:
            ids = list(caption.lower().encode("utf-8"))
            if len(ids) > T - 1:
                if strict:
                    raise ValueError(
                        f"prompt {caption!r} is {len(ids)} bytes; this model reads at most {T - 1} "
                        "(its text_len - 1): shorten the prompt"
                    )
                ids = ids[: T - 1]
            ids = [self.transformer.sot_id] + ids
            rows.append(ids + [self.transformer.pad_id + j for j in range(len(ids), T)])
        return host_to_device(torch.tensor(rows, dtype=torch.long), self.transformer.text_emb.weight.device)

    def detokenize(self, text: torch.Tensor) -> list[str]:
        """Text-stream ids (B, text_len) -> captions: the bytes before the first padding token."""
        out = []
        for row in text.tolist():
            ids = []
            for t in row[1:]:
                if t >= 256:  # a padding token (or a BPE id no byte tokenizer makes) ends the caption
                    break
                ids.append(t)
            out.append(bytes(ids).decode("utf-8", errors="replace"))
        return out

    # --- losses ---

    def loss(self, batch: dict, phase: str) -> dict[str, torch.Tensor]:
        if phase == "dvae":
            return self.dvae_loss(batch["image"], self.tau, self.beta)
        if phase == "transformer":
            return self.transformer_loss(batch["image"], batch["caption"])
        raise ValueError(f"unknown phase {phase!r}; DALL-E has phases {self.phases}")

    def dvae_loss(self, x: torch.Tensor, tau: float, beta: float) -> dict[str, torch.Tensor]:
        """Negative relaxed ELB of stage one (eq. 1 with the uniform prior), per dimension.

        loss = (sum_pixels -ln p_theta(x | y) + beta * sum_cells KL(q_phi(. | x) || U(K))) / (C H W)
        with y = softmax((logits + g) / tau), g ~ Gumbel(0, 1) (Jang et al. 2016; Maddison et al. 2016).
        Dividing by C H W makes the KL weight beta / 192 per cell in the paper's setting (appendix A.2).
        KL(q || U(K)) = sum_k q_k ln q_k + ln K.
        """
        cfg = self.config
        B, C, H, W = x.shape
        x01 = (x.float() + 1) / 2
        x_mapped = map_pixels(x01, cfg.logit_laplace_eps)
        logits = self.dvae.encoder(x_mapped).float()  # (B, K, h, w)
        u = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
        g = -torch.log(-torch.log(u))
        y_soft = F.softmax((logits + g) / tau, dim=1)  # (B, K, h, w)
        mu, ln_b = self.dvae.decoder(y_soft)  # (B, C, H, W) each
        nll = self.dvae.pixel_nll(x01, mu, ln_b).sum(dim=(1, 2, 3))  # (B,)
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(cfg.image_vocab_size))).sum(dim=1)  # (B, h, w)
        loss = (nll + beta * kl.sum(dim=(1, 2))) / (C * H * W)
        with torch.no_grad():
            x_hat = unmap_pixels(torch.sigmoid(mu.float()), cfg.logit_laplace_eps) * 2 - 1
            q_mean = log_q.exp().mean(dim=(0, 2, 3))  # (K,)
        return {
            "loss": loss.mean(),
            "nll": nll.mean() / (C * H * W),  # nats per dimension
            "kl": kl.mean(),  # nats per grid cell
            "mse": F.mse_loss(x_hat, x.float()),
            "perplexity": torch.exp(-(q_mean * torch.log(q_mean + 1e-10)).sum()),  # codebook usage
            "tau": torch.full((), tau, device=x.device),  # a fill on the device, not a copy from the host
            "beta": torch.full((), beta, device=x.device),
        }

    def transformer_loss(self, x: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stage two (section 2.2): cross-entropies of the text and image tokens, each averaged over
        its own tokens, weighted text_loss_weight (1/8) and 1 - text_loss_weight (7/8)."""
        with torch.no_grad():
            z = self.dvae.encode_tokens(x)  # (B, N)
        text = self.tokenize(captions)  # (B, text_len)
        text_logits, image_logits = self.transformer(text, z)
        loss_text = F.cross_entropy(text_logits.flatten(0, 1).float(), text[:, 1:].flatten())
        loss_image = F.cross_entropy(image_logits.flatten(0, 1).float(), z.flatten())
        w = self.config.text_loss_weight
        return {"loss": w * loss_text + (1 - w) * loss_image, "text_ce": loss_text, "image_ce": loss_image}

    # --- sampling ---

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> decode(argmax encode(x)), the path the Transformer's tokens take."""
        return self.dvae.decode_tokens(self.dvae.encode_tokens(x))

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-batch means: dVAE loss parts (at the final tau and beta), the error of reconstructions
        through argmax tokens, and the Transformer's cross-entropies (nats per token)."""
        x, cfg = batch["image"], self.config
        dvae = self.dvae_loss(x, cfg.tau_end, cfg.beta_max)
        out = {f"dvae_{k}": v for k, v in dvae.items() if k not in ("tau", "beta")}
        out["rec_mse"] = F.mse_loss(self.reconstruct(x), x.float())
        out.update({f"prior_{k}": v for k, v in self.transformer_loss(x, batch["caption"]).items()})
        return out

    @torch.no_grad()
    def generate_tokens(
        self,
        text: torch.Tensor | None,
        n: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral sampling from p_psi(y, z) = p_psi(y) p_psi(z | y) (section 2.2), with a key/value cache.

        text (n, text_len) conditions the images; None samples the captions first, each position
        choosing a caption token or its own padding token, and only padding after the first one.
        Returns text (n, text_len) and image tokens z (n, N).
        """
        tr, cfg = self.transformer, self.config
        device = tr.text_emb.weight.device
        caches: list[dict] = [{} for _ in tr.blocks]

        def pick(logits: torch.Tensor) -> torch.Tensor:
            logits = filter_logits(logits.float() / temperature, top_k, top_p)
            return torch.multinomial(logits.softmax(-1), 1)  # (n, 1)

        if text is None:
            T, V = cfg.text_len, cfg.text_vocab_size
            text = torch.full((n, T), tr.sot_id, dtype=torch.long, device=device)
            h = tr.run(tr.embed_text(text[:, :1]), caches)
            for j in range(1, T):
                logits = tr.to_text_logits(h[:, -1])  # (n, V + T)
                allowed = torch.zeros_like(logits, dtype=torch.bool)
                allowed[:, :V] = True
                allowed[:, V + j] = True
                if j > 1:  # after a padding token only padding may follow
                    allowed[text[:, j - 1] >= V, :V] = False
                tok = pick(logits.masked_fill(~allowed, float("-inf")))
                text[:, j] = tok[:, 0]
                h = tr.run(tr.embed_text(tok, start=j), caches)
            x = tr.embed_image(torch.full((n, 1), tr.soi_id, dtype=torch.long, device=device))
        else:
            soi = torch.full((n, 1), tr.soi_id, dtype=torch.long, device=device)
            x = torch.cat([tr.embed_text(text), tr.embed_image(soi)], dim=1)  # (n, text_len + 1, d)
        h = tr.run(x, caches)
        z = torch.empty(n, self.grid**2, dtype=torch.long, device=device)
        for k in range(self.grid**2):
            z[:, k] = pick(tr.to_image_logits(h[:, -1]))[:, 0]
            if k + 1 < self.grid**2:
                h = tr.run(tr.embed_image(z[:, k : k + 1], start=k + 1), caches)
        return text, z

    @torch.no_grad()
    def sample(
        self,
        n: int,
        prompt: str | list[str] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        candidates: int = 1,
        rerank=None,
        chunk: int = 256,
    ) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] for `prompt` (one str for all, n str, or None: sampled captions).

        With `rerank` (images (M, C, H, W), captions list[str] -> scores (M,)), draws `candidates`
        images per caption and keeps the best-scoring one, as the paper reranks with CLIP (section 2.5).
        Sequences are generated `chunk` at a time to bound the key/value cache's memory.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        if candidates > 1 and rerank is None:
            raise ValueError("candidates > 1 needs a reranker: pass --rerank CLIP_RUN")
        if rerank is not None and prompt is None:
            raise ValueError("reranking scores images against their caption: give a prompt")
        if isinstance(prompt, str):
            prompt = [prompt] * n
        if prompt is not None and len(prompt) != n:
            raise ValueError(f"got {len(prompt)} prompts for {n} samples: give one prompt or exactly n")
        text = None if prompt is None else self.tokenize(prompt, strict=True)
        if text is not None:
            text = text.repeat_interleave(candidates, dim=0)  # (n * candidates, text_len)
        images = []
        total = n * candidates
        for i in range(0, total, chunk):
            m = min(chunk, total - i)
            _, z = self.generate_tokens(None if text is None else text[i : i + m], m, temperature, top_k, top_p)
            images.append(self.dvae.decode_tokens(z))
        images = torch.cat(images)  # (n * candidates, C, H, W)
        if rerank is None:
            return images
        captions = [c for c in prompt for _ in range(candidates)]
        scores = torch.as_tensor(rerank(images, captions), device=images.device).view(n, candidates)
        best = scores.argmax(dim=1) + torch.arange(n, device=images.device) * candidates  # (n,)
        return images[best]
