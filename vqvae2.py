"""VQ-VAE-2: a two-level VQ-VAE with PixelCNN priors, the top one with self-attention.

Paper: Razavi, van den Oord, Vinyals 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
arXiv:1906.00446. Builds on the VQ-VAE (arXiv:1711.00937, see vqvae.py) and the Gated PixelCNN
(arXiv:1606.05328).

What is implemented:
- The two-level autoencoder of Fig. 2a / Algorithm 1: the bottom encoder maps x to features at 1/4
  of the image size, the top encoder maps those to 1/8; the top features are quantised; a top
  decoder brings the top codes back to 1/4, and the bottom features joined with it are quantised;
  the decoder reconstructs x from both code maps (the top one upsampled to 1/4).
- Each level has its own codebook, trained as in the VQ-VAE (eq. 3 of arXiv:1711.00937, beta =
  0.25, EMA updates with decay 0.99 as in the paper's Sec. 3.1).
- Priors (Fig. 2b, Algorithm 2): the top prior is a Gated PixelCNN with causal multi-head
  self-attention layers over the whole top map (global context); the bottom prior is a Gated
  PixelCNN conditioned on the top codes through a conditioning stack of residual blocks. Both
  may also be class-conditional. `sample` draws top codes, then bottom codes, then decodes.

Deviations and choices:
- The paper's priors use PixelSNAIL-style gated residual blocks with separate "residual units"
  and an output stack of 20 layers; here both priors are stacks of the Gated PixelCNN layers of
  vqvae.py with a two-layer 1x1 output head, and the attention layers read the horizontal stack
  only (the vertical stack sees the whole current row, which would leak the future).
- Attention positions are a learned embedding per position of the top map; keys and values also
  read the embedded codes shifted by one position (as PixelSNAIL does), so that attention alone
  reaches every earlier code.
- The dead-code restarts and the EMA initialisation N = 1, m = e are those of vqvae.py (not in
  the paper). The rejection sampling with a classifier (Sec. 3.3) is not implemented.
- Only the two-level ImageNet model; the three-level FFHQ-1024 model is not.

Glossary (paper symbol -> code name):
  x            image (B, C, H, W) in [-1, 1]
  h_bottom     bottom encoder features (B, hidden, H/4, W/4), `h_b`
  h_top        top encoder features (B, hidden, H/8, W/8), `h_t`
  e_top        top codes / quantised map (B, H/8, W/8) / (B, D, H/8, W/8), `top`, `z_q_top`
  e_bottom     bottom codes / quantised map (B, H/4, W/4) / (B, D, H/4, W/4), `bottom`, `z_q_bot`
  K, D, beta, gamma, N_i, m_i   as in vqvae.py
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --- config ---


@dataclass
class VQVAE2Config:
    image_size: int = 32  # H = W of the images; must be divisible by 8
    in_channels: int = 3  # C of the images
    hidden: int = 64  # channels of the encoder and decoder convolutions (paper: 128)
    res_hidden: int = 32  # channels inside a residual block (paper: 64)
    num_res_blocks: int = 2  # residual blocks in each encoder and decoder (paper: 2)
    num_codes: int = 128  # K, codebook size of each level (paper: 512)
    code_dim: int = 32  # D, dimension of a code (paper: 64)
    beta: float = 0.25  # commitment weight of eq. 3 of arXiv:1711.00937 (paper: 0.25)
    ema: bool = True  # EMA codebooks (paper: yes, decay 0.99)
    gamma: float = 0.99  # EMA decay
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    restart_after: int = 50  # restart a code unused for this many training steps (0: never)
    num_classes: int = 0  # class-conditional priors when > 0 (train.py sets it from the data)
    top_channels: int = 48  # channels of the top prior's gated layers (paper: 512)
    top_layers: int = 4  # gated layers of the top prior (paper: 20)
    top_kernel: int = 3  # n of the n x n receptive field of each layer (paper: 5)
    top_attention: int = 2  # causal self-attention layers, spread over the stack (paper: 4)
    top_heads: int = 4  # attention heads (paper: 8)
    top_dropout: float = 0.0  # dropout on the gated outputs (paper: 0.1)
    bottom_channels: int = 48  # channels of the bottom prior's gated layers (paper: 512)
    bottom_layers: int = 5  # gated layers of the bottom prior (paper: 20)
    bottom_kernel: int = 3  # n of the n x n receptive field of each layer (paper: 5)
    bottom_cond_blocks: int = 2  # residual blocks of the top-code conditioning stack (paper: 20)
    bottom_dropout: float = 0.0  # dropout on the gated outputs (paper: 0.1)
    prior_out_hidden: int = 128  # channels of the 1x1 output layers of both priors


PRESETS: dict[str, VQVAE2Config] = {
    # CPU, minutes: 32x32 shapes -> 4x4 top and 8x8 bottom codes. 0.48M autoencoder, 0.26M top
    # prior and 0.40M bottom prior parameters.
    "tiny": VQVAE2Config(num_classes=18),  # train.py sets num_classes from the data
    # Appendix A, ImageNet 256x256: 32x32 top and 64x64 bottom codes, K = 512, D = 64, 128 hidden
    # and 64 residual units; priors with 512 channels, 20 layers, 5x5 filters, dropout 0.1, the
    # top one with 4 attention layers of 8 heads, the bottom one with 20 conditioning blocks; the
    # priors are class-conditional. 1.9M autoencoder, 245M top prior and 260M bottom prior
    # parameters (with this file's gated layers, not the paper's blocks: see the docstring).
    "vqvae2-imagenet256": VQVAE2Config(
        image_size=256, hidden=128, res_hidden=64, num_codes=512, code_dim=64, restart_after=0,
        num_classes=1000, top_channels=512, top_layers=20, top_kernel=5, top_attention=4,
        top_heads=8, top_dropout=0.1, bottom_channels=512, bottom_layers=20, bottom_kernel=5,
        bottom_cond_blocks=20, bottom_dropout=0.1, prior_out_hidden=1024,
    ),
}


# --- helpers ---


# Copied from vqvae.down_shift
def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move a feature map one row down (zeros enter at the top): (B, C, H, W) -> (B, C, H, W).

    The vertical stack at row r has seen rows <= r; shifted, it tells row r only about rows < r,
    which is what the horizontal stack at row r may know (Gated PixelCNN Sec. 2.2).
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


# Copied from vqvae.gate
def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation, Gated PixelCNN eq. 2: y = tanh(W_f * x) * sigmoid(W_g * x).

    (B, 2C, H, W) -> (B, C, H, W); the first C channels are the filter, the last C the gate.
    """
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


