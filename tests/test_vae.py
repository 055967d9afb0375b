"""vae.py: shapes, losses, the paper's identities and the bounds."""
import math

import pytest
import torch

import vae
from data import ShapesDataset
from vae import AE, DAE, VAE, VAEConfig

CFG = VAEConfig(image_size=16, channels=(8, 16), latent_dim=4)


def batch(n=6, size=16, seed=0):
    ds = ShapesDataset(n, size, seed=seed)
    x = torch.stack([ds[i]["image"] for i in range(n)])
    return {"image": x, "label": torch.zeros(n, dtype=torch.long), "caption": [""] * n}


@pytest.mark.parametrize("cls", [AE, DAE, VAE])
def test_shapes_finite_loss_and_gradient(cls):
    torch.manual_seed(0)
    m = cls(CFG)
    b = batch()
    out = m.loss(b)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.reconstruct(b["image"]).shape == b["image"].shape


@pytest.mark.parametrize("cls", [AE, VAE])
def test_loss_falls_when_overfitting_one_batch(cls):
    torch.manual_seed(0)
    m, b = cls(CFG), batch(4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = m.loss(b)["loss"].item()
    for _ in range(40):
        opt.zero_grad()
        m.loss(b)["loss"].backward()
        opt.step()
    assert m.loss(b)["loss"].item() < 0.5 * first


def test_ae_and_dae_cannot_sample():
    for cls in (AE, DAE):
        with pytest.raises(NotImplementedError, match="learns no distribution"):
            cls(CFG).sample(2)


def test_dae_corrupts_only_in_training():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    m = DAE(CFG)
    assert not torch.equal(m.corrupt(x), x)
    masked = DAE(VAEConfig(**{**CFG.__dict__, "noise": "mask", "noise_level": 0.5})).corrupt(x)
    assert 0.3 < (masked != x).float().mean() < 0.7
    assert torch.equal(m.eval().corrupt(x), x)


def test_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, -0.7]])
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 2)
    log_q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert abs((log_q - log_p).mean() - vae.gaussian_kl(mu, logvar)[0]) < 0.01
    assert vae.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_discretized_likelihood_bins_sum_to_one():
    bins = torch.arange(256).float() / 127.5 - 1  # every 8-bit value
    for mu, log_sigma in [(0.3, math.log(0.1)), (-0.9, math.log(0.5)), (0.0, math.log(0.002))]:
        lp = vae.discretized_gaussian_log_likelihood(bins, torch.tensor(mu), torch.tensor(log_sigma))
        assert abs(lp.exp().sum().item() - 1) < 1e-4


def test_iwae_bound_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    m = VAE(CFG).eval()
    b = batch(4)
    elbos = torch.stack([m.evaluate(b)["elbo_nats"] for _ in range(20)]).mean()
    iwae = m.evaluate(b, iwae_k=16)["iwae_nats"]
    assert iwae >= elbos - 1e-3
    out = m.evaluate(b)
    assert torch.isclose(out["elbo_bpd"], -out["elbo_nats"] / (3 * 16 * 16 * math.log(2)))


def test_sampling_is_reproducible_under_a_seed():
    m = VAE(CFG).eval()
    torch.manual_seed(5)
    a = m.sample(3)
    torch.manual_seed(5)
    assert torch.equal(a, m.sample(3)) and a.shape == (3, 3, 16, 16)
    assert a.abs().max() <= 1


def test_presets_build_and_paper_count():
    with torch.device("meta"):
        m = VAE(vae.PRESETS["vae-mnist"])
    assert sum(p.numel() for p in m.parameters()) == 815_825  # 815,824 + the decoder sigma
    for cfg in vae.PRESETS.values():
        VAE(cfg)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        VAE(VAEConfig(image_size=20, channels=(8, 8, 8)))
    with pytest.raises(ValueError, match="arch"):
        VAE(VAEConfig(arch="rnn"))


def test_kl_warmup_weights_the_kl_and_ends_at_the_elbo():
    torch.manual_seed(0)
    m, b = VAE(CFG), batch(4)
    m.set_progress(0, 100)
    torch.manual_seed(1)
    start = m.loss(b)
    assert m.kl_weight == 0 and torch.isclose(start["loss"] * 3 * 16 * 16, start["recon_nats"])
    m.set_progress(50, 100)
    assert m.kl_weight == 1.0
    torch.manual_seed(1)
    end = m.loss(b)
    assert torch.isclose(end["loss"] * 3 * 16 * 16, end["recon_nats"] + end["kl_nats"])
