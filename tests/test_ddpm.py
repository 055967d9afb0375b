"""Tests for ddpm.py: the paper identities, the samplers, the U-Net presets and the trainable DDPM."""

import math

import pytest
import torch

import ddpm
from conftest import overfit_losses
from ddpm import GaussianDiffusion, make_beta_schedule

# --- schedules and the forward process ---


def test_linear_schedule_matches_ho():
    b = make_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b250 = make_beta_schedule("linear", 250)  # scaled by 1000 / T
    assert b250[0].item() == pytest.approx(4e-4) and b250[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_is_eq17():
    T, s = 1000, 0.008
    d = GaussianDiffusion(make_beta_schedule("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    want = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # equal wherever the 0.999 clip is inactive (all but the last step)
    assert torch.allclose(d.alpha_bar[:-1], want[:-1], rtol=1e-10)
    assert d.betas.max().item() <= 0.999


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_is_running_product(name):
    d = GaussianDiffusion(make_beta_schedule(name, 100))
    for attr in ("betas", "alpha_bar", "posterior_variance"):
        assert getattr(d, attr).dtype == torch.float64
    prod = torch.ones((), dtype=torch.float64)
    for t in range(100):
        prod = prod * (1 - d.betas[t])
        assert torch.isclose(d.alpha_bar[t], prod, rtol=1e-12)


def test_bad_schedule_name_is_an_error():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="T > 20"):
        make_beta_schedule("linear", 20)


def test_q_sample_moments():
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    torch.manual_seed(0)
    x_0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 40, dtype=torch.long)
    x_t = d.q_sample(x_0, t)
    ab = d.alpha_bar[40].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.05)


def test_posterior_is_bayes_rule():
    """Ho eq. 6-7 against the product of q(x_{t-1} | x_0) and q(x_t | x_{t-1}), done by hand."""
    d = GaussianDiffusion(make_beta_schedule("cosine", 50))
    torch.manual_seed(0)
    x_0, x_t = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 7, 20, 33, 49])
    mean, var, log_var = d.q_posterior_mean_variance(x_0, x_t, t)
    ab_prev, a, b = d.alpha_bar[t - 1], d.alphas[t], d.betas[t]
    r = lambda v: v.reshape(-1, 1, 1, 1)
    # prior N(sqrt(ab_prev) x_0, 1 - ab_prev) on x_{t-1}, likelihood N(sqrt(a) x_{t-1}, b) for x_t
    precision = 1 / (1 - ab_prev) + a / b
    want_var = 1 / precision
    want_mean = r(want_var) * (r(ab_prev.sqrt() / (1 - ab_prev)) * x_0 + r(a.sqrt() / b) * x_t)
    assert torch.allclose(var, r(want_var).expand_as(var), rtol=1e-10)
    assert torch.allclose(log_var, r(want_var.log()).expand_as(var), rtol=1e-10)
    assert torch.allclose(mean, want_mean, rtol=1e-10, atol=1e-12)


def test_kl_of_equal_gaussians_is_zero():
    m, lv = torch.randn(4, 8), torch.randn(4, 8)
    assert ddpm.normal_kl(m, lv, m, lv).abs().max().item() < 1e-6
    assert ddpm.normal_kl(m, lv, m + 0.1, lv).min().item() > 0


def test_discretized_likelihood_bins_sum_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(256, 1)
    mean = torch.tensor([[-1.2, -0.3, 0.0, 0.5, 0.99]], dtype=torch.float64)
    log_scale = torch.tensor([[-3.0, -1.0, 0.0, -5.0, 0.5]], dtype=torch.float64)
    p = ddpm.discretized_gaussian_log_likelihood(levels, mean, log_scale).exp()  # (256, 5)
    assert torch.allclose(p.sum(0), torch.ones(5, dtype=torch.float64), atol=1e-9)


# --- respacing and samplers ---


class Recorder:
    """A fake eps model that records the time indices it is called with."""

    def __init__(self):
        self.ts = []

    def __call__(self, x_t, t):
        self.ts.append(t[0].item())
        return torch.zeros_like(x_t)