# Copied from vqvae._distributed
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# Copied from vqvae.sampling_labels
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


# Copied from vqvae.ResBlock
class ResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (VQ-VAE Sec. 4.1). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


# Copied from vqvae.Encoder
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


# Copied from vqvae.Decoder
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


# Copied from vqvae.VectorQuantizer
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


# Copied from vqvae.GatedLayer
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the raster order of a code map (the notes' "+attention":
    global context for the top prior), residual on the horizontal stack:

      h_i <- h_i + W_o sum_{j <= i} softmax_j(q_i . k_j / sqrt(d)) v_j
      q_i from h_i;  k_j, v_j from [h_j, x_{j-1}]  (x: the embedded codes, shifted one position)

    h_j depends only on codes before j, and x_{j-1} is the code just before j, so position i sees
    exactly the codes before i, all of them: the horizontal stack alone never carries the code
    right before a position into the keys (PixelSNAIL, arXiv:1712.09763, feeds the input to its
    attention for the same reason). Queries and keys get a learned position embedding.

    h, x: (B, C, H, W) -> (B, C, H, W); H * W <= the `positions` it was built for.
    """

    def __init__(self, channels: int, heads: int, positions: int):
        super().__init__()
        assert channels % heads == 0, "channels must be divisible by heads"
        self.heads = heads
        self.pos = nn.Parameter(torch.zeros(positions, channels))
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(2 * channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, h, x):
        B, C, H, W = h.shape
        hs = self.norm(h.flatten(2).transpose(1, 2) + self.pos[: H * W])  # (B, HW, C)
        xs = F.pad(x.flatten(2), (1, 0))[:, :, :-1].transpose(1, 2)  # (B, HW, C): x_{j-1}
        q = self.q(hs)  # (B, HW, C)
        k, v = self.kv(torch.cat([hs, xs], -1)).chunk(2, -1)  # (B, HW, C) each
        q, k, v = (t.view(B, H * W, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, HW, C/heads)
        y = self.proj(y.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return h + y.transpose(1, 2).reshape(B, C, H, W)


class PixelCNNPrior(nn.Module):
    """Gated PixelCNN over a code map (arXiv:1606.05328), with the options VQ-VAE-2 needs:
    causal self-attention layers (top prior) and a spatial condition from another code map
    through a conditioning stack (bottom prior, location-dependent conditioning of eq. 5:
    V * s with V a 1x1 convolution), and an optional class label (eq. 4).

    codes (B, H, W) long [, label (B,), cond_codes (B, H/2, W/2)] -> logits (B, K, H, W)
    """

    def __init__(self, K: int, channels: int, layers: int, kernel: int, out_hidden: int,
                 size: int, num_classes: int = 0, dropout: float = 0.0, attention: int = 0,
                 heads: int = 1, cond_K: int = 0, cond_blocks: int = 0, res_hidden: int = 32):
        super().__init__()
        self.channels, self.num_classes, self.n_layers = channels, num_classes, layers
        self.embed = nn.Embedding(K, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel, "A" if i == 0 else "B", dropout) for i in range(layers)
        )
        # attention layers spread evenly, the last one after the last gated layer
        self.attend_after = {(k + 1) * layers // attention - 1 for k in range(attention)}
        self.attention = nn.ModuleDict(
            {str(i): CausalSelfAttention(channels, heads, size * size) for i in self.attend_after}
        )
        if num_classes > 0:
            # row num_classes is "no label" (label -1)
            self.label_embed = nn.Embedding(num_classes + 1, layers * 2 * channels)
        if cond_K > 0:
            # the conditioning stack sees the whole condition map: it need not be causal
            self.cond_embed = nn.Embedding(cond_K, channels)
            self.cond_stack = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                *[ResBlock(channels, res_hidden) for _ in range(cond_blocks)],
                nn.ReLU(),
                nn.ConvTranspose2d(channels, channels, 4, 2, 1),  # to the size of this map
                nn.ReLU(),
                nn.Conv2d(channels, layers * 2 * channels, 1),  # V * s for every layer
            )
        self.out = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, out_hidden, 1), nn.ReLU(), nn.Conv2d(out_hidden, K, 1)
        )

    def condition(self, B: int, label=None, cond_codes=None) -> list:
        """Per-layer condition terms, summed: (B, 2C, 1 or H, 1 or W) each, or Nones."""
        L, C2 = self.n_layers, 2 * self.channels
        c = None
        if self.num_classes > 0 and label is not None:
            idx = torch.where(label < 0, torch.full_like(label, self.num_classes), label)
            c = self.label_embed(idx).view(B, L * C2, 1, 1)
        if cond_codes is not None:
            s = self.cond_embed(cond_codes).permute(0, 3, 1, 2)  # (B, C, H/2, W/2)
            s = self.cond_stack(s)  # (B, L*2C, H, W)
            c = s if c is None else c + s
        if c is None:
            return [None] * L
        return list(c.view(B, L, C2, c.shape[-2], c.shape[-1]).unbind(1))

    def forward_embedded(self, x: torch.Tensor, conds: list) -> torch.Tensor:
        """x: embedded codes (B, C, H, W), conds from `condition` (cropped to H rows) ->
        logits (B, K, H, W)."""
        v = h = x
        for i, (layer, cond) in enumerate(zip(self.layers, conds)):
            v, h = layer(v, h, cond)
            if i in self.attend_after:
                h = self.attention[str(i)](h, x)
        return self.out(h)  # (B, K, H, W)

    def forward(self, codes, label=None, cond_codes=None):
        conds = self.condition(codes.shape[0], label, cond_codes)
        return self.forward_embedded(self.embed(codes).permute(0, 3, 1, 2), conds)

    def sample(self, B: int, size: int, temperature: float, label=None, cond_codes=None):
        """Codes (B, size, size) drawn one position at a time (Algorithm 2)."""
        conds = self.condition(B, label, cond_codes)
        device = self.embed.weight.device

        def logits_fn(codes, rows):
            x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, rows, size)
            return self.forward_embedded(x, [c if c is None else c[:, :, :rows] for c in conds])

        return sample_codes(logits_fn, B, size, size, temperature, device)


# --- the model ---


class VQ2Autoencoder(nn.Module):
    """Two-level encoder, quantisers and decoder (Fig. 2a, Algorithm 1)."""

    def __init__(self, cfg: VQVAE2Config):
        super().__init__()
        D, hid, rh, nr = cfg.code_dim, cfg.hidden, cfg.res_hidden, cfg.num_res_blocks
        vq = dict(beta=cfg.beta, ema=cfg.ema, gamma=cfg.gamma, eps=cfg.eps,
                  restart_after=cfg.restart_after)
        self.enc_b = Encoder(cfg.in_channels, hid, rh, nr, downsample=2)  # x -> 1/4
        self.enc_t = Encoder(hid, hid, rh, nr, downsample=1)  # 1/4 -> 1/8
        self.pre_quant_t = nn.Conv2d(hid, D, 1)
        self.quantizer_t = VectorQuantizer(cfg.num_codes, D, **vq)
        self.dec_t = Decoder(D, hid, D, rh, nr, upsample=1)  # top codes -> 1/4
        self.pre_quant_b = nn.Conv2d(hid + D, D, 1)
        self.quantizer_b = VectorQuantizer(cfg.num_codes, D, **vq)
        self.upsample_t = nn.ConvTranspose2d(D, D, 4, 2, 1)  # top codes to the bottom's size
        self.decoder = Decoder(2 * D, hid, cfg.in_channels, rh, nr, upsample=2)
        # EMA codebooks follow the live encoders: train.py keeps the live weights (see vqvae.py)
        self.keep_live_weights = cfg.ema

    def decode(self, z_q_top, z_q_bot):
        """x_hat = D(e_top, e_bottom): (B, D, H/8, W/8), (B, D, H/4, W/4) -> (B, C, H, W)."""
        return self.decoder(torch.cat([self.upsample_t(z_q_top), z_q_bot], 1))  # (B, 2D, H/4)

    def forward(self, x, update: bool = True) -> dict:
        h_b = self.enc_b(x)  # (B, hidden, H/4, W/4)
        h_t = self.enc_t(h_b)  # (B, hidden, H/8, W/8)
        qt = self.quantizer_t(self.pre_quant_t(h_t), update)
        z_e_bot = self.pre_quant_b(torch.cat([h_b, self.dec_t(qt["z_q"])], 1))  # (B, D, H/4)
        qb = self.quantizer_b(z_e_bot, update)
        return {"top": qt, "bottom": qb, "x_hat": self.decode(qt["z_q"], qb["z_q"])}


class VQVAE2(nn.Module):
    """VQ-VAE-2 (arXiv:1906.00446): the two-level autoencoder, then a prior over the top codes,
    then a prior over the bottom codes given the top codes. Three phases."""

    phases = ("vqvae", "prior_top", "prior_bottom")

    def __init__(self, cfg: VQVAE2Config):
        super().__init__()
        if cfg.image_size % 8 != 0:
            raise ValueError(f"image_size must be divisible by 8 (top codes at 1/8), "
                             f"got {cfg.image_size}")
        for name in ("top_kernel", "bottom_kernel"):
            if getattr(cfg, name) % 2 != 1:
                raise ValueError(f"{name} must be odd, got {getattr(cfg, name)}")
        if cfg.top_channels % max(cfg.top_heads, 1) != 0:
            raise ValueError(f"top_channels ({cfg.top_channels}) must be divisible by top_heads "
                             f"({cfg.top_heads})")
        self.cfg = cfg
        self.size_t, self.size_b = cfg.image_size // 8, cfg.image_size // 4
        self.vqvae = VQ2Autoencoder(cfg)
        self.prior_top = PixelCNNPrior(
            cfg.num_codes, cfg.top_channels, cfg.top_layers, cfg.top_kernel, cfg.prior_out_hidden,
            self.size_t, cfg.num_classes, cfg.top_dropout, attention=cfg.top_attention,
            heads=cfg.top_heads,
        )
        self.prior_bottom = PixelCNNPrior(
            cfg.num_codes, cfg.bottom_channels, cfg.bottom_layers, cfg.bottom_kernel,
            cfg.prior_out_hidden, self.size_b, cfg.num_classes, cfg.bottom_dropout,
            cond_K=cfg.num_codes, cond_blocks=cfg.bottom_cond_blocks, res_hidden=cfg.res_hidden,
        )

    def phase_module(self, phase: str) -> nn.Module:
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; choose one of {self.phases}")
        return {"vqvae": self.vqvae, "prior_top": self.prior_top,
                "prior_bottom": self.prior_bottom}[phase]

    @torch.no_grad()
    def encode(self, x):
        """x (B, C, H, W) -> top codes (B, H/8, W/8), bottom codes (B, H/4, W/4)."""
        out = self.vqvae(x, update=False)
        return out["top"]["codes"], out["bottom"]["codes"]

    @torch.no_grad()
    def decode(self, top, bottom):
        """Codes of both levels -> x_hat (B, C, H, W) clamped to [-1, 1]."""
        ae = self.vqvae
        return ae.decode(ae.quantizer_t.lookup(top), ae.quantizer_b.lookup(bottom)).clamp(-1, 1)

    def loss(self, batch: dict, phase: str = "vqvae") -> dict:
        x, label = batch["image"], batch.get("label")
        if phase == "vqvae":
            out = self.vqvae(x)
            recon = F.mse_loss(out["x_hat"].float(), x.float())
            vq = out["top"]["loss"] + out["bottom"]["loss"]
            return {"loss": recon + vq, "recon": recon, "vq": vq,
                    "usage_top": out["top"]["usage"], "usage_bottom": out["bottom"]["usage"],
                    "perplexity_top": out["top"]["perplexity"],
                    "perplexity_bottom": out["bottom"]["perplexity"]}
        if phase == "prior_top":
            top, _ = self.encode(x)
            nll = F.cross_entropy(self.prior_top(top, label).float(), top)
            return {"loss": nll, "bits_per_code": nll / math.log(2)}
        if phase == "prior_bottom":
            top, bottom = self.encode(x)
            # trained on the data's top codes (teacher forcing), sampled on the prior's
            nll = F.cross_entropy(self.prior_bottom(bottom, label, top).float(), bottom)
            return {"loss": nll, "bits_per_code": nll / math.log(2)}
        raise ValueError(f"unknown phase {phase!r}; choose one of {self.phases}")

    @torch.no_grad()
    def reconstruct(self, x):
        return self.vqvae(x, update=False)["x_hat"].clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> dict:
        """Per-batch means: reconstruction MSE (pixels in [-1, 1]) and PSNR in dB (per image, on
        [0, 1] pixels), the fraction of each codebook used in the batch, and each prior's NLL in
        bits per code."""
        x, label = batch["image"], batch.get("label")
        out = self.vqvae(x, update=False)
        x_hat = out["x_hat"].float().clamp(-1, 1)
        mse_img = ((x_hat - x.float()) ** 2).flatten(1).mean(1)  # (B,)
        top, bottom = out["top"]["codes"], out["bottom"]["codes"]
        nll_t = F.cross_entropy(self.prior_top(top, label).float(), top)
        nll_b = F.cross_entropy(self.prior_bottom(bottom, label, top).float(), bottom)
        return {"mse": mse_img.mean(),
                "psnr": (10 * torch.log10(4.0 / mse_img.clamp_min(1e-10))).mean(),
                "codes_in_use_top": out["top"]["usage"],
                "codes_in_use_bottom": out["bottom"]["usage"],
                "top_bits_per_code": nll_t / math.log(2),
                "bottom_bits_per_code": nll_b / math.log(2)}

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, label=None) -> torch.Tensor:
        """Algorithm 2: top codes from the top prior, bottom codes from the bottom prior given
        them, then the decoder: (n, C, H, W). label: an int class for all n, or None."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = next(self.parameters()).device
        y = sampling_labels(n, label, self.cfg.num_classes, device)
        top = self.prior_top.sample(n, self.size_t, temperature, y)
        bottom = self.prior_bottom.sample(n, self.size_b, temperature, y, top)
        return self.decode(top, bottom)


# --- sampling ---


# Copied from vqvae.sample_codes
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
