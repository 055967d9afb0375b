"""vae.py value checks (issue 26): each formula against an independent computation
(torch.distributions, closed forms), on inputs where the wrong variants differ clearly."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vae
from vae import AE, DAE, VAE, VAEConfig

CFG = VAEConfig(image_size=8, channels=(4,), latent_dim=3)
D = 3 * 8 * 8


def images(n=4, seed=0):
    """8-bit images in [-1, 1] with black and white pixels (the edge bins) and values between."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float() / 127.5 - 1
    x[:, :, 0] = -1.0
    x[:, :, 1] = 1.0
    return x


def sharp_vae(seed=0, logvar=-3.0):
    """A VAE as a trained one looks: q(z|x) narrow (sigma = e^(logvar/2)) and far from the prior,
    a sharp decoder (sigma 0.01), and data it explains (its decoded mean, rounded to 8 bits).
    Then log p(x|z) varies by nats across z ~ q, and the IWAE bound is well above the ELBO."""
    torch.manual_seed(seed)
    m = VAE(CFG).eval()
    lin = m.encoder.net[-1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias[: CFG.latent_dim] = torch.tensor([1.5, -1.0, 0.5])
        lin.bias[CFG.latent_dim:] = logvar
        m.log_sigma.fill_(math.log(0.01))
    return m


def images_of(m, n=3):
    """8-bit images near the decoder's mean at the posterior mean, so no bin is far in the tail."""
    with torch.no_grad():
        mu = m.encode(torch.zeros(n, 3, 8, 8))[0]
        x = (m.decoder(mu) + 0.02 * torch.randn(n, 3, 8, 8)).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def reference_log_px(m, x, z):
    """log p(x|z) summed per image, from the per-pixel likelihood that
    test_discretized_likelihood_matches_normal_cdf_bins pins against Normal CDFs (recomputing it
    here in float64 would differ in the far bins, where float32 CDF differences lose digits)."""
    mu = m.decoder(z).float()
    return vae.discretized_gaussian_log_likelihood(x, mu, m.log_sigma).flatten(1).sum(1)


def test_discretized_likelihood_matches_normal_cdf_bins():
    x = torch.tensor([-1.0, -1 + 2 / 255, -0.2, 0.0, 0.5, 1 - 2 / 255, 1.0])
    for mu, sigma in [(0.1, 0.02), (-0.6, 0.3), (0.9, 0.004)]:
        xd = x.double()  # float64 throughout: the far bins are differences of nearly equal CDFs
        got = vae.discretized_gaussian_log_likelihood(
            xd, torch.tensor(mu, dtype=torch.float64), torch.tensor(math.log(sigma), dtype=torch.float64))
        n = Normal(torch.tensor(mu, dtype=torch.float64), sigma)
        expect = torch.cat([n.cdf(xd[:1] + 1 / 255).log(),
                            (n.cdf(xd[1:-1] + 1 / 255) - n.cdf(xd[1:-1] - 1 / 255)).log(),
                            (1 - n.cdf(xd[-1:] - 1 / 255)).log()])
        finite = expect > -25  # bins below exp(-25) are clamped to 1e-12 by design
        torch.testing.assert_close(got[finite], expect[finite], rtol=1e-6, atol=1e-6)
        assert (got[~finite] < -20).all()


def test_gaussian_kl_matches_torch_distributions_per_row():
    mu = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
    logvar = torch.tensor([[0.3, -0.7, -4.0], [1.5, 0.0, -2.0]])
    expect = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(vae.gaussian_kl(mu, logvar), expect)


def test_dae_corruption_has_the_configured_strength():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    noise = DAE(VAEConfig(noise_level=0.2)).corrupt(x) - x
    assert abs(noise.std().item() - 0.2) < 0.005 and abs(noise.mean().item()) < 0.005
    masked = DAE(VAEConfig(noise="mask", noise_level=0.2)).corrupt(x)
    changed = masked != x
    assert abs(changed.float().mean().item() - 0.2) < 0.01
    assert (masked[changed] == -1).all()  # masking sets inputs to the background value


def test_kl_warmup_weight_is_linear_then_one():
    m = VAE(VAEConfig(kl_warmup=0.4))
    for step, weight in [(0, 0.0), (10, 0.25), (30, 0.75), (40, 1.0), (90, 1.0)]:
        m.set_progress(step, 100)
        assert m.kl_weight == pytest.approx(weight)
    m = VAE(VAEConfig(kl_warmup=0.0))
    m.set_progress(0, 100)
    assert m.kl_weight == 1.0


def test_encode_splits_mu_and_clamped_logvar():
    m = VAE(CFG)
    out = torch.tensor([[0.1, -0.2, 0.3, -50.0, 0.5, 40.0]])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return out.expand(x.shape[0], -1)

    m.encoder = Fixed()
    mu, logvar = m.encode(images(2))
    assert torch.equal(mu, out[:, :3].expand(2, -1))
    assert torch.equal(logvar, torch.tensor([[-30.0, 0.5, 20.0]]).expand(2, -1))


@pytest.mark.parametrize("cls", [AE, VAE])
def test_reconstruct_decodes_the_code_of_the_input(cls):
    torch.manual_seed(0)
    m = cls(CFG).eval()
    with torch.no_grad():
        m.decoder.net[-1].weight.mul_(50)  # means beyond [-1, 1], so the clamp acts
    x = images(3)
    code = m.encode(x)[0] if cls is VAE else m.encode(x)
    expect = m.decoder(code).clamp(-1, 1)
    got = m.reconstruct(x)
    assert (got.abs() == 1).any() and (got.abs() < 1).any()
    torch.testing.assert_close(got, expect)
    assert (got - x).abs().mean() > 0.1  # not the input handed back
    # the code comes from this x: another input gives another reconstruction
    assert not torch.allclose(got, m.reconstruct(images(3, seed=1)))


def test_elbo_terms_and_log_px_match_an_independent_computation():
    m = sharp_vae()
    x = images_of(m)
    mu, logvar = m.encode(x)
    assert logvar.mean() < -2.5  # the narrow posterior of sharp_vae
    torch.manual_seed(7)
    eps = torch.randn_like(mu)
    z = Normal(mu, torch.exp(0.5 * logvar)).loc + torch.exp(0.5 * logvar) * eps
    torch.manual_seed(7)
    log_px, kl = m.elbo_terms(x)
    torch.testing.assert_close(log_px, reference_log_px(m, x, z))
    torch.testing.assert_close(kl, kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1))
    torch.testing.assert_close(m.log_px_given_z(x, z), reference_log_px(m, x, z))


