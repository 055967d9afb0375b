"""Denoising diffusion probabilistic models: DDPM and Improved DDPM.

Papers:
- Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239.
- Nichol, Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021, arXiv:2102.09672.
- Song, Meng, Ermon, "Denoising Diffusion Implicit Models", 2021, arXiv:2010.02502 (DDIM sampling).
- Salimans, Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", 2022,
  arXiv:2202.00512 (v prediction, section 4).

What is implemented:
- the forward (noising) process q(x_t | x_0) with the linear schedule of Ho et al. and the cosine
  schedule of Improved DDPM (eq. 17), kept in float64;
- the reverse process p(x_{t-1} | x_t) with eps, x_0 or v prediction and fixed-small (beta_tilde),
  fixed-large (beta) or learned-range variance (Improved DDPM eq. 15);
- the losses L_simple (Ho eq. 14), L_vlb (Ho eq. 5, with the discretized Gaussian decoder of
  section 3.3) and L_hybrid = L_simple + 0.001 L_vlb (Improved DDPM eq. 16) with the stop-gradient
  on the mean inside the vlb term, and importance sampling of t for L_vlb (Improved DDPM eq. 18);
- the exact VLB in bits/dim (all T terms, the prior term L_T and the decoder term L_0);
- ancestral sampling (Ho algorithm 2), respaced sampling on a subsequence of steps (Improved DDPM
  section 4: the betas are rebuilt from the kept alpha_bar) and DDIM sampling with eta (Song et al.
  eq. 12); the model always sees the ORIGINAL time indices 0..T-1;
- Ho et al.'s U-Net and its Improved DDPM variant (scale-shift norm, multi-head attention, a
  second output for the variance), with the papers' CIFAR-10 presets.
- `load_openai(path)`: Nichol & Dhariwal's released checkpoints (cifar10_uncond_50M_500K.pt,
  imagenet64_uncond_100M_1500K.pt), checked key for key and mapped onto this U-Net: their module
  names, their per-head qkv rows and Conv1d projections are rearranged by the loader; their time
  embedding ([cos, sin] over half, with t fed as t * 1000 / T) is the config's
  `time_embedding="iddpm"` and `rescale_timesteps=True`, since it is not a permutation of Ho's.

Deviations and choices (stated openly):
- Time steps are indexed 0..T-1 in code; the paper's t = 1..T is code t + 1.
- While sampling, the predicted x_0 is clipped to [-1, 1] (Ho et al.'s and Nichol & Dhariwal's
  released code does this; the papers do not mention it). It keeps the mean inside the data range
  when the network's x_0 estimate is poor at large t. `clip_denoised=False` turns it off; the VLB
  evaluation never clips, so it stays the exact bound.
- The discretized decoder uses the exact normal CDF (erf) instead of the tanh approximation of
  the released code.
- `cond_fn` in the samplers is a hook for classifier guidance (Dhariwal & Nichol 2021, used by
  guided.py); DDPM itself never passes one.

Glossary (paper symbol -> code name; names used by other code in brackets):
  T                   num_timesteps
  beta_t              betas
  alpha_t = 1-beta_t  alphas
  alpha_bar_t         alpha_bar             [alphas_cumprod]
  beta_tilde_t        posterior_variance    (Ho eq. 7)
  mu_tilde_t          posterior mean        (Ho eq. 7)
  eps, eps_theta      noise, model output under prediction="eps"
  v                   sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0   (Salimans & Ho)
  Sigma_theta         model variance; "v" of Improved DDPM eq. 15 is the model's extra output,
                      here `var_frac` to keep it apart from the v of v prediction
  L_t                 KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in nats, per pixel mean
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- config ---


@dataclass
class DDPMConfig:
    # data
    image_size: int = 32                 # H = W of the images
    in_channels: int = 3                 # C of the images
    # U-Net (Ho et al. appendix B; Improved DDPM section 3 and appendix A)
    ch: int = 128                        # channels at the first resolution
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)   # channel multiplier per resolution; len-1 downsamplings
    num_res_blocks: int = 2              # residual blocks per resolution (the up path has one more)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    num_heads: int = 1                   # attention heads (Ho: 1; Improved DDPM: 4)
    dropout: float = 0.1                 # dropout inside the residual blocks
    scale_shift_norm: bool = False       # Improved DDPM: GroupNorm(h) (1 + scale) + shift from the time embedding
    time_embedding: str = "ho"           # "ho" (Ho's code) or "iddpm" (Nichol & Dhariwal's); see timestep_embedding
    rescale_timesteps: bool = False      # feed the network t * 1000 / T (Nichol & Dhariwal's released models)
    # diffusion
    T: int = 1000                        # number of diffusion steps
    schedule: str = "linear"             # beta schedule: linear (Ho) or cosine (Improved DDPM eq. 17)
    prediction: str = "eps"              # model target: eps, x_0 or v
    variance: str = "fixed_large"        # fixed_small, fixed_large or learned_range (Improved DDPM eq. 15)
    loss: str = "simple"                 # simple (Ho eq. 14), hybrid (Improved DDPM eq. 16) or vlb (eq. 18, importance-sampled t)


PRESETS = {
    # CPU in minutes (see README for the measured run): three resolutions, attention at 8x8,
    # T = 1000 as the paper so every sampler of the paper can be tried on it
    "tiny": DDPMConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
    # one GPU, hours: Ho's architecture at half width
    "small": DDPMConfig(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # Ho et al. CIFAR-10 (appendix B; released run_cifar.py): 35,746,307 parameters ("35.7M")
    "ddpm-cifar10": DDPMConfig(),
    # Improved DDPM CIFAR-10 (section 3, appendix A; released README flags): learned sigma, 3 res blocks,
    # attention at 16 and 8 with 4 heads, scale-shift norm, dropout 0.3, cosine schedule, T = 4000,
    # L_hybrid: 52,546,438 parameters
    "iddpm-cifar10": DDPMConfig(num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4, dropout=0.3,
                                scale_shift_norm=True, T=4000, schedule="cosine", variance="learned_range",
                                loss="hybrid"),
    # Nichol & Dhariwal's released checkpoints (improved-diffusion README flags): iddpm-cifar10 with
    # their time embedding and t rescaled to 0..1000; 52,546,438 parameters
    "cifar10_uncond_50M_500K": DDPMConfig(num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4, dropout=0.3,
                                          scale_shift_norm=True, time_embedding="iddpm", rescale_timesteps=True,
                                          T=4000, schedule="cosine", variance="learned_range", loss="hybrid"),
    # ... and ImageNet 64x64, unconditional, dropout 0: 121,063,942 parameters
    "imagenet64_uncond_100M_1500K": DDPMConfig(image_size=64, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                               attn_resolutions=(16, 8), num_heads=4, dropout=0.0,
                                               scale_shift_norm=True, time_embedding="iddpm",
                                               rescale_timesteps=True, T=4000, schedule="cosine",
                                               variance="learned_range", loss="hybrid"),
}


# --- diffusion process ---


def make_beta_schedule(name, T):
    """The noise schedule beta_1..beta_T as a float64 tensor of shape (T,).

    "linear": Ho et al. section 4, beta from 1e-4 to 0.02 at T = 1000; for other T both ends are
        scaled by 1000 / T (Improved DDPM, appendix / released code) so that alpha_bar_T stays
        close to the T = 1000 value.
    "cosine": Improved DDPM eq. 17, alpha_bar(t) = f(t) / f(0) with
        f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, s = 0.008, and
        beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999 to avoid the singularity
        at t = T.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if name == "linear":
        if T <= 20:
            raise ValueError(f"the linear schedule needs T > 20 (beta_T = 20/T must stay below 1), got T={T}")
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # f(0) cancels in ratios
        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")