def test_respacing_keeps_alpha_bar_and_original_indices():
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    r = d.respace(10)
    kept = r.timestep_map
    assert kept[0].item() == 0 and kept[-1].item() == 999 and len(kept) == 10
    assert torch.allclose(r.alpha_bar, d.alpha_bar[kept], rtol=1e-12)
    rec = Recorder()
    d.sample(rec, (2, 1, 2, 2), steps=10)
    assert rec.ts == kept.flip(0).tolist()
    rec = Recorder()
    d.sample(rec, (2, 1, 2, 2), steps=7, eta=0.0)
    assert rec.ts == d.respace(7).timestep_map.flip(0).tolist()
    with pytest.raises(ValueError, match="steps must be"):
        d.respace(1001)


def test_ddim_eta0_is_deterministic():
    d = GaussianDiffusion(make_beta_schedule("cosine", 100))
    model = lambda x, t: 0.5 * torch.tanh(x) + 1e-3 * t.reshape(-1, 1, 1, 1)
    noise = torch.randn(3, 2, 4, 4)
    torch.manual_seed(1)
    a = d.sample(model, noise.shape, steps=20, eta=0.0, noise=noise)
    torch.manual_seed(2)
    b = d.sample(model, noise.shape, steps=20, eta=0.0, noise=noise)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = d.sample(model, noise.shape, steps=20, eta=1.0, noise=noise)
    torch.manual_seed(2)
    e = d.sample(model, noise.shape, steps=20, eta=1.0, noise=noise)
    assert not torch.equal(c, e)


def test_seeded_sampling_is_reproducible():
    d = GaussianDiffusion(make_beta_schedule("linear", 50))
    model = lambda x, t: 0.1 * x
    torch.manual_seed(0)
    a = d.sample(model, (2, 1, 3, 3))
    torch.manual_seed(0)
    b = d.sample(model, (2, 1, 3, 3))
    assert torch.equal(a, b)


MU = torch.tensor([0.3, -0.2], dtype=torch.float64).reshape(1, 2, 1, 1)
SD = torch.tensor([0.5, 0.15], dtype=torch.float64).reshape(1, 2, 1, 1)


def make_optimal_model(d, prediction):
    """For x_0 ~ N(MU, SD^2) the MMSE denoiser is known in closed form:
    x_t ~ N(sqrt(ab) MU, ab SD^2 + 1 - ab), E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab SD^2 + 1 - ab).
    `t` is the ORIGINAL index, so the model reads the original alpha_bar (a respacing bug shows)."""

    def model(x_t, t):
        ab = d.alpha_bar[t].reshape(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * MU) / (ab * SD ** 2 + 1 - ab)
        if prediction == "eps":
            return eps
        x_0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        if prediction == "x_0":
            return x_0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x_0

    return model


@pytest.mark.parametrize("prediction,variance,schedule,T,steps,eta", [
    ("eps", "fixed_small", "linear", 1000, None, None),  # Ho algorithm 2, all T steps
    ("x_0", "fixed_large", "cosine", 500, None, None),
    ("v", "fixed_small", "cosine", 1000, 250, 0.0),      # DDIM on a respaced process
])
def test_sampler_with_analytic_denoiser_reproduces_data(prediction, variance, schedule, T, steps, eta):
    """Fixed variances and DDIM are exact only as the step size -> 0 (they ignore Var(x_0 | x_t));
    at these step counts their error is below the tolerance (checked: 100 DDIM steps miss SD by 8%)."""
    d = GaussianDiffusion(make_beta_schedule(schedule, T), prediction=prediction, variance=variance)
    torch.manual_seed(0)
    noise = torch.randn(1000, 2, 4, 4, dtype=torch.float64)  # small enough to stay single-threaded
    x = d.sample(make_optimal_model(d, prediction), noise.shape, steps=steps, eta=eta, noise=noise,
                 clip_denoised=False)
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=0.02), x.mean((0, 2, 3))
    assert torch.allclose(x.std((0, 2, 3)), SD.flatten(), rtol=0.04), x.std((0, 2, 3))


def test_vlb_of_analytic_model_is_finite_and_positive():
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    torch.manual_seed(0)
    x_0 = (MU + SD * torch.randn(4, 2, 4, 4, dtype=torch.float64)).clamp(-1, 1)
    x_0 = torch.round((x_0 + 1) * 127.5) / 127.5 - 1
    out = d.calc_bpd(make_optimal_model(d, "eps"), x_0)
    assert out["vb"].shape == (4, 100) and torch.isfinite(out["bpd"]).all()
    assert (out["bpd"] > 0).all() and (out["vb"] >= -1e-9).all()


