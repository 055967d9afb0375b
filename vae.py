"""Autoencoder, denoising autoencoder and variational autoencoder.

Papers:
- AE:  Hinton & Salakhutdinov 2006, "Reducing the Dimensionality of Data with Neural Networks",
       Science 313(5786).
- DAE: Vincent, Larochelle, Bengio & Manzagol 2008, "Extracting and Composing Robust Features with
       Denoising Autoencoders", ICML.
- VAE: Kingma & Welling 2013, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
- IWAE bound: Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders",
       arXiv:1509.00519.

What is implemented:
- `AE`: x -> z = enc(x) -> x_hat = dec(z), trained by squared error. It learns features, not a
  distribution, so `sample` raises: this is the point the project's notes make about AE and DAE.
- `DAE`: the same network trained to reconstruct x from a corrupted x~ (Gaussian noise, or the
  paper's masking noise that zeroes a random fraction of the inputs).
- `VAE`: q_phi(z|x) = N(mu, diag(sigma^2)) from the encoder, the reparameterisation
  z = mu + sigma * eps (section 2.4), the closed-form KL to p(z) = N(0, I) (appendix B), and the
  ELBO (eq. 3, the SGVB estimator of eq. 7 with one sample). `evaluate` reports the ELBO on the
  test split in nats and bits/dim, and the importance-weighted bound with k samples (Burda et al.
  eq. 8), a tighter lower bound on log p(x).

Deviations from the paper:
- Likelihood. The paper uses a Bernoulli decoder for binarised MNIST and a Gaussian one for
  Frey Face. Our images are 8-bit colour in [-1, 1], so p_theta(x|z) is a Gaussian with the
  decoder's mean and a learned per-channel sigma, *discretised* to the 256 pixel bins (the same
  decoder Ho et al. use for DDPM's last step). A discrete likelihood makes -log p(x) a code length,
  so bits/dim is comparable across models; a continuous density would not be.
- Architecture. `tiny` uses small strided convolutions (the paper's models are one-hidden-layer
  MLPs); the `vae-mnist` preset is the paper's MLP (500 tanh hidden units, J = 20).
- `sample` returns the decoder mean mu_theta(z), not a draw of pixel noise around it.
- KL warm-up (Bowman et al. 2016, arXiv:1511.06349; Sonderby et al. 2016): during the first
  `kl_warmup` fraction of training the KL term is weighted by a factor rising linearly from 0 to 1.
  Without it the short CPU runs fell into posterior collapse (KL -> 0, every sample the same blur)
  within a few hundred steps. The weight is 1 for the rest of training, and `evaluate` always
  reports the true ELBO.

Glossary (paper symbol -> code name):
  x -> x, x~ (corrupted input) -> x_tilde, z -> z, mu -> mu, log sigma^2 -> logvar,
  eps -> eps, J (latent size) -> latent_dim, K (IWAE samples) -> k, D (pixels x channels) -> D.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- config ---

@dataclass
class VAEConfig:
    image_size: int = 32  # H = W of the input images
    in_channels: int = 3  # 3 for RGB, 1 for MNIST-like data
    arch: str = "conv"  # "conv": strided conv encoder, mirrored decoder; "mlp": the paper's MLP
    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; each stage halves the resolution
    hidden: int = 500  # mlp hidden width (Kingma & Welling use 500)
    latent_dim: int = 32  # J, the size of z
    noise: str = "gaussian"  # DAE corruption: "gaussian" (additive) or "mask" (Vincent et al.)
    noise_level: float = 0.3  # DAE: Gaussian std, or the fraction of inputs zeroed by "mask"
    kl_warmup: float = 0.5  # VAE: fraction of training over which the KL weight ramps 0 -> 1 (0: off)


PRESETS = {
    # CPU in minutes on 32x32 shapes; 283,782 parameters for the VAE.
    "tiny": VAEConfig(),
    # Kingma & Welling 2013, section 5 (MNIST): one hidden layer of 500 tanh units, J = 20;
    # 815,825 parameters (the paper's 815,824 plus our learned decoder sigma).
    "vae-mnist": VAEConfig(image_size=28, in_channels=1, arch="mlp", hidden=500, latent_dim=20),
}


# --- likelihood ---

def discretized_gaussian_log_likelihood(x, mu, log_sigma):
    """log p(x) of 8-bit data in [-1, 1] under N(mu, sigma^2) integrated over each pixel's bin.

    Bins have width 2/255; the outermost bins extend to -inf and +inf so the 256 probabilities sum to
    one (Ho et al. 2020, eq. 13). x, mu: (B, C, H, W); log_sigma broadcastable. Returns (B, C, H, W).
    """
    inv_sigma = torch.exp(-log_sigma)
    upper = (x - mu + 1.0 / 255) * inv_sigma
    lower = (x - mu - 1.0 / 255) * inv_sigma
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Phi(upper), for the bottom bin
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log(1 - Phi(lower)), for the top bin
    cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    return torch.where(
        x < -0.999, log_cdf_upper,
        torch.where(x > 0.999, log_one_minus_cdf_lower, torch.log(cdf_delta.clamp(min=1e-12))))


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over the last dim (Kingma & Welling, appendix B):
    -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2). (B, J) -> (B,)"""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