def _gather(a, t, x):
    """a[t] for a (T,) float64 table and (B,) long t, cast to x's dtype, shape (B, 1, ..., 1)."""
    return a.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _model_device(model):
    """The device of a module's first parameter; CPU for plain callables or parameterless modules."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) for images x in [-1, 1] quantized to 256 levels, under N(mean, e^{2 log_scale}).

    Ho et al. eq. 13: each level owns a bin of width 2/255 around it; the edge bins extend to
    -inf and +inf so that the 256 bin probabilities sum to 1. Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def space_timesteps(T, steps):
    """`steps` time indices spread evenly over 0..T-1, always keeping 0 and T-1 (for steps > 1)."""
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in 1..{T}, got {steps!r}")
    if steps == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})


class GaussianDiffusion:
    """The forward process q and the reverse process p around an arbitrary model (Ho et al. 2020).

    A plain object, not a module: its tables are float64 and stay outside the model's state dict,
    so they are neither cast by autocast nor saved (they follow from the config).

    Args:
        betas: (T,) schedule, from `make_beta_schedule`.
        prediction: what the model predicts: "eps" (Ho eq. 11), "x_0", or "v" (Salimans & Ho).
        variance: "fixed_small" (sigma^2 = beta_tilde), "fixed_large" (sigma^2 = beta; Ho section
            3.2) or "learned_range" (Improved DDPM eq. 15; the model returns 2C channels).
        loss: "simple" (Ho eq. 14), "hybrid" (Improved DDPM eq. 16) or "vlb" (Ho eq. 5).
        timestep_map: (T,) original time index of each step; set by `respace`, identity otherwise.
    """

    def __init__(self, betas, prediction="eps", variance="fixed_small", loss="simple", timestep_map=None):
        if prediction not in ("eps", "x_0", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; use 'eps', 'x_0' or 'v'")
        if variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"unknown variance {variance!r}; use 'fixed_small', 'fixed_large' or 'learned_range'")
        if loss not in ("simple", "hybrid", "vlb"):
            raise ValueError(f"unknown loss {loss!r}; use 'simple', 'hybrid' or 'vlb'")
        self.prediction, self.variance, self.loss_type = prediction, variance, loss
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        if self.betas.dim() != 1 or not ((self.betas > 0) & (self.betas < 1)).all():
            raise ValueError("betas must be a 1-d tensor with values in (0, 1)")
        self.num_timesteps = T = len(self.betas)
        self.timestep_map = (torch.arange(T, device=self.betas.device) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long, device=self.betas.device))
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)                        # alpha_bar_t = prod_s alpha_s
        self.alpha_bar_prev = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # Ho eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        self.posterior_variance = self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde_0 = 0; its log is clipped to beta_tilde_1, as in the released code (Improved
        # DDPM eq. 15 interpolates in log space, which needs a finite lower end at t = 0)
        post_var_1 = self.posterior_variance[1] if T > 1 else self.betas[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var_1.reshape(1), self.posterior_variance[1:]]))
        # Ho eq. 7: mu_tilde_t = coef1 x_0 + coef2 x_t
        self.posterior_mean_coef1 = self.betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)

    def to(self, device):
        """Move every table to `device` (in place; a no-op when already there), so that gathering
        from them inside the training loop never copies from the host."""
        device = torch.device(device)
        if self.betas.device != device:
            for k, v in vars(self).items():
                if torch.is_tensor(v):
                    setattr(self, k, v.to(device))
        return self

    # --- respacing ---

    def respace(self, steps):
        """A diffusion on `steps` evenly spaced time steps of this one (Improved DDPM section 4).

        For kept indices S_1 < ... < S_K the new process keeps alpha_bar_{S_i} and rebuilds
        beta_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}} (alpha_bar_{S_0} = 1), so sampling can
        take fewer steps than training without retraining. `timestep_map` remembers S_i so the
        model still sees the original time index. `steps` may also be a list of the indices to
        keep (a released model's own spacing, such as GLIDE's "fast27").
        """
        if steps is None or steps == self.num_timesteps:
            return self
        if isinstance(steps, (list, tuple)):
            kept = sorted(set(steps))
            if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
                raise ValueError(f"time indices must lie in 0..{self.num_timesteps - 1}")
        else:
            kept = space_timesteps(self.num_timesteps, steps)
        ab = self.alpha_bar[kept]
        betas = 1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
        return GaussianDiffusion(betas, self.prediction, self.variance, self.loss_type,
                                 timestep_map=self.timestep_map[kept])

    # --- forward process q ---

    def q_sample(self, x_0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) (Ho eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x_0: (B, C, H, W); t: (B,) long in 0..T-1; returns (B, C, H, W).
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        return _gather(self.sqrt_alpha_bar, t, x_0) * x_0 + _gather(self.sqrt_one_minus_alpha_bar, t, x_0) * noise

    def q_mean_variance(self, x_0, t):
        """Mean, variance and log variance of q(x_t | x_0) (Ho eq. 4)."""
        mean = _gather(self.sqrt_alpha_bar, t, x_0) * x_0
        return mean, _gather(1.0 - self.alpha_bar, t, x_0), _gather(torch.log(1.0 - self.alpha_bar), t, x_0)

    def q_posterior_mean_variance(self, x_0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho eq. 6-7).

        mu_tilde_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                     + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
        """
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x_0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t), _gather(self.posterior_log_variance_clipped, t, x_t)

    # --- conversions between the model's targets ---

    def predict_x_0_from_eps(self, x_t, t, eps):
        """Ho eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * eps) / _gather(self.sqrt_alpha_bar, t, x_t)

    def predict_eps_from_x_0(self, x_t, t, x_0):
        """Ho eq. 4 solved for eps: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return (x_t - _gather(self.sqrt_alpha_bar, t, x_t) * x_0) / _gather(self.sqrt_one_minus_alpha_bar, t, x_t)

    def predict_x_0_from_v(self, x_t, t, v):
        """Salimans & Ho section 4: x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
        return _gather(self.sqrt_alpha_bar, t, x_t) * x_t - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * v

    def training_target(self, x_0, t, noise):
        """What the model regresses on under L_simple: eps, x_0, or v = sqrt(ab) eps - sqrt(1-ab) x_0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x_0":
            return x_0
        return _gather(self.sqrt_alpha_bar, t, x_0) * noise - _gather(self.sqrt_one_minus_alpha_bar, t, x_0) * x_0

    # --- reverse process p ---

    def model_output_to_mean_variance(self, out, x_t, t, clip_denoised=False):
        """Turn a raw model output into p(x_{t-1} | x_t) = N(mean, variance).

        out: (B, C, H, W), or (B, 2C, H, W) under learned_range, whose second half is Improved
        DDPM's v in [-1, 1] (eq. 15): log Sigma = v' log beta_t + (1 - v') log beta_tilde_t with
        v' = (v + 1) / 2. The mean is mu_tilde(x_0_hat, x_t) (Ho eq. 7 with eq. 11's x_0 estimate),
        which for eps prediction equals Ho eq. 11. Returns a dict of mean, variance, log_variance,
        pred_x_0, pred_eps, each (B, C, H, W) in x_t's dtype.
        """
        C = x_t.shape[1]
        if self.variance == "learned_range":
            assert out.shape[1] == 2 * C, f"learned_range needs 2C = {2 * C} output channels, got {out.shape[1]}"
            out, var_frac = out[:, :C], out[:, C:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(torch.log(self.betas), t, x_t)
            frac = (var_frac + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            assert out.shape[1] == C, f"fixed variance needs {C} output channels, got {out.shape[1]}"
            if self.variance == "fixed_large":
                # sigma^2 = beta_t; at t = 0 beta_tilde_1 instead, as in the released code, which
                # gives the decoder L_0 a sensible width
                table = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_timesteps > 1 else self.betas
                variance, log_variance = _gather(table, t, x_t), _gather(torch.log(table), t, x_t)
            else:  # fixed_small: sigma^2 = beta_tilde_t (0 at t = 0, where no noise is added)
                variance = _gather(self.posterior_variance, t, x_t)
                log_variance = _gather(self.posterior_log_variance_clipped, t, x_t)
        if self.prediction == "eps":
            pred_x_0 = self.predict_x_0_from_eps(x_t, t, out)
        elif self.prediction == "x_0":
            pred_x_0 = out
        else:
            pred_x_0 = self.predict_x_0_from_v(x_t, t, out)
        if clip_denoised:
            pred_x_0 = pred_x_0.clamp(-1, 1)
        pred_eps = self.predict_eps_from_x_0(x_t, t, pred_x_0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x_0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_x_0": pred_x_0, "pred_eps": pred_eps}

    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None):
        """Run the model at step t of this process and return p(x_{t-1} | x_t) (see above).

        The model is called as model(x_t, T_orig, **model_kwargs), T_orig the ORIGINAL time index
        (it differs from t only for a respaced process). The output is cast to at least float32
        for the maths, so a bf16 model never touches the schedule arithmetic.
        """
        out = model(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return self.model_output_to_mean_variance(out.to(dtype), x_t.to(dtype), t, clip_denoised)

    # --- samplers ---

    def condition_mean(self, cond_fn, p, x_t, t, model_kwargs=None):
        """Shift the ancestral mean by Sigma grad_x log p(y | x_t) (Dhariwal & Nichol 2021, alg. 1).

        A hook for classifier guidance (guided.py); cond_fn(x_t, t_orig, **model_kwargs) returns
        the (scaled) gradient, shape of x_t. The samplers run under no_grad, so cond_fn must
        enable gradients itself (torch.enable_grad()).
        """
        grad = cond_fn(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        return p["mean"] + p["variance"] * grad.to(p["mean"].dtype)

    def condition_score(self, cond_fn, p, x_t, t, model_kwargs=None):
        """Shift eps by -sqrt(1 - alpha_bar_t) grad_x log p(y | x_t) (Dhariwal & Nichol 2021, alg. 2).

        The DDIM counterpart of `condition_mean` (a score shift); returns updated pred_x_0, pred_eps.
        """
        grad = cond_fn(x_t, self.timestep_map.to(x_t.device)[t], **(model_kwargs or {}))
        eps = p["pred_eps"] - _gather(self.sqrt_one_minus_alpha_bar, t, x_t) * grad.to(p["pred_eps"].dtype)
        return self.predict_x_0_from_eps(x_t, t, eps), eps

    def p_sample(self, model, x_t, t, clip_denoised=True, cond_fn=None, model_kwargs=None):
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (Ho algorithm 2, line 4):
        x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at t = 0.

        x_t: (B, C, H, W); t: (B,) long step of this process. Returns {"sample", "pred_x_0"}.
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        mean = self.condition_mean(cond_fn, p, x_t, t, model_kwargs) if cond_fn is not None else p["mean"]
        z = torch.randn_like(mean)
        nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        x_prev = mean + nonzero * torch.exp(0.5 * p["log_variance"]) * z
        return {"sample": x_prev.to(x_t.dtype), "pred_x_0": p["pred_x_0"]}

    def ddim_sample(self, model, x_t, t, eta=0.0, clip_denoised=True, cond_fn=None, model_kwargs=None):
        """One DDIM step (Song et al. 2021, eq. 12, with sigma from eq. 16):
        x_{t-1} = sqrt(alpha_bar_{t-1}) x_0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
        sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1}).
        eta = 0 is deterministic; eta = 1 is the ancestral sampler with sigma^2 = beta_tilde.
        eps_hat is recomputed from the (clipped) x_0_hat so that the two agree.
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        if cond_fn is not None:
            pred_x_0, _ = self.condition_score(cond_fn, p, x_t, t, model_kwargs)
        else:
            pred_x_0 = p["pred_x_0"]
        xt = x_t.to(pred_x_0.dtype)
        eps = self.predict_eps_from_x_0(xt, t, pred_x_0)
        ab, ab_prev = _gather(self.alpha_bar, t, xt), _gather(self.alpha_bar_prev, t, xt)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = ab_prev.sqrt() * pred_x_0 + torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0)) * eps
        z = torch.randn_like(xt)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return {"sample": (mean + nonzero * sigma * z).to(x_t.dtype), "pred_x_0": pred_x_0}

    def sample_steps(self, model, shape, steps=None, eta=None, noise=None, model_kwargs=None,
                     progress=False, clip_denoised=True, cond_fn=None, device=None):
        """Yield {"sample", "pred_x_0", "t"} after each reverse step, from x_T ~ N(0, I) to x_0.

        steps: None runs all T steps; k runs k evenly spaced steps (`respace`).
        eta: None is ancestral sampling (`p_sample`); a number is DDIM with that eta.
        noise: optional x_T of shape `shape`; otherwise drawn from the global torch RNG.
        """
        diffusion = self.respace(steps)
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        x = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
        K = diffusion.num_timesteps
        for k, i in enumerate(reversed(range(K))):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                if eta is None:
                    out = diffusion.p_sample(model, x, t, clip_denoised, cond_fn, model_kwargs)
                else:
                    out = diffusion.ddim_sample(model, x, t, eta, clip_denoised, cond_fn, model_kwargs)
            x = out["sample"]
            if progress and (k + 1 == K or (k + 1) % max(1, K // 50) == 0):
                print(f"\rsampling: step {k + 1}/{K}", end="\n" if k + 1 == K else "", file=sys.stderr, flush=True)
            yield {**out, "t": t}

    def sample(self, model, shape, steps=None, eta=None, noise=None, model_kwargs=None,
               progress=False, clip_denoised=True, cond_fn=None, device=None):
        """Generate x_0 of `shape` (Ho algorithm 2; see `sample_steps` for the options)."""
        out = None
        for out in self.sample_steps(model, shape, steps, eta, noise, model_kwargs, progress,
                                     clip_denoised, cond_fn, device):
            pass
        return out["sample"]

    # --- losses and the variational bound ---

    def vb_terms_bpd(self, p, x_0, x_t, t):
        """The VLB term of step t in bits/dim, shape (B,) (Ho eq. 5):
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (code index), and
        L_0 = -log p(x_0 | x_1) with the discretized Gaussian decoder (Ho eq. 13) at code t = 0.
        `p` is the dict of `model_output_to_mean_variance`.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_0, p["mean"], 0.5 * p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,) (Ho eq. 5); ~0 for a good schedule."""
        t = torch.full((x_0.shape[0],), self.num_timesteps - 1, device=x_0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_0, t)
        return normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).mean(1) / math.log(2.0)

    def training_losses(self, model, x_0, t, noise=None, model_kwargs=None):
        """Per-example losses at steps t, each (B,); "loss" is the one to minimise.

        simple: L_simple = ||target - model(x_t, t)||^2, mean over pixels (Ho eq. 14; target eps,
            x_0 or v). With learned_range only the first C channels enter it.
        hybrid: L_simple + lambda L_vlb, lambda = 0.001 (Improved DDPM eq. 16). L_vlb = sum_t L_t
            is estimated as T L_t, so the term is T / 1000 L_t. The mean output is detached
            inside it, so L_vlb trains only the variance (Improved DDPM section 3.1).
        vlb: T L_t (Ho eq. 5, one-sample estimate of the sum); the caller may reweight it for
            importance sampling (Improved DDPM eq. 18).
        x_0: (B, C, H, W) in [-1, 1]; t: (B,) long in 0..T-1.
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        out = model(x_t, self.timestep_map.to(x_0.device)[t], **(model_kwargs or {}))
        dtype = torch.promote_types(x_0.dtype, torch.float32)
        out, x_0f, x_tf = out.to(dtype), x_0.to(dtype), x_t.to(dtype)
        C, T = x_0.shape[1], self.num_timesteps
        terms = {}
        if self.loss_type in ("hybrid", "vlb"):
            frozen = out
            if self.loss_type == "hybrid":
                frozen = torch.cat([out[:, :C].detach(), out[:, C:]], 1) if out.shape[1] > C else out.detach()
            p = self.model_output_to_mean_variance(frozen, x_tf, t, clip_denoised=False)
            terms["vb"] = self.vb_terms_bpd(p, x_0f, x_tf, t) * (T / 1000.0 if self.loss_type == "hybrid" else T)
        if self.loss_type in ("simple", "hybrid"):
            target = self.training_target(x_0f, t, noise.to(dtype))
            terms["mse"] = ((target - out[:, :C]) ** 2).flatten(1).mean(1)
        terms["loss"] = terms.get("mse", 0) + terms.get("vb", 0)
        return terms

    def calc_bpd(self, model, x_0, model_kwargs=None):
        """The full VLB in bits/dim, per example (Ho eq. 5, all T + 1 terms):
        -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0. Returns {"bpd", "prior_bpd", "vb"} with
        "bpd" and "prior_bpd" (B,) and "vb" (B, T). Costs T model evaluations; never clips x_0.
        """
        B, T = x_0.shape[0], self.num_timesteps
        vb = []
        for i in range(T):
            t = torch.full((B,), i, device=x_0.device, dtype=torch.long)
            x_t = self.q_sample(x_0, t)
            with torch.no_grad():
                p = self.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            dtype = p["mean"].dtype
            vb.append(self.vb_terms_bpd(p, x_0.to(dtype), x_t.to(dtype), t))
        vb = torch.stack(vb, 1)                                               # (B, T)
        prior = self.prior_bpd(x_0.to(vb.dtype))
        return {"bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb}


# --- U-Net ---


def timestep_embedding(t, dim, kind="ho"):
    """Sinusoidal embedding of the (original) time index, as the Transformer's positions (Ho et al.
    appendix B): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1)). t: (B,) -> (B, dim).

    kind "iddpm" is the variant of Nichol & Dhariwal's released code, which their checkpoints
    need: [cos(t w_i), sin(t w_i)] with w_i = 10000^(-i / (dim/2)) (not a permutation of Ho's:
    the frequencies differ too)."""
    if kind not in ("ho", "iddpm"):
        raise ValueError(f"unknown time_embedding {kind!r}; use 'ho' or 'iddpm'")
    half = dim // 2
    denom = max(half - 1, 1) if kind == "ho" else half
    w = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / denom)
    arg = t.float()[:, None] * w[None]                                    # (B, dim/2)
    if kind == "ho":
        return torch.cat([torch.sin(arg), torch.cos(arg)], 1)             # (B, dim)
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1)                 # (B, dim)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16 or fp16 input in its own dtype under autocast.

    Autocast runs group_norm in float32: a cast of the activation up, the norm, and the following
    SiLU in float32, then a cast back down for the next convolution, with the float32 copy saved
    for the backward pass. The kernel already accumulates mean and variance in float32 for half
    inputs, so calling it on the half tensor gives the same statistics, rounds only the output (as
    ADM's GroupNorm32 does: normalise in float32, cast back), and moves a third of the bytes.
    """

    def forward(self, x):
        if x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def norm(channels):
    """GroupNorm with 32 groups (Ho et al. replace weight norm by group norm, appendix B); fewer
    when a small config has channel counts that 32 does not divide."""
    return GroupNorm(math.gcd(32, channels), channels)


def zero_init(module):
    """Zero a layer's parameters, so a residual branch starts as the identity (Ho's released code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block with the time embedding added between the two convolutions (Ho et al.
    appendix B). With scale_shift_norm (Improved DDPM) the embedding gives (scale, shift) and
    h = GroupNorm(h) (1 + scale) + shift instead of h + emb. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in, c_out, emb_dim, dropout, scale_shift_norm):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out if scale_shift_norm else c_out)
        self.norm2, self.dropout = norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]                 # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, 1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H W positions (Ho et al. appendix B: one head; Improved DDPM: several),
    residual, with the output projection zero-initialised. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, num_heads):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads; change num_heads")
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        nh = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, nh, C // nh, H * W)   # (B, 3, nh, hs, HW)
        # channels last in memory: the fused (flash) kernels need it; else SDPA falls back to the
        # unfused maths, which under autocast runs in float32
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)            # each (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)                       # (B, nh, HW, hs)
        h = h.transpose(-1, -2).reshape(B, C, H, W)                       # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (Ho's resamp_with_conv)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 convolution (Ho's resamp_with_conv)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Ho et al.'s U-Net (a PixelCNN++-style backbone, appendix B), the Improved DDPM variant by config.

    forward(x_t, t): x_t (B, C, H, W), t (B,) long original time index -> (B, C, H, W), or
    (B, 2C, H, W) under learned_range (eps and Improved DDPM's v of eq. 15).
    Down path: per resolution `num_res_blocks` ResBlocks (+ attention where listed), then a
    Downsample except at the last; middle: ResBlock, attention, ResBlock; up path: per resolution
    `num_res_blocks + 1` ResBlocks, each fed the concatenation with a stored down-path activation.
    """

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        if cfg.time_embedding not in ("ho", "iddpm"):
            raise ValueError(f"unknown time_embedding {cfg.time_embedding!r}; use 'ho' or 'iddpm'")
        ch, emb_dim = cfg.ch, 4 * cfg.ch
        c_out = cfg.in_channels * (2 if cfg.variance == "learned_range" else 1)
        res_block = lambda c_in, c_out_: ResBlock(c_in, c_out_, emb_dim, cfg.dropout, cfg.scale_shift_norm)
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chans, c, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(c, ch * mult)]
                c = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(c, cfg.num_heads))
                self.down.append(nn.ModuleList(layers))
                skip_chans.append(c)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(c)]))
                skip_chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([res_block(c, c), AttnBlock(c, cfg.num_heads), res_block(c, c)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(c + skip_chans.pop(), ch * mult)]
                c = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(c, cfg.num_heads))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(c))
                    res *= 2
                self.up.append(nn.ModuleList(layers))
        self.norm_out = norm(c)
        self.conv_out = zero_init(nn.Conv2d(c, c_out, 3, padding=1))

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t):
        cfg = self.config
        if cfg.rescale_timesteps:  # the released improved-diffusion models saw t in [0, 1000)
            t = t.float() * (1000.0 / cfg.T)
        emb = self.time_embed(timestep_embedding(t, cfg.ch, cfg.time_embedding))  # (B, 4 ch)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], 1), emb)     # (B, C + C_skip, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- the trainable model ---


class DDPM(nn.Module):
    """A U-Net eps/x_0/v model with its Gaussian diffusion: what train.py trains and sample.py samples.

    loss(batch): L_simple, L_hybrid or L_vlb (config.loss) at uniformly drawn t, except that L_vlb
    draws t by importance sampling (Improved DDPM eq. 18): p_t ∝ sqrt(E[L_t^2]) over the last 10
    values of each L_t, uniform until every t has 10, mixed with 0.1% uniform as in the released
    code, and each term weighted by 1 / (T p_t) so the estimate stays unbiased.
    The history lives in buffers (saved with the checkpoint) and is updated without host syncs.
    """

    history_len = 10  # losses remembered per t for the importance sampler

    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.image_size % 2 ** (len(config.ch_mult) - 1):
            raise ValueError(f"image_size {config.image_size} is not divisible by 2^{len(config.ch_mult) - 1} "
                             f"(one halving per extra entry of ch_mult)")
        self.net = UNet(config)
        with torch.device("cpu"):  # float64 tables on the host, also for a model built on the meta device
            self.diffusion = GaussianDiffusion(make_beta_schedule(config.schedule, config.T),
                                               config.prediction, config.variance, config.loss)
        if config.loss == "vlb":
            # row T is a scratch row that absorbs writes beyond the last 10 of one batch
            self.register_buffer("loss_history", torch.zeros(config.T + 1, self.history_len, dtype=torch.float64))
            self.register_buffer("loss_count", torch.zeros(config.T, dtype=torch.long))

    def forward(self, x_t, t):
        return self.net(x_t, t)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() move the parameters; the float64 schedule tables follow them
        out = super()._apply(fn, *args, **kwargs)
        p = next(self.parameters(), None)
        if p is not None:
            self.diffusion.to(p.device)
        return out

    # --- importance sampling of t (Improved DDPM eq. 18) ---

    def _importance_probs(self):
        T = self.config.T
        w = self.loss_history[:T].pow(2).mean(1).sqrt()                       # sqrt(E[L_t^2]), (T,)
        p = w / w.sum().clamp(min=1e-300) * (1 - 1e-3) + 1e-3 / T
        warm = (self.loss_count >= self.history_len).all()
        return torch.where(warm, p, torch.full_like(p, 1.0 / T))

    def _update_history(self, t, losses):
        """Append each example's L_t to the ring buffer of its t; batch order decides ties."""
        T, L = self.config.T, self.history_len
        t_sorted, order = torch.sort(t, stable=True)
        first = torch.searchsorted(t_sorted, t_sorted)                      # start of each t's group
        rank = torch.arange(len(t), device=t.device) - first
        n_t = torch.bincount(t, minlength=T)
        keep = rank >= n_t[t_sorted] - L                                    # only the last L of a group
        pos = (self.loss_count[t_sorted] + rank) % L
        row = torch.where(keep, t_sorted, torch.full_like(t_sorted, T))
        self.loss_history.index_put_((row, pos), losses.detach()[order].to(self.loss_history.dtype))
        self.loss_count += n_t

    # --- training, sampling, evaluation ---

    def loss(self, batch):
        x_0 = batch["image"]
        B, T = x_0.shape[0], self.config.T
        if self.config.loss == "vlb":
            p = self._importance_probs()
            t = torch.multinomial(p, B, replacement=True)
            weight = (1.0 / (T * p[t])).float()
        else:
            t = torch.randint(0, T, (B,), device=x_0.device)
            weight = None
        terms = self.diffusion.training_losses(self.net, x_0, t)
        if weight is not None:
            if self.training and torch.is_grad_enabled():
                self._update_history(t, terms["loss"])
            terms["loss"] = terms["loss"] * weight
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def sample(self, n, steps=None, eta=None, clip_denoised=True, progress=None):
        """n images (n, C, H, W) in [-1, 1]: ancestral (Ho algorithm 2) over all T steps, or over
        `steps` respaced steps, or DDIM with `eta` (see GaussianDiffusion.sample_steps).
        progress: a step counter on stderr; by default only when stderr is a terminal."""
        if progress is None:
            progress = sys.stderr.isatty()
        cfg = self.config
        shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
        x = self.diffusion.sample(self.net, shape, steps=steps, eta=eta, progress=progress,
                                  clip_denoised=clip_denoised, device=_model_device(self))
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, batch):
        """The exact VLB of the test images in bits/dim (Ho eq. 5, all T terms, the discretized
        decoder L_0 and the prior term L_T); T network evaluations per batch. Also its parts."""
        out = self.diffusion.calc_bpd(self.net, batch["image"].float())
        return {"bpd": out["bpd"].mean(), "prior_bpd": out["prior_bpd"].mean(),
                "decoder_bpd": out["vb"][:, 0].mean(), "diffusion_bpd": out["vb"][:, 1:].sum(1).mean()}


