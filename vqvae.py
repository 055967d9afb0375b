"""VQ-VAE with a Gated PixelCNN prior over its codes.

Papers:
- van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning",
  arXiv:1711.00937 (the VQ-VAE: eq. 1-3, appendix A.1 for the EMA codebook).
- van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu 2016, "Conditional Image
  Generation with PixelCNN Decoders", arXiv:1606.05328 (the Gated PixelCNN prior: eq. 2-5, Fig. 2).

What is implemented:
- `Encoder` / `Decoder` of Sec. 4.1: stride-2 4x4 convolutions, residual blocks
  (ReLU, 3x3 conv, ReLU, 1x1 conv) and mirrored transposed convolutions.
- `VectorQuantizer`: nearest-neighbour lookup into a codebook of K codes of dimension D (eq. 1-2),
  the straight-through gradient, the codebook and commitment terms of eq. 3 (beta = 0.25), the EMA
  codebook of appendix A.1 as an option, restarts of dead codes, perplexity and the fraction of
  codes in use.
- `GatedPixelCNN`: vertical and horizontal stacks without the blind spot, a type-A first layer
  and type-B layers after, gated activations, optional class conditioning (eq. 4).
- `VQVAE`: trains in two phases, the autoencoder ("vqvae") and then the prior ("prior") on the
  frozen encoder's codes; `sample` draws codes one position at a time and decodes them.

Deviations from the papers, and choices the papers leave open:
- log p(x | z_q) of eq. 3 is a Gaussian with fixed variance, i.e. the mean squared error on pixels
  in [-1, 1] (the paper does not fix the decoder's likelihood for images).
- EMA codebook (appendix A.1, eq. 6-8): the paper does not say how N and m start. Started at
  N = 0 with m at the initial codebook, as in many public ports, the Laplace-smoothed division
  e_i = m_i / N~_i divides by ~eps on the first update, and every code that no batch has used yet
  jumps to a huge norm; Sonnet's zero-debiased averages instead send such codes to 0. Here N
  starts at 1 and m at the initial codebook, so e_i = m_i / N_i holds from step 0 and an unused
  code keeps its value (a test checks it).
- Dead-code restarts (a code unused for `restart_after` steps is moved onto a random encoder
  output of the current batch) are not in the paper; they keep the codebook in use on small runs.
  With them on, the first training step also initialises every code from encoder outputs.
- The class embedding of eq. 4 is one projection per layer shared by the two stacks.

Glossary (paper symbol -> code name):
  x        image (B, C, H, W) in [-1, 1]           z_e      encoder output (B, D, h, w)
  e        codebook (K, D), `VectorQuantizer.e`    z_q      quantised latents (B, D, h, w)
  K        `num_codes`                             D        `code_dim`
  beta     commitment weight                       gamma    EMA decay
  N_i      EMA cluster size, `VectorQuantizer.N`   m_i      EMA sum of assigned z_e, `.m`
  sg[.]    `.detach()`                             codes    indices k of the nearest code (B, h, w)
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --- config ---


@dataclass
class VQVAEConfig:
    image_size: int = 32  # H = W of the images
    in_channels: int = 3  # C of the images
    hidden: int = 64  # channels of the encoder and decoder convolutions (paper: 256)
    res_hidden: int = 32  # channels inside a residual block (paper: 256)
    num_res_blocks: int = 2  # residual blocks in the encoder and in the decoder (paper: 2)
    downsample: int = 2  # stride-2 convolutions; the code map is image_size / 2**downsample
    num_codes: int = 128  # K, codebook size (paper: 512)
    code_dim: int = 32  # D, dimension of a code
    beta: float = 0.25  # commitment weight of eq. 3
    ema: bool = True  # learn the codebook by EMA (appendix A.1) instead of the codebook loss
    gamma: float = 0.99  # EMA decay (appendix A.1)
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    restart_after: int = 50  # restart a code unused for this many training steps (0: never)
    num_classes: int = 0  # class-conditional prior when > 0 (train.py sets it from the data)
    prior_channels: int = 48  # channels of each gated layer of the prior
    prior_layers: int = 5  # gated layers of the prior (the first is type A)
    prior_kernel: int = 3  # n of the n x n receptive field of each gated layer (odd)
    prior_out_hidden: int = 128  # channels of the 1x1 output layers of the prior
    prior_dropout: float = 0.0  # dropout on the gated outputs of the prior


PRESETS: dict[str, VQVAEConfig] = {
    # CPU, minutes: 32x32 shapes -> 8x8 codes. 0.24M autoencoder + 0.28M prior parameters.
    "tiny": VQVAEConfig(num_classes=18),  # train.py sets num_classes from the data
    # Sec. 4.1 architecture (two stride-2 4x4 convs, two residual blocks, 256 units, K = 512) on
    # 32x32 CIFAR10 -> 8x8 codes. D is not given in the paper; 64 as in the authors' Sonnet example.
    # The prior's size is not given either: the Gated PixelCNN paper's large model (20 layers,
    # 384 units, 5x5) stands in. 4.9M autoencoder + 122M prior parameters.
    "vqvae-cifar10": VQVAEConfig(
        hidden=256, res_hidden=256, num_codes=512, code_dim=64, ema=False, restart_after=0,
        prior_channels=384, prior_layers=20, prior_kernel=5, prior_out_hidden=1024,
    ),
    # Sec. 4.2: ImageNet 128x128x3 -> 32x32x1 codes with K = 512, a class-conditional prior;
    # autoencoder and prior sizes as above. 4.9M autoencoder + 137M prior parameters.
    "vqvae-imagenet": VQVAEConfig(
        image_size=128, hidden=256, res_hidden=256, num_codes=512, code_dim=64, ema=False,
        restart_after=0, num_classes=1000, prior_channels=384, prior_layers=20, prior_kernel=5,
        prior_out_hidden=1024,
    ),
}


# --- helpers ---


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move a feature map one row down (zeros enter at the top): (B, C, H, W) -> (B, C, H, W).

    The vertical stack at row r has seen rows <= r; shifted, it tells row r only about rows < r,
    which is what the horizontal stack at row r may know (Gated PixelCNN Sec. 2.2).
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation, Gated PixelCNN eq. 2: y = tanh(W_f * x) * sigmoid(W_g * x).

    (B, 2C, H, W) -> (B, C, H, W); the first C channels are the filter, the last C the gate.
    """
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sampling_labels(n: int, label, num_classes: int, device):
    """The (n,) label tensor for sampling, or None for an unconditional prior."""
    if num_classes == 0:
        if label is not None:
            raise ValueError("this model's prior is not class-conditional; drop --label")
        return None
    if label is None:
        return torch.randint(0, num_classes, (n,), device=device)
    if not 0 <= int(label) < num_classes:
        raise ValueError(f"label must be in [0, {num_classes - 1}], got {label}")
    return torch.full((n,), int(label), dtype=torch.long, device=device)