# --- networks ---

class Encoder(nn.Module):
    """x (B, C, H, W) -> (B, out_dim): strided convs then a linear layer, or the paper's MLP."""

    def __init__(self, cfg, out_dim):
        super().__init__()
        if cfg.arch == "mlp":
            D = cfg.in_channels * cfg.image_size ** 2
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(D, cfg.hidden), nn.Tanh(),
                                     nn.Linear(cfg.hidden, out_dim))
            return
        layers, c_in = [], cfg.in_channels
        for c in cfg.channels:
            # 4x4 stride-2 convs halve the resolution (the DCGAN layout), a 3x3 conv adds depth.
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), nn.SiLU()]
            c_in = c
        r = cfg.image_size // 2 ** len(cfg.channels)
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * r * r, out_dim))

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """z (B, J) -> mu_theta(z) (B, C, H, W); mirrors the encoder. The mean is left unbounded: the
    outer bins of the discretised likelihood reach to -inf and +inf, so a black pixel is only
    near-certain when mu can go below -1 (a tanh would cap its probability near 1/2 and push the
    model into ignoring z). Images shown to the user are clamped to [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        C, S = cfg.in_channels, cfg.image_size
        if cfg.arch == "mlp":
            self.net = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden), nn.Tanh(),
                                     nn.Linear(cfg.hidden, C * S * S), nn.Unflatten(1, (C, S, S)))
            return
        chs = list(reversed(cfg.channels))
        r = S // 2 ** len(chs)
        layers = [nn.Linear(cfg.latent_dim, chs[0] * r * r), nn.Unflatten(1, (chs[0], r, r))]
        for i, c in enumerate(chs):
            c_out = chs[i + 1] if i + 1 < len(chs) else chs[-1]
            layers += [nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(),
                       nn.ConvTranspose2d(c, c_out, 4, 2, 1)]  # doubles the resolution
        layers += [nn.SiLU(), nn.Conv2d(chs[-1], C, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def _check(cfg):
    if cfg.arch not in ("conv", "mlp"):
        raise ValueError(f"arch must be 'conv' or 'mlp', not {cfg.arch!r}")
    if cfg.arch == "conv" and cfg.image_size % 2 ** len(cfg.channels):
        raise ValueError(f"image_size {cfg.image_size} must be divisible by 2^{len(cfg.channels)} "
                         f"for {len(cfg.channels)} conv stages")
    if cfg.noise not in ("gaussian", "mask"):
        raise ValueError(f"noise must be 'gaussian' or 'mask', not {cfg.noise!r}")


# --- models ---

class AE(nn.Module):
    """Deterministic autoencoder (Hinton & Salakhutdinov 2006): minimise ||x - dec(enc(x))||^2."""

    def __init__(self, config):
        super().__init__()
        _check(config)
        self.config = config
        self.encoder = Encoder(config, self.encoder_dim())
        self.decoder = Decoder(config)

    def encoder_dim(self):
        return self.config.latent_dim

    def corrupt(self, x):
        return x  # the plain AE sees its input unchanged

    def encode(self, x):
        """x (B, C, H, W) -> z (B, J)."""
        return self.encoder(x)

    def reconstruct(self, x):
        return self.decoder(self.encode(x)).clamp(-1, 1)

    def loss(self, batch):
        x = batch["image"]
        x_hat = self.decoder(self.encode(self.corrupt(x)))
        mse = (x_hat.float() - x).pow(2).mean()
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def evaluate(self, batch):
        x = batch["image"]
        mse = (self.reconstruct(x).float() - x).pow(2).flatten(1).mean(1)  # (B,)
        psnr = 10 * torch.log10(4.0 / mse)  # peak-to-peak range of [-1, 1] is 2, squared 4
        return {"mse": mse.mean(), "psnr": psnr.mean()}

    def sample(self, n):
        raise NotImplementedError(
            f"{type(self).__name__} learns no distribution over its codes, so it cannot sample; "
            "use --reconstruct, or train a vae")


class DAE(AE):
    """Denoising autoencoder (Vincent et al. 2008): reconstruct x from a corrupted x~ ~ q(x~|x)."""

    def corrupt(self, x):
        if not self.training:
            return x
        if self.config.noise == "mask":
            # Masking noise: a random fraction of the inputs is set to the background value.
            keep = torch.rand_like(x) >= self.config.noise_level
            return torch.where(keep, x, torch.full_like(x, -1.0))
        return x + self.config.noise_level * torch.randn_like(x)


class VAE(AE):
    """Variational autoencoder (Kingma & Welling 2013) with a discretised Gaussian decoder."""

    def __init__(self, config):
        super().__init__(config)
        # log sigma of p_theta(x|z), one per channel; starts wide so early gradients are useful.
        self.log_sigma = nn.Parameter(torch.full((config.in_channels, 1, 1), math.log(0.3)))
        self.kl_weight = 1.0  # set by set_progress during the KL warm-up

    def set_progress(self, step, total_steps, phase=None):
        """KL warm-up: weight min(1, step / (kl_warmup * total_steps)) on the KL term."""
        ramp = self.config.kl_warmup * total_steps
        self.kl_weight = min(1.0, step / ramp) if ramp > 0 else 1.0

    def encoder_dim(self):
        return 2 * self.config.latent_dim  # mu and log sigma^2

    def encode(self, x):
        """x (B, C, H, W) -> mu, logvar, each (B, J)."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def reconstruct(self, x):
        return self.decoder(self.encode(x)[0]).clamp(-1, 1)

    def log_px_given_z(self, x, z):
        """log p_theta(x|z) summed over pixels. x (B, C, H, W), z (B, J) -> (B,)"""
        mu_x = self.decoder(z).float()
        return discretized_gaussian_log_likelihood(x, mu_x, self.log_sigma).flatten(1).sum(1)

    def elbo_terms(self, x):
        """One-sample SGVB estimate (eq. 10): reconstruction log p(x|z) and KL, each (B,)."""
        mu, logvar = self.encode(x)
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation, section 2.4
        return self.log_px_given_z(x, z), gaussian_kl(mu, logvar)

    def loss(self, batch):
        x = batch["image"]
        D = x[0].numel()
        log_px, kl = self.elbo_terms(x)
        nll = (kl - log_px).mean()  # -ELBO in nats per image
        objective = (self.kl_weight * kl - log_px).mean()  # = -ELBO once the warm-up is over
        return {"loss": objective / D, "recon_nats": -log_px.mean(), "kl_nats": kl.mean(),
                "bpd": nll / (D * math.log(2))}

    @torch.no_grad()
    def iwae_bound(self, x, k):
        """Burda et al. eq. 8: log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x). (B,) in nats."""
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        log_w = []
        for _ in range(k):
            eps = torch.randn_like(mu)
            z = mu + std * eps
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
            log_qz = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(1)
            log_w.append(self.log_px_given_z(x, z) + log_pz - log_qz)
        return torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k)

    @torch.no_grad()
    def evaluate(self, batch, iwae_k=0):
        """Test-split figures: the ELBO (and, with iwae_k > 0, the IWAE bound) in nats and bits/dim."""
        x = batch["image"]
        D = x[0].numel()
        log_px, kl = self.elbo_terms(x)
        elbo = log_px - kl
        out = {"elbo_nats": elbo.mean(), "elbo_bpd": -elbo.mean() / (D * math.log(2)),
               "recon_nats": -log_px.mean(), "kl_nats": kl.mean()}
        out.update({k: v for k, v in super().evaluate(batch).items()})
        if iwae_k > 0:
            iwae = self.iwae_bound(x, iwae_k)
            out["iwae_nats"] = iwae.mean()
            out["iwae_bpd"] = -iwae.mean() / (D * math.log(2))
        return out

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        """z ~ N(0, T^2 I) -> mu_theta(z). Returns (n, C, H, W) in [-1, 1]."""
        device = self.log_sigma.device
        z = temperature * torch.randn(n, self.config.latent_dim, device=device)
        return self.decoder(z).float().clamp(-1, 1)