# --- released checkpoints (Nichol & Dhariwal's improved-diffusion) ---

# their file name -> the preset that rebuilds it
OPENAI_FILES = {
    "cifar10_uncond_50M_500K.pt": "cifar10_uncond_50M_500K",
    "imagenet64_uncond_100M_1500K.pt": "imagenet64_uncond_100M_1500K",
}


def read_state_dict(path):
    """A released weight file (or the dict already loaded from it) -> its flat {name: tensor} dict,
    loaded with weights_only=True (a file that needs code execution to load is refused). Any
    failure is a ValueError of one line."""
    if isinstance(path, dict):
        sd, path = path, "the state dict"
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except Exception as e:  # truncated zip, pickle that needs code, not a torch file at all
            raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}); it may be "
                             "truncated, or need code execution to load, which is refused") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict (a dict of named tensors)")
    return sd


def check_layout(state_dict, layouts, what):
    """Find the layout a state dict has and check it key for key; return its name.

    layouts: {name: {key: shape}}, each a released file's keys in order. The candidate with the
    most (key, shape) pairs in common, less the keys it has and the file lacks, is checked (so an
    unconditional file is not taken for the conditional one, whose keys include its own); the
    first key that is missing, unexpected or of another shape raises a ValueError of one line
    naming it and the layout. A state dict that shares fewer than half its keys with every
    candidate is not one of `what`: the error lists them.
    """
    common = lambda lay: sum(tuple(v.shape) == lay.get(k) for k, v in state_dict.items())  # noqa: E731
    name = max(layouts, key=lambda n: 2 * common(layouts[n]) - len(layouts[n]))
    expected = layouts[name]
    if 2 * common(expected) < len(expected):
        raise ValueError(f"not a known layout of {what}; known: {', '.join(layouts)}")
    for k, v in state_dict.items():
        if k not in expected:
            raise ValueError(f"unexpected key {k!r} for the layout of {name}")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"key {k!r} has shape {tuple(v.shape)}, the layout of {name} has {expected[k]}")
    for k in expected:
        if k not in state_dict:
            raise ValueError(f"missing key {k!r} of the layout of {name}")
    return name