def test_loss_weights_the_kl_and_reports_nats_and_bits():
    m = sharp_vae()
    x = images_of(m)
    m.set_progress(1, 10)  # warm-up: kl weight 0.2
    assert m.kl_weight == pytest.approx(0.2)
    torch.manual_seed(3)
    log_px, kl = m.elbo_terms(x)
    torch.manual_seed(3)
    out = m.loss({"image": x, "label": None, "caption": [""] * 3})
    torch.testing.assert_close(out["loss"], (0.2 * kl - log_px).mean() / D)
    torch.testing.assert_close(out["recon_nats"], -log_px.mean())
    torch.testing.assert_close(out["kl_nats"], kl.mean())
    torch.testing.assert_close(out["bpd"], (kl - log_px).mean() / (D * math.log(2)))
    assert kl.mean() > 1  # the parts differ enough for the weights to show


def test_iwae_bound_matches_importance_sampling_and_is_far_above_the_elbo():
    m = sharp_vae()
    x = images_of(m, 2)
    k = 16
    mu, logvar = m.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    torch.manual_seed(11)
    log_w = []
    for _ in range(k):
        z = mu + q.scale * torch.randn_like(mu)
        log_w.append(reference_log_px(m, x, z) + Normal(0.0, 1.0).log_prob(z).sum(1)
                     - q.log_prob(z).sum(1))
    expect = torch.logsumexp(torch.stack(log_w), 0) - math.log(k)
    torch.manual_seed(11)
    got = m.iwae_bound(x, k)
    torch.testing.assert_close(got, expect)
    # here the bound sits nats, not hundredths, above the ELBO (the mean of the same log w)
    elbo = torch.stack(log_w).mean(0)
    assert (got - elbo).min() > 3.0


def test_evaluate_reports_the_elbo_iwae_and_psnr_formulas():
    m = sharp_vae()
    x = images_of(m)
    torch.manual_seed(5)
    log_px, kl = m.elbo_terms(x)
    iwae = m.iwae_bound(x, 4)
    torch.manual_seed(5)
    out = m.evaluate({"image": x}, iwae_k=4)
    elbo = (log_px - kl).mean()
    torch.testing.assert_close(out["elbo_nats"], elbo)
    torch.testing.assert_close(out["elbo_bpd"], -elbo / (D * math.log(2)))
    torch.testing.assert_close(out["recon_nats"], -log_px.mean())
    torch.testing.assert_close(out["kl_nats"], kl.mean())
    torch.testing.assert_close(out["iwae_nats"], iwae.mean())
    torch.testing.assert_close(out["iwae_bpd"], -iwae.mean() / (D * math.log(2)))
    mse = (m.reconstruct(x) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"], mse.mean())
    torch.testing.assert_close(out["psnr"], (10 * torch.log10(4 / mse)).mean())
    assert "iwae_nats" not in m.evaluate({"image": x})


def test_ae_loss_is_the_mse_of_the_corrupted_input_reconstruction():
    torch.manual_seed(0)
    m = DAE(VAEConfig(image_size=8, channels=(4,), latent_dim=3, noise_level=0.5)).train()
    x = images(3)
    torch.manual_seed(2)
    x_tilde = m.corrupt(x)
    expect = (m.decoder(m.encode(x_tilde)) - x).pow(2).mean()  # target: the clean x
    torch.manual_seed(2)
    out = m.loss({"image": x})
    torch.testing.assert_close(out["loss"], expect)
    torch.testing.assert_close(out["mse"], expect)


def test_sample_decodes_prior_draws_scaled_by_temperature():
    torch.manual_seed(0)
    m = VAE(CFG).eval()
    with torch.no_grad():
        m.decoder.net[-1].weight.mul_(50)  # means beyond [-1, 1], so the clamp acts
    torch.manual_seed(4)
    z = 0.5 * torch.randn(3, CFG.latent_dim)
    expect = m.decoder(z).clamp(-1, 1)
    assert (expect.abs() == 1).any()
    torch.manual_seed(4)
    got = m.sample(3, temperature=0.5)
    torch.testing.assert_close(got, expect)
    torch.manual_seed(4)
    assert not torch.allclose(m.sample(3), got)