@pytest.mark.parametrize("steps", [5, 25])
def test_learned_range_with_exact_variance_is_exact(steps):
    """For Gaussian data the true reverse step is Gaussian with mean mu_tilde(E[x_0 | x_t], x_t) and
    variance beta_tilde + coef1^2 Var(x_0 | x_t), which lies in [beta_tilde, beta] when SD <= 1.
    A learned-range model that outputs exactly that variance (eq. 15) samples the data exactly at
    ANY number of respaced steps; a fixed variance would not (it is only right as steps -> T)."""
    d = GaussianDiffusion(make_beta_schedule("cosine", 1000), variance="learned_range")
    r = d.respace(steps)
    eps_model = make_optimal_model(d, "eps")

    def model(x_t, t):
        i = torch.searchsorted(r.timestep_map, t)         # step of the respaced process
        ab, b, c1 = (v[i].reshape(-1, 1, 1, 1) for v in (r.alpha_bar, r.betas, r.posterior_mean_coef1))
        var_x_0 = SD ** 2 * (1 - ab) / (ab * SD ** 2 + 1 - ab)
        log_var = torch.log(r.posterior_variance[i].reshape(-1, 1, 1, 1) + c1 ** 2 * var_x_0)
        lo, hi = r.posterior_log_variance_clipped[i].reshape(-1, 1, 1, 1), b.log()
        var_frac = 2 * (log_var - lo) / (hi - lo) - 1
        return torch.cat([eps_model(x_t, t), var_frac.expand_as(x_t)], 1)

    torch.manual_seed(0)
    noise = torch.randn(1000, 2, 4, 4, dtype=torch.float64)
    x = d.sample(model, noise.shape, steps=steps, noise=noise, clip_denoised=False)
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=0.02)
    assert torch.allclose(x.std((0, 2, 3)), SD.flatten(), rtol=0.04), x.std((0, 2, 3))


def test_hybrid_loss_stops_gradient_of_mean_in_vlb_term():
    """Improved DDPM section 3.1: L_vlb in L_hybrid trains only Sigma_theta; L_vlb alone trains both."""
    a = torch.tensor(0.3, requires_grad=True)  # drives the eps (mean) output
    b = torch.tensor(0.2, requires_grad=True)  # drives the variance output
    model = lambda x, t: torch.cat([a * x, torch.tanh(b * x)], 1)
    x_0, t = torch.rand(4, 3, 2, 2) * 2 - 1, torch.tensor([0, 3, 10, 39])
    d = GaussianDiffusion(make_beta_schedule("linear", 40), variance="learned_range", loss="hybrid")
    terms = d.training_losses(model, x_0, t)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (4,)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert (a.grad is None or a.grad.item() == 0) and b.grad.abs().item() > 0
    a.grad = None
    d = GaussianDiffusion(make_beta_schedule("linear", 40), variance="learned_range", loss="vlb")
    d.training_losses(model, x_0, t)["loss"].sum().backward()
    assert a.grad.abs().item() > 0


# --- U-Net and the trainable DDPM ---

import dataclasses

import sample
import train
from ddpm import DDPM, PRESETS, UNet

MICRO = dataclasses.replace(PRESETS["tiny"], image_size=8, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), T=40)