def _iddpm_names(net):
    """{their key: (our key, their shape)} for a UNet built with a released preset.

    Their UNetModel numbers the blocks of each path (input_blocks.N, middle_block, output_blocks.N,
    out) where ours names them (conv_in, down.N-1, mid, up.N, norm_out, conv_out), names the
    parts of a residual block after Sequential positions, and stores attention projections as
    Conv1d weights (C_out, C_in, 1) where ours are Conv2d (C_out, C_in, 1, 1).
    """
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, v in net.state_dict().items():
        parts = key.split(".")
        shape = tuple(v.shape)
        if parts[0] in top:
            theirs = [top[parts[0]], *parts[1:]]
        elif parts[0] == "time_embed":
            theirs = parts
        else:
            path = {"down": "input_blocks", "mid": "middle_block", "up": "output_blocks"}[parts[0]]
            if parts[0] == "mid":
                block, rest = [path, parts[1]], parts[2:]
            else:
                n = int(parts[1]) + (parts[0] == "down")
                block, rest = [path, str(n), parts[2]], parts[3:]
            module = type(net.get_submodule(".".join(parts[:len(block)]))).__name__
            if module == "ResBlock":
                rest = [res[rest[0]], *rest[1:]]
            elif module == "Downsample":
                rest = ["op", *rest[1:]]
            elif module == "AttnBlock" and rest[-1] == "weight" and rest[0] in ("qkv", "proj_out"):
                shape = shape[:-1]
            theirs = [*block, *rest]
        out[".".join(theirs)] = (key, shape)
    return out