# --- building blocks ---


class ResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (VQ-VAE Sec. 4.1). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    """Stride-2 4x4 convolutions, then residual blocks (VQ-VAE Sec. 4.1).

    (B, in_channels, H, W) -> (B, hidden, H / 2**downsample, W / 2**downsample)
    """

    def __init__(self, in_channels: int, hidden: int, res_hidden: int, num_res_blocks: int,
                 downsample: int):
        super().__init__()
        layers = []
        for i in range(downsample):
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 4, 2, 1), nn.ReLU()]
        if downsample == 0:
            layers += [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers += [nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """A 3x3 convolution, residual blocks, then stride-2 4x4 transposed convolutions (Sec. 4.1).

    (B, in_channels, h, w) -> (B, out_channels, h * 2**upsample, w * 2**upsample)
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, res_hidden: int,
                 num_res_blocks: int, upsample: int):
        super().__init__()
        layers = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        layers += [ResBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers += [nn.ReLU()]
        for i in range(upsample):
            last = i == upsample - 1
            layers += [nn.ConvTranspose2d(hidden, out_channels if last else hidden, 4, 2, 1)]
            if not last:
                layers += [nn.ReLU()]
        if upsample == 0:
            layers += [nn.Conv2d(hidden, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation into a codebook e of K codes of dimension D.

    VQ-VAE eq. 1-2: k = argmin_j ||z_e - e_j||_2, z_q = e_k. The loss terms of eq. 3:
      codebook   ||sg[z_e] - e||^2       moves the codes to the encoder outputs (absent with EMA:
                                         the codebook then follows the EMA update of appendix A.1);
      commitment beta ||z_e - sg[e]||^2  keeps the encoder outputs near their codes.
    The reconstruction gradient reaches z_e by the straight-through estimator,
    z_q = z_e + sg[e_k - z_e] (Sec. 3.2): equal to e_k forward, the identity backward.

    The distances run in fp32 even under bf16 autocast: ||z||^2 - 2 z.e + ||e||^2 in bf16 keeps
    ~3 significant digits, too few to tell near codes apart, so autocast is switched off locally
    (for the EMA sums too).
    """

    def __init__(self, K: int, D: int, beta: float = 0.25, ema: bool = True, gamma: float = 0.99,
                 eps: float = 1e-5, restart_after: int = 0):
        super().__init__()
        self.K, self.D, self.beta = K, D, beta
        self.ema, self.gamma, self.eps, self.restart_after = ema, gamma, eps, restart_after
        e = torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K)
        if ema:
            # e = m / N holds from the start: N_i = 1, m_i = e_i (see the module docstring).
            self.register_buffer("e", e)
            self.register_buffer("N", torch.ones(K))
            self.register_buffer("m", e.clone())
        else:
            self.e = nn.Parameter(e)
        # training steps since each code was last chosen, for dead-code restarts; starting at
        # restart_after makes the first training step place every code on an encoder output
        # (a data-dependent initialisation: the encoder's outputs are not near any fixed init)
        self.register_buffer("unused_steps", torch.full((K,), restart_after, dtype=torch.long))

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """||z - e_j||^2 for every row of z and every code: (n, D) -> (n, K), in fp32."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, e = z.float(), self.e.float()
            return (z * z).sum(1, keepdim=True) - 2 * z @ e.t() + (e * e).sum(1)  # (n, K)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) long -> z_q = e_codes (B, D, h, w)."""
        return F.embedding(codes, self.e).permute(0, 3, 1, 2)  # (B, D, h, w)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor):
        """Move codes unused for `restart_after` steps onto random rows of z (n, D).

        Not in the paper: without it a code that no encoder output is near never moves again
        (neither the codebook loss nor the EMA update touches it).
        """
        dead = self.unused_steps >= self.restart_after  # (K,)
        candidates = z[torch.randint(0, z.shape[0], (self.K,), device=z.device)].float()
        if _distributed():
            dist.broadcast(candidates, 0)  # every rank restarts to the same vectors
        self.e.data.copy_(torch.where(dead[:, None], candidates, self.e.data))
        if self.ema:
            self.m.copy_(torch.where(dead[:, None], candidates, self.m))
            self.N.copy_(torch.where(dead, torch.ones_like(self.N), self.N))
        self.unused_steps.masked_fill_(dead, 0)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, one_hot: torch.Tensor, n_i: torch.Tensor):
        """VQ-VAE appendix A.1, eq. 6-8, with Laplace smoothing of N:

          N_i <- gamma N_i + (1 - gamma) n_i          n_i: rows assigned to code i in the batch
          m_i <- gamma m_i + (1 - gamma) sum_j z_j    sum over the rows assigned to code i
          e_i <- m_i / N~_i,   N~_i = (N_i + eps) / (sum_k N_k + K eps) * sum_k N_k
        z: (n, D) fp32, one_hot: (n, K) fp32, n_i: (K,) summed over all ranks.
        """
        z_sum = one_hot.t() @ z  # (K, D)
        if _distributed():
            dist.all_reduce(z_sum)
        self.N.mul_(self.gamma).add_(n_i, alpha=1 - self.gamma)
        self.m.mul_(self.gamma).add_(z_sum, alpha=1 - self.gamma)
        total = self.N.sum()
        N_smooth = (self.N + self.eps) / (total + self.K * self.eps) * total
        self.e.copy_(self.m / N_smooth[:, None])

    def forward(self, z_e: torch.Tensor, update: bool = True) -> dict:
        """z_e (B, D, h, w) -> dict with
          z_q         (B, D, h, w) fp32, straight-through: forward e_k, backward the identity;
          codes       (B, h, w) long;
          loss        scalar, codebook (unless EMA) + beta * commitment terms of eq. 3;
          perplexity  exp(entropy of the batch's code histogram): K when all codes are equally used;
          usage       fraction of the K codes chosen at least once in the batch.
        With `update` (and in training mode) the dead codes are restarted first and the EMA
        codebook updated after the lookup. All of it runs in fp32, outside autocast: the
        distances need the precision (see the class docstring), and so do the EMA sums.
        """
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            return self._quantize(z_e.float(), update)

    def _quantize(self, z_e: torch.Tensor, update: bool) -> dict:
        B, D, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        update = update and self.training
        if update and self.restart_after > 0:
            self.restart_dead_codes(z.detach())
        with torch.no_grad():
            codes = self.distances(z.detach()).argmin(1)  # (B*h*w,)
            one_hot = F.one_hot(codes, self.K).float()  # (B*h*w, K)
        counts = one_hot.sum(0)  # (K,) uses of each code in this batch
        if update:
            n_i = counts.clone()
            if _distributed():
                dist.all_reduce(n_i)  # every rank sees the same statistics and restarts
            if self.ema:
                self.ema_update(z.detach(), one_hot, n_i)
            self.unused_steps.add_(1).masked_fill_(n_i > 0, 0)
        codes = codes.view(B, h, w)
        e_k = self.lookup(codes)  # (B, D, h, w)
        commitment = F.mse_loss(z_e, e_k.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(e_k, z_e.detach())  # codebook term ||sg[z_e] - e||^2
        z_q = z_e + (e_k - z_e).detach()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        return {"z_q": z_q, "codes": codes, "loss": loss, "commitment": commitment,
                "perplexity": perplexity, "usage": usage}


class GatedLayer(nn.Module):
    """One layer of the Gated PixelCNN (arXiv:1606.05328 Fig. 2), without the blind spot.

    Vertical stack: a (n//2 + 1) x n convolution whose output at row r sees rows r - n//2 .. r.
    Horizontal stack: a 1 x (n//2 + 1) convolution seeing columns c - n//2 .. c of its own row
    (type B), or a 1 x n//2 one seeing columns c - n//2 .. c - 1 (type A, the first layer, which
    must not see the position it predicts). The vertical pre-activations, shifted one row down,
    reach the horizontal stack through a 1x1 convolution, so position (r, c) of the horizontal
    stack depends on rows < r (all columns in reach) and on columns < c of row r (type A) or <= c
    of the features below it (type B): exactly the positions before (r, c) in raster order.
    Both stacks use the gated unit of eq. 4, y = tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h),
    with the condition `cond` (B, 2C, H or 1, W or 1) standing for V h. The horizontal stack is
    residual except in the type-A layer, whose input is the current position itself.

    v, h: (B, C, H, W) -> v, h: (B, C, H, W)
    """

    def __init__(self, channels: int, kernel: int, mask_type: str, dropout: float = 0.0):
        super().__init__()
        assert kernel % 2 == 1 and mask_type in ("A", "B")
        self.pad, self.mask_type = kernel // 2, mask_type
        C = channels
        self.v_conv = nn.Conv2d(C, 2 * C, (kernel // 2 + 1, kernel))
        self.h_conv = nn.Conv2d(C, 2 * C, (1, kernel // 2 + (1 if mask_type == "B" else 0)))
        self.v_to_h = nn.Conv2d(2 * C, 2 * C, 1)
        self.h_out = nn.Conv2d(C, C, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v, h, cond=None):
        W = h.shape[-1]
        p = self.pad
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, H, W)
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[..., :W]  # (B, 2C, H, W)
        h_pre = h_pre + self.v_to_h(down_shift(v_pre))
        if cond is not None:
            v_pre, h_pre = v_pre + cond, h_pre + cond
        h_new = self.h_out(self.dropout(gate(h_pre)))
        if self.mask_type == "B":
            h_new = h + h_new
        return gate(v_pre), h_new


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(codes) = prod_i p(code_i | code_<i [, label]) over a code map in
    raster order (Gated PixelCNN, arXiv:1606.05328), here over the K codes of a VQ-VAE.

    codes (B, H, W) long [, label (B,) long, -1 for none] -> logits (B, K, H, W)
    """

    def __init__(self, K: int, channels: int, layers: int, kernel: int, out_hidden: int,
                 num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.K, self.channels, self.num_classes = K, channels, num_classes
        self.embed = nn.Embedding(K, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel, "A" if i == 0 else "B", dropout) for i in range(layers)
        )
        if num_classes > 0:
            # eq. 4: V h with h a one-hot label, one projection per layer; row num_classes is
            # "no label" (label -1)
            self.label_embed = nn.Embedding(num_classes + 1, layers * 2 * channels)
        self.out = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, out_hidden, 1), nn.ReLU(), nn.Conv2d(out_hidden, K, 1)
        )

    def label_cond(self, label, B: int):
        """Per-layer condition biases: label (B,) -> list of (B, 2C, 1, 1), or Nones."""
        if self.num_classes == 0 or label is None:
            return [None] * len(self.layers)
        idx = torch.where(label < 0, torch.full_like(label, self.num_classes), label)
        c = self.label_embed(idx).view(B, len(self.layers), 2 * self.channels, 1, 1)
        return c.unbind(1)

    def forward_embedded(self, x: torch.Tensor, label=None) -> torch.Tensor:
        """x: embedded codes (B, C, H, W) -> logits (B, K, H, W). Split from `forward` so the
        causality test can differentiate with respect to the input."""
        v = h = x
        for layer, cond in zip(self.layers, self.label_cond(label, x.shape[0])):
            v, h = layer(v, h, cond)
        return self.out(h)  # (B, K, H, W)

    def forward(self, codes: torch.Tensor, label=None) -> torch.Tensor:
        return self.forward_embedded(self.embed(codes).permute(0, 3, 1, 2), label)


# --- the model ---


class VQAutoencoder(nn.Module):
    """Encoder, quantiser and decoder: x (B, C, H, W) -> z_e -> z_q -> x_hat (B, C, H, W)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg.in_channels, cfg.hidden, cfg.res_hidden, cfg.num_res_blocks,
                               cfg.downsample)
        self.pre_quant = nn.Conv2d(cfg.hidden, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema,
                                         cfg.gamma, cfg.eps, cfg.restart_after)
        self.decoder = Decoder(cfg.code_dim, cfg.hidden, cfg.in_channels, cfg.res_hidden,
                               cfg.num_res_blocks, cfg.downsample)
        # An EMA codebook is fitted to the live encoder: train.py's EMA of the weights would pair
        # averaged encoder and decoder weights with it, so it keeps the live weights instead.
        self.keep_live_weights = cfg.ema

    def forward(self, x, update: bool = True) -> dict:
        z_e = self.pre_quant(self.encoder(x))  # (B, D, h, w)
        q = self.quantizer(z_e, update)
        return {**q, "z_e": z_e, "x_hat": self.decoder(q["z_q"])}


class VQVAE(nn.Module):
    """VQ-VAE (arXiv:1711.00937) with a Gated PixelCNN prior over its codes.

    Phase "vqvae" trains the autoencoder with eq. 3; phase "prior" trains the prior on the codes of
    the frozen encoder by maximum likelihood. Sampling draws a code map from the prior and decodes
    it: the autoencoder alone cannot generate.
    """

    phases = ("vqvae", "prior")

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        if cfg.image_size % (2 ** cfg.downsample) != 0:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by "
                             f"2**downsample = {2 ** cfg.downsample}; change one of them")
        if cfg.prior_kernel % 2 != 1:
            raise ValueError(f"prior_kernel must be odd, got {cfg.prior_kernel}")
        self.cfg = cfg
        self.latent_size = cfg.image_size // 2 ** cfg.downsample
        self.vqvae = VQAutoencoder(cfg)
        self.prior = GatedPixelCNN(cfg.num_codes, cfg.prior_channels, cfg.prior_layers,
                                   cfg.prior_kernel, cfg.prior_out_hidden, cfg.num_classes,
                                   cfg.prior_dropout)

    def phase_module(self, phase: str) -> nn.Module:
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; choose one of {self.phases}")
        return self.vqvae if phase == "vqvae" else self.prior

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> codes (B, h, w), without touching the codebook."""
        return self.vqvae(x, update=False)["codes"]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> x_hat (B, C, H, W) clamped to [-1, 1]."""
        return self.vqvae.decoder(self.vqvae.quantizer.lookup(codes)).clamp(-1, 1)

    def loss(self, batch: dict, phase: str = "vqvae") -> dict:
        x = batch["image"]
        if phase == "vqvae":
            out = self.vqvae(x)
            # eq. 3: -log p(x|z_q) (Gaussian, fixed variance: MSE) + codebook + beta * commitment
            recon = F.mse_loss(out["x_hat"].float(), x.float())
            return {"loss": recon + out["loss"], "recon": recon, "vq": out["loss"],
                    "perplexity": out["perplexity"], "usage": out["usage"]}
        if phase == "prior":
            codes = self.encode(x)
            logits = self.prior(codes, batch.get("label"))  # (B, K, h, w)
            nll = F.cross_entropy(logits.float(), codes)  # nats per code
            return {"loss": nll, "bits_per_code": nll / math.log(2)}
        raise ValueError(f"unknown phase {phase!r}; choose one of {self.phases}")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae(x, update=False)["x_hat"].clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Per-batch means: reconstruction MSE (pixels in [-1, 1]), PSNR in dB (per image, on
        [0, 1] pixels), perplexity and fraction of the K codes used in the batch, and the prior's
        NLL in bits per code."""
        x = batch["image"]
        out = self.vqvae(x, update=False)
        x_hat = out["x_hat"].float().clamp(-1, 1)
        mse_img = ((x_hat - x.float()) ** 2).flatten(1).mean(1)  # (B,)
        psnr = 10 * torch.log10(4.0 / mse_img.clamp_min(1e-10))  # peak 1 on [0,1] = 2 on [-1,1]
        logits = self.prior(out["codes"], batch.get("label"))
        nll = F.cross_entropy(logits.float(), out["codes"])
        return {"mse": mse_img.mean(), "psnr": psnr.mean(), "perplexity": out["perplexity"],
                "codes_in_use": out["usage"], "prior_bits_per_code": nll / math.log(2)}

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, label=None) -> torch.Tensor:
        """Draw code maps from the prior one position at a time and decode them: (n, C, H, W).

        label: an int class for all n samples, or None (random classes if the prior is
        class-conditional).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = next(self.parameters()).device
        y = sampling_labels(n, label, self.cfg.num_classes, device)
        s = self.latent_size
        codes = sample_codes(lambda c, rows: self.prior(c, y), n, s, s, temperature, device)
        return self.decode(codes)


# --- sampling ---


def sample_codes(logits_fn, B: int, H: int, W: int, temperature: float, device) -> torch.Tensor:
    """Ancestral sampling in raster order: code_i ~ softmax(logits_i / temperature).

    `logits_fn(codes, rows)` returns (B, K, rows, W) for the first `rows` rows of `codes`; a causal
    prior's row r depends only on rows <= r, so later rows need not be computed.
    """
    codes = torch.zeros(B, H, W, dtype=torch.long, device=device)
    for r in range(H):
        for c in range(W):
            logits = logits_fn(codes[:, : r + 1], r + 1)[:, :, r, c].float()  # (B, K)
            probs = F.softmax(logits / temperature, dim=-1)
            codes[:, r, c] = torch.multinomial(probs, 1)[:, 0]
    return codes