def count(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def test_paper_presets_have_the_papers_parameter_counts():
    assert count(PRESETS["ddpm-cifar10"]) == 35_746_307    # Ho et al.: 35.7M
    assert count(PRESETS["iddpm-cifar10"]) == 52_546_438   # Improved DDPM CIFAR-10


@pytest.mark.parametrize("variance,heads,ssn", [("fixed_large", 1, False), ("learned_range", 2, True)])
def test_unet_shapes(variance, heads, ssn):
    cfg = dataclasses.replace(MICRO, variance=variance, num_heads=heads, scale_shift_norm=ssn)
    net = UNet(cfg)
    x = torch.randn(3, 3, 8, 8)
    out = net(x, torch.tensor([0, 5, 39]))
    assert out.shape == (3, 6 if variance == "learned_range" else 3, 8, 8)
    # the output convolution starts at zero (Ho's init), so the first prediction is 0
    assert out.abs().max().item() == 0


@pytest.mark.parametrize("loss,variance,prediction", [("simple", "fixed_large", "eps"),
                                                       ("hybrid", "learned_range", "v"),
                                                       ("vlb", "learned_range", "x_0")])
def test_loss_finite_with_gradient(loss, variance, prediction):
    torch.manual_seed(0)
    m = DDPM(dataclasses.replace(MICRO, loss=loss, variance=variance, prediction=prediction))
    out = m.loss({"image": torch.rand(4, 3, 8, 8) * 2 - 1})
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    out["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    m = DDPM(MICRO)
    batch = {"image": torch.rand(8, 3, 8, 8).round() * 2 - 1}
    # a fixed set of (t, eps) so the curve measures fitting, not noise
    t, noise = torch.randint(0, 40, (8,)), torch.randn(8, 3, 8, 8)
    losses = overfit_losses(lambda: m.diffusion.training_losses(m.net, batch["image"], t, noise)["loss"].mean(),
                            m.parameters(), 20, 1e-2)
    assert losses[-1] < 0.2 * losses[0]


def test_importance_sampler_history_and_probabilities():
    m = DDPM(dataclasses.replace(MICRO, T=3, schedule="cosine", loss="vlb", variance="learned_range"))
    assert torch.allclose(m._importance_probs(), torch.full((3,), 1 / 3, dtype=torch.float64))
    # 12 losses for t = 0 in one batch: only the last 10 are kept
    m._update_history(torch.zeros(12, dtype=torch.long), torch.arange(12.0))
    assert sorted(m.loss_history[0].tolist()) == list(range(2, 12)) and m.loss_count[0].item() == 12
    for t, v in ((1, 2.0), (2, 4.0)):
        m._update_history(torch.full((10,), t), torch.full((10,), v))
    m._update_history(torch.tensor([0] * 10), torch.full((10,), 1.0))   # ring buffer overwrites all
    p = m._importance_probs()  # sqrt(E[L^2]) = 1, 2, 4, mixed with 0.1% uniform
    want = torch.tensor([1, 2, 4], dtype=torch.float64) / 7 * 0.999 + 0.001 / 3
    assert torch.allclose(p, want)
    # the weights 1 / (T p_t) keep the estimate unbiased: E_p[L_t / (T p_t)] = mean_t L_t
    L = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.isclose((p * L / (3 * p)).sum(), L.mean())


def test_sample_shape_reproducible_and_original_indices():
    m = DDPM(MICRO).eval()
    torch.manual_seed(0)
    a = m.sample(2, steps=5)
    torch.manual_seed(0)
    b = m.sample(2, steps=5)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    c = m.sample(2, steps=4, eta=0.0)
    assert c.shape == (2, 3, 8, 8)


def test_evaluate_gives_finite_bits_per_dim():
    m = DDPM(dataclasses.replace(MICRO, variance="learned_range")).eval()
    x = torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5 - 1
    out = m.evaluate({"image": x})
    assert torch.isfinite(out["bpd"])
    assert torch.isclose(out["bpd"], out["prior_bpd"] + out["decoder_bpd"] + out["diffusion_bpd"])
    # an untrained model pays more than the 8 bits/dim of a uniform code
    assert out["bpd"].item() > 8


def test_bf16_autocast_keeps_diffusion_maths_fp32():
    m = DDPM(dataclasses.replace(MICRO, loss="hybrid", variance="learned_range"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.loss({"image": torch.rand(2, 3, 8, 8) * 2 - 1})
        x = m.sample(1, steps=3)
    assert all(v.dtype == torch.float32 for v in out.values()) and x.dtype == torch.float32
    assert m.diffusion.alpha_bar.dtype == torch.float64


def test_cli_train_sample_eval(tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["ddpm", "--image-size", "8", "--ch", "8", "--ch-mult", "1,2", "--attn-resolutions", "4",
            "--T", "30", "--steps", "2", "--batch-size", "4", "--data", "shapes:16", "--log-every", "1",
            "--sample-n", "2", "--out", str(run)]
    assert train.main(argv) == 0 and (run / "samples.png").exists()
    model, info = sample.load_model(run)
    assert isinstance(model, DDPM) and model.config.T == 30 and model.config.ch_mult == (1, 2)
    assert sample.main([str(run), "-n", "2", "--steps", "5", "--eta", "0", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()
    assert sample.main([str(run), "--eval", "2"]) == 0
    assert "bpd" in capsys.readouterr().out
    assert sample.main([str(run), "-n", "2", "--steps", "31"]) == 2
    assert "steps must be" in capsys.readouterr().err


def test_group_norm_keeps_half_inputs_in_their_dtype_with_float32_statistics():
    torch.manual_seed(0)
    g = ddpm.GroupNorm(4, 16)
    torch.nn.init.normal_(g.weight), torch.nn.init.normal_(g.bias)
    x = (torch.randn(2, 16, 8, 8) * 3 + 5).bfloat16()  # a large mean: bf16 sums would drift
    ref = torch.nn.functional.group_norm(x.double(), 4, g.weight.double(), g.bias.double(), g.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = g(x)
    assert y.dtype == torch.bfloat16  # autocast alone would give float32
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3  # bf16 output rounding only
    x32 = x.float()
    assert g(x32).dtype == torch.float32 and torch.equal(g(x32), torch.nn.GroupNorm.forward(g, x32))


def _cpu_compile_works():
    """torch.compile on a CPU builds C++ (a compiler, Python's headers): where it cannot, skip."""
    import shutil
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False
    try:
        f = torch.compile(lambda x: x * 2 + 1)
        return torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    except Exception:
        return False


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside Inductor, not ours
def test_sample_compile_gives_the_eager_images(tmp_path, capsys):
    if not _cpu_compile_works():
        pytest.skip("torch.compile cannot build C++ on this machine")
    run = tmp_path / "r"
    argv = ["ddpm", "--image-size", "8", "--ch", "8", "--ch-mult", "1,2", "--attn-resolutions", "4",
            "--T", "30", "--steps", "2", "--batch-size", "4", "--data", "shapes:16", "--sample-n", "2",
            "--out", str(run)]
    assert train.main(argv) == 0
    assert sample.main([str(run), "-n", "2", "--steps", "3", "--eta", "0", "--compile",
                        "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()
    model, _ = sample.load_model(run)
    torch.manual_seed(0)
    with torch.inference_mode():
        ref = model.sample(2, steps=3, eta=0.0)
    assert sample.compile_for_sampling(model, torch.device("cpu")) == 1
    assert model.net._compiled_call_impl is not None
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.sample(2, steps=3, eta=0.0)
    assert torch.allclose(out, ref, atol=1e-4)


def test_attention_hands_sdpa_channel_contiguous_inputs(sdpa_strides):
    x = torch.randn(2, 16, 4, 4)
    block = ddpm.AttnBlock(16, 2)
    torch.nn.init.normal_(block.proj_out.weight)
    y = block(x)
    assert sdpa_strides == [[1, 1, 1]]
    # and the same result as attention written out
    B, C, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(B, 3, 2, C // 2, H * W)
    q, k, v = qkv.unbind(1)                                               # (B, nh, hs, HW)
    a = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(C // 2), -1)    # (B, nh, HW, HW)
    ref = x + block.proj_out((v @ a.transpose(-1, -2)).reshape(B, C, H, W))
    assert torch.allclose(y, ref, atol=1e-5)


def test_channels_last_trains_and_samples_as_the_default_layout(tmp_path):
    argv = ["ddpm", "--image-size", "8", "--ch", "8", "--ch-mult", "1,2", "--attn-resolutions", "4",
            "--T", "30", "--steps", "2", "--batch-size", "4", "--data", "shapes:16", "--sample-n", "2"]
    assert train.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert train.main(argv + ["--out", str(tmp_path / "b"), "--channels-last"]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True)["state_dict"] for r in "ab")
    convs = [k for k, w in b.items() if w.dim() == 4 and w.shape[1] > 1 and w.shape[-1] > 1]
    assert convs and all(b[k].is_contiguous(memory_format=torch.channels_last) and not b[k].is_contiguous()
                         for k in convs)  # the flag really trained in channels_last
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # and to the same weights
    assert sample.main([str(tmp_path / "b"), "-n", "2", "--steps", "3", "--eta", "0", "--channels-last",
                        "--out", str(tmp_path / "c.png")]) == 0
    model, _ = sample.load_model(tmp_path / "b")
    torch.manual_seed(0)
    ref = model.sample(2, steps=3, eta=0.0)
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    assert torch.allclose(model.sample(2, steps=3, eta=0.0), ref, atol=1e-4)