def _qkv_from_iddpm(w, heads):
    """Their attention's qkv rows are grouped per head, [q_h, k_h, v_h] for h = 1..heads (the
    reshape to (B heads, 3 C / heads, L) in their AttentionBlock); ours are [q | k | v], each split
    into heads. Reorders the rows (dim 0) of a weight (3C, ...) or bias (3C,)."""
    C3 = w.shape[0]
    return w.reshape(heads, 3, C3 // (3 * heads), *w.shape[1:]).transpose(0, 1).reshape(C3, *w.shape[1:])


def load_openai(path, preset=None):
    """Nichol & Dhariwal's released improved-diffusion checkpoint -> a DDPM in eval mode, float32.

    The file (cifar10_uncond_50M_500K.pt or imagenet64_uncond_100M_1500K.pt; the user gives the
    path, nothing is downloaded; or the dict already loaded from it) is read with weights_only=True;
    its layout (or `preset`, one of OPENAI_FILES' values) picks the preset, every key and shape is
    checked, and the weights are renamed and rearranged into ddpm.UNet (see _iddpm_names,
    _qkv_from_iddpm). The diffusion is theirs: T = 4000, cosine schedule, learned range, t fed to the network as t * 1000 / T.
    """
    sd = read_state_dict(path)
    presets = [preset] if preset else list(OPENAI_FILES.values())
    for p in presets:
        if p not in OPENAI_FILES.values():
            raise ValueError(f"unknown released preset {p!r}; known: {', '.join(OPENAI_FILES.values())}")
    with torch.device("meta"):
        nets = {p: UNet(PRESETS[p]) for p in presets}
    names = {p: _iddpm_names(net) for p, net in nets.items()}
    layouts = {f"improved-diffusion's {p}.pt": {k: s for k, (_, s) in names[p].items()} for p in presets}
    found = check_layout(sd, layouts, "improved-diffusion's released checkpoints")
    p = presets[list(layouts).index(found)]
    with torch.device("meta"):
        model = DDPM(PRESETS[p])
    model.net.load_state_dict(from_iddpm(sd, model.net), strict=True, assign=True)
    return model.eval()


def from_iddpm(state_dict, net):
    """An improved-diffusion UNetModel state dict (keys checked) -> the state dict of `net`, a
    ddpm.UNet of the same configuration (time_embedding "iddpm"), in float32."""
    ours, shapes = {}, net.state_dict()
    for k, (key, _) in _iddpm_names(net).items():
        v = state_dict[k].float()
        if k.endswith(("qkv.weight", "qkv.bias")):
            v = _qkv_from_iddpm(v, net.config.num_heads)
        ours[key] = v.reshape(shapes[key].shape)                          # Conv1d (O, I, 1) -> Conv2d (O, I, 1, 1)
    return ours
