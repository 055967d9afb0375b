"""ddpm.py value checks (issue 26): each step of the diffusion maths recomputed from the papers'
formulas with an arbitrary (not optimal) model, where wrong variants differ clearly."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import ddpm
from ddpm import GaussianDiffusion, make_beta_schedule

T = 30
B = torch.linspace(1e-3, 0.2, T, dtype=torch.float64)  # a schedule with large steps
T_IDX = torch.tensor([0, 1, 7, 29])


def tables(betas=B):
    a = 1 - betas
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return a, ab, ab_prev


def g(v, t=T_IDX):
    return v[t].reshape(-1, 1, 1, 1)


def x_pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_0 = torch.randint(0, 256, (4, 2, 3, 3), generator=gen).double() / 127.5 - 1
    x_t = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    return x_0, x_t


def model(x, t):
    """Some model: its output depends on x and on the original time index."""
    return 0.3 * x + 0.01 * t.double().reshape(-1, 1, 1, 1) - 0.2


def test_normal_kl_and_decoder_likelihood_match_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.0, 0.5, 1.0])
    lv1, lv2 = torch.tensor([0.2, -2.0, 1.0]), torch.tensor([-0.5, 0.3, 0.0])
    expect = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(ddpm.normal_kl(m1, lv1, m2, lv2), expect)
    x = torch.tensor([-1.0, -0.5, 0.2, 1.0], dtype=torch.float64)
    mean, sd = torch.tensor(0.1, dtype=torch.float64), 0.4
    n = Normal(mean, sd)
    expect = torch.stack([n.cdf(x[0] + 1 / 255).log(),
                          (n.cdf(x[1] + 1 / 255) - n.cdf(x[1] - 1 / 255)).log(),
                          (n.cdf(x[2] + 1 / 255) - n.cdf(x[2] - 1 / 255)).log(),
                          (1 - n.cdf(x[3] - 1 / 255)).log()])
    got = ddpm.discretized_gaussian_log_likelihood(x, mean, torch.tensor(math.log(sd), dtype=torch.float64))
    torch.testing.assert_close(got, expect)


def test_q_tables_and_conversions():
    d = GaussianDiffusion(B)
    a, ab, ab_prev = tables()
    x_0, x_t = x_pair()
    eps = torch.randn_like(x_0)
    torch.testing.assert_close(d.q_sample(x_0, T_IDX, eps), g(ab).sqrt() * x_0 + g(1 - ab).sqrt() * eps)
    mean, var, log_var = d.q_mean_variance(x_0, T_IDX)
    torch.testing.assert_close(mean, g(ab).sqrt() * x_0)
    torch.testing.assert_close(var, g(1 - ab).expand_as(var))
    torch.testing.assert_close(log_var, g(1 - ab).log().expand_as(var))
    torch.testing.assert_close(d.predict_x_0_from_eps(x_t, T_IDX, eps), (x_t - g(1 - ab).sqrt() * eps) / g(ab).sqrt())
    torch.testing.assert_close(d.predict_eps_from_x_0(x_t, T_IDX, x_0), (x_t - g(ab).sqrt() * x_0) / g(1 - ab).sqrt())
    v = g(ab).sqrt() * eps - g(1 - ab).sqrt() * x_0
    x_t2 = d.q_sample(x_0, T_IDX, eps)
    torch.testing.assert_close(d.predict_x_0_from_v(x_t2, T_IDX, v), x_0)
    for prediction, target in (("eps", eps), ("x_0", x_0), ("v", v)):
        torch.testing.assert_close(GaussianDiffusion(B, prediction).training_target(x_0, T_IDX, eps), target)


@pytest.mark.parametrize("prediction", ["eps", "x_0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_model_output_to_mean_variance(prediction, variance):
    d = GaussianDiffusion(B, prediction, variance)
    a, ab, ab_prev = tables()
    x_0, x_t = x_pair()
    out = model(x_t, T_IDX)
    if variance == "learned_range":
        var_frac = torch.tanh(x_t)  # the model's second output, in [-1, 1]
        out = torch.cat([out, var_frac], 1)
    p = d.model_output_to_mean_variance(out, x_t, T_IDX, clip_denoised=True)
    o = out[:, :2]
    x0_hat = {"eps": (x_t - g(1 - ab).sqrt() * o) / g(ab).sqrt(), "x_0": o,
              "v": g(ab).sqrt() * x_t - g(1 - ab).sqrt() * o}[prediction].clamp(-1, 1)
    torch.testing.assert_close(p["pred_x_0"], x0_hat)
    torch.testing.assert_close(p["pred_eps"], (x_t - g(ab).sqrt() * x0_hat) / g(1 - ab).sqrt())
    mean = g(ab_prev.sqrt() * B / (1 - ab)) * x0_hat + g((1 - ab_prev) * a.sqrt() / (1 - ab)) * x_t
    torch.testing.assert_close(p["mean"], mean)
    beta_tilde = B * (1 - ab_prev) / (1 - ab)
    log_tilde = torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()  # clipped at t = 0
    if variance == "fixed_small":
        torch.testing.assert_close(p["variance"].expand_as(x_t), g(beta_tilde).expand_as(x_t))
        torch.testing.assert_close(p["log_variance"].expand_as(x_t), g(log_tilde).expand_as(x_t))
    elif variance == "fixed_large":
        table = torch.cat([beta_tilde[1:2], B[1:]])
        torch.testing.assert_close(p["variance"].expand_as(x_t), g(table).expand_as(x_t))
        torch.testing.assert_close(p["log_variance"].expand_as(x_t), g(table.log()).expand_as(x_t))
    else:
        frac = (var_frac + 1) / 2
        log_var = frac * g(B.log()) + (1 - frac) * g(log_tilde)
        torch.testing.assert_close(p["log_variance"], log_var)
        torch.testing.assert_close(p["variance"], log_var.exp())


def test_p_sample_adds_sigma_z_except_at_t0():
    d = GaussianDiffusion(B, variance="fixed_large")
    x_0, x_t = x_pair()
    p = d.p_mean_variance(model, x_t, T_IDX, clip_denoised=True)
    torch.manual_seed(3)
    z = torch.randn_like(x_t)
    expect = p["mean"] + (T_IDX != 0).double().reshape(-1, 1, 1, 1) * (0.5 * p["log_variance"]).exp() * z
    torch.manual_seed(3)
    out = d.p_sample(model, x_t, T_IDX)
    torch.testing.assert_close(out["sample"], expect)
    torch.testing.assert_close(out["pred_x_0"], p["pred_x_0"])


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_is_song_eq12(eta):
    d = GaussianDiffusion(B)
    a, ab, ab_prev = tables()
    x_0, x_t = x_pair()
    x0_hat = d.p_mean_variance(model, x_t, T_IDX)["pred_x_0"]
    eps = (x_t - g(ab).sqrt() * x0_hat) / g(1 - ab).sqrt()
    sigma = eta * ((1 - g(ab_prev)) / (1 - g(ab))).sqrt() * (1 - g(ab) / g(ab_prev)).sqrt()
    torch.manual_seed(4)
    z = torch.randn_like(x_t)
    nonzero = (T_IDX != 0).double().reshape(-1, 1, 1, 1)
    expect = g(ab_prev).sqrt() * x0_hat + (1 - g(ab_prev) - sigma ** 2).sqrt() * eps + nonzero * sigma * z
    torch.manual_seed(4)
    torch.testing.assert_close(d.ddim_sample(model, x_t, T_IDX, eta)["sample"], expect)


def test_guidance_shifts_mean_by_variance_and_eps_by_sqrt_one_minus_alpha_bar():
    d = GaussianDiffusion(B)
    a, ab, ab_prev = tables()
    x_0, x_t = x_pair()
    grad = torch.sin(3 * x_t)
    seen = []

    def cond_fn(x, t):
        seen.append(t)
        return grad

    p = d.p_mean_variance(model, x_t, T_IDX)
    torch.testing.assert_close(d.condition_mean(cond_fn, p, x_t, T_IDX), p["mean"] + p["variance"] * grad)
    x0, eps = d.condition_score(cond_fn, p, x_t, T_IDX)
    eps_expect = p["pred_eps"] - g(1 - ab).sqrt() * grad
    torch.testing.assert_close(eps, eps_expect)
    torch.testing.assert_close(x0, (x_t - g(1 - ab).sqrt() * eps_expect) / g(ab).sqrt())
    # a guided ancestral step uses the shifted mean
    torch.manual_seed(2)
    guided = d.p_sample(model, x_t, T_IDX, cond_fn=cond_fn)["sample"]
    torch.manual_seed(2)
    plain = d.p_sample(model, x_t, T_IDX)["sample"]
    torch.testing.assert_close(guided - plain, p["variance"] * grad)
    # guided DDIM: the step uses the shifted x_0
    torch.manual_seed(2)
    step = d.ddim_sample(model, x_t, T_IDX, 0.0, cond_fn=cond_fn)
    torch.testing.assert_close(step["pred_x_0"], x0)
    # respaced: cond_fn sees the original time index
    r = d.respace(10)
    seen.clear()
    r.condition_mean(cond_fn, r.p_mean_variance(model, x_t, torch.tensor([0, 1, 5, 9])), x_t,
                     torch.tensor([0, 1, 5, 9]))
    assert seen[0].tolist() == r.timestep_map[[0, 1, 5, 9]].tolist()


def test_vb_terms_prior_and_training_losses_weights():
    x_0, x_t = x_pair()
    a, ab, ab_prev = tables()
    for loss, scale in (("vlb", T), ("hybrid", T / 1000)):
        d = GaussianDiffusion(B, variance="learned_range", loss=loss)
        out2 = lambda x, t: torch.cat([model(x, t), torch.tanh(x)], 1)
        torch.manual_seed(1)
        noise = torch.randn_like(x_0)
        xt = d.q_sample(x_0, T_IDX, noise)
        p = d.model_output_to_mean_variance(out2(xt, T_IDX), xt, T_IDX)
        mean_q = g(ab_prev.sqrt() * B / (1 - ab)) * x_0 + g((1 - ab_prev) * a.sqrt() / (1 - ab)) * xt
        var_q = g(B * (1 - ab_prev) / (1 - ab)).clamp(min=1e-30)
        kl = kl_divergence(Normal(mean_q, var_q.sqrt()), Normal(p["mean"], (0.5 * p["log_variance"]).exp()))
        nll = -ddpm.discretized_gaussian_log_likelihood(x_0, p["mean"], 0.5 * p["log_variance"])
        vb = torch.where(T_IDX == 0, nll.flatten(1).mean(1), kl.flatten(1).mean(1)) / math.log(2)
        torch.testing.assert_close(d.vb_terms_bpd(p, x_0, xt, T_IDX)[1:], vb[1:])
        torch.testing.assert_close(d.vb_terms_bpd(p, x_0, xt, T_IDX)[0], vb[0])
        terms = d.training_losses(out2, x_0, T_IDX, noise)
        torch.testing.assert_close(terms["vb"], vb * scale)
        mse = ((noise - model(xt, T_IDX)) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(terms["loss"], vb * scale + (mse if loss == "hybrid" else 0))
    d = GaussianDiffusion(B)
    mean = ab[-1].sqrt() * x_0
    prior = kl_divergence(Normal(mean, (1 - ab[-1]).sqrt()), Normal(0.0, 1.0)).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(d.prior_bpd(x_0), prior)
    assert prior.min() > 1e-3  # this short schedule leaves signal at T, so the term is not 0


def test_calc_bpd_sums_every_term_and_the_prior():
    d = GaussianDiffusion(B)
    x_0, _ = x_pair()
    torch.manual_seed(0)
    out = d.calc_bpd(model, x_0)
    torch.manual_seed(0)
    vb = []
    for i in range(T):
        t = torch.full((4,), i)
        x_t = d.q_sample(x_0, t)
        vb.append(d.vb_terms_bpd(d.p_mean_variance(model, x_t, t, clip_denoised=False), x_0, x_t, t))
    vb = torch.stack(vb, 1)
    torch.testing.assert_close(out["vb"], vb)
    torch.testing.assert_close(out["bpd"], vb.sum(1) + d.prior_bpd(x_0))


def test_respaced_betas_and_sampling_steps():
    d = GaussianDiffusion(B)
    r = d.respace(4)
    kept = ddpm.space_timesteps(T, 4)
    assert kept == [0, 10, 19, 29]
    ab = d.alpha_bar[kept]
    torch.testing.assert_close(r.betas, 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))
    assert ddpm.space_timesteps(T, 1) == [T - 1]
    seen = []

    def spy(x, t):
        seen.append(t[0].item())
        return model(x, t)

    d.sample(spy, (1, 1, 2, 2), steps=4)
    assert seen == [29, 19, 10, 0]


def test_linear_schedule_scales_with_T_and_cosine_is_clipped():
    b = make_beta_schedule("linear", 100)
    assert b[0].item() == pytest.approx(1e-3) and b[-1].item() == pytest.approx(0.2)
    c = make_beta_schedule("cosine", 50)
    assert c.max().item() == pytest.approx(0.999)
    f = lambda t: math.cos((t / 50 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert c[10].item() == pytest.approx(1 - f(11) / f(10))


def test_ddpm_vlb_loss_weights_terms_by_importance():
    cfg = ddpm.DDPMConfig(image_size=8, ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1,
                          T=25, loss="vlb", variance="learned_range")
    m = ddpm.DDPM(cfg)
    m.loss_count.fill_(10)
    m.loss_history[:25] = torch.linspace(0.1, 3.0, 25, dtype=torch.float64)[:, None]
    p = m._importance_probs()
    w = torch.linspace(0.1, 3.0, 25, dtype=torch.float64)
    torch.testing.assert_close(p, w / w.sum() * (1 - 1e-3) + 1e-3 / 25)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.manual_seed(0)
    t = torch.multinomial(p, 3, replacement=True)
    terms = m.diffusion.training_losses(m.net, x, t)
    torch.manual_seed(0)
    out = m.eval().loss({"image": x})
    torch.testing.assert_close(out["loss"], (terms["loss"] * (1 / (25 * p[t])).float()).mean())


def test_timestep_embedding_is_sin_then_cos():
    t = torch.tensor([0, 5, 999])
    emb = ddpm.timestep_embedding(t, 8)
    w = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    arg = t[:, None].float() * w
    torch.testing.assert_close(emb, torch.cat([arg.sin(), arg.cos()], 1))


def test_ddpm_evaluate_splits_the_bound_into_its_parts():
    cfg = ddpm.DDPMConfig(image_size=8, ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, T=25)
    m = ddpm.DDPM(cfg).eval()
    x = torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5 - 1
    torch.manual_seed(0)
    out = m.diffusion.calc_bpd(m.net, x)
    torch.manual_seed(0)
    ev = m.evaluate({"image": x})
    torch.testing.assert_close(ev["bpd"], out["bpd"].mean())
    torch.testing.assert_close(ev["prior_bpd"], out["prior_bpd"].mean())
    torch.testing.assert_close(ev["decoder_bpd"], out["vb"][:, 0].mean())
    torch.testing.assert_close(ev["diffusion_bpd"], out["vb"][:, 1:].sum(1).mean())
    torch.testing.assert_close(ev["bpd"], ev["prior_bpd"] + ev["decoder_bpd"] + ev["diffusion_bpd"])


def test_ddpm_sample_clamps_the_diffusion_sample():
    cfg = ddpm.DDPMConfig(image_size=8, ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, T=25)
    m = ddpm.DDPM(cfg).eval()
    torch.manual_seed(1)
    raw = m.diffusion.sample(m.net, (2, 3, 8, 8), steps=3, clip_denoised=False)
    torch.manual_seed(1)
    got = m.sample(2, steps=3, clip_denoised=False, progress=False)
    torch.testing.assert_close(got, raw.clamp(-1, 1))
    assert (raw.abs() > 1).any()  # so the clamp shows


def test_ddim_at_eta_1_keeps_a_vanishing_direction_term_real():
    """Two DDIM steps over a 1000-step cosine schedule: the last step's alpha_t = alpha_bar_t /
    alpha_bar_{t-1} is ~2e-9, so at eta = 1 (sigma^2 = beta_tilde) the direction coefficient
    1 - alpha_bar_{t-1} - sigma^2 = (1 - alpha_bar_{t-1})^2 alpha_t / (1 - alpha_bar_t) is ~4e-18,
    below float32's rounding of its three terms, and must not become the sqrt of a negative."""
    d = GaussianDiffusion(make_beta_schedule("cosine", 1000)).respace(2)
    ab = d.alpha_bar
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    t = torch.tensor([1, 1, 0])
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 2, 2, 2, generator=gen)
    net = lambda x, t: 0.5 * x - 0.1  # noqa: E731  (some float32 eps model)
    x0_hat = d.p_mean_variance(net, x_t, t)["pred_x_0"].double()
    eps = (x_t.double() - g(ab, t).sqrt() * x0_hat) / g(1 - ab, t).sqrt()
    beta_tilde = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    direction = (1 - ab_prev) ** 2 * (ab / ab_prev) / (1 - ab)  # 1 - ab_prev - beta_tilde
    torch.manual_seed(3)
    z = torch.randn_like(x_t).double()
    nonzero = (t != 0).double().reshape(-1, 1, 1, 1)
    expect = (g(ab_prev, t).sqrt() * x0_hat + g(direction, t).sqrt() * eps
              + nonzero * g(beta_tilde, t).sqrt() * z)
    torch.manual_seed(3)
    got = d.ddim_sample(net, x_t, t, eta=1.0)["sample"]
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)
