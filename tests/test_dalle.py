"""Tests of dalle.py on tiny configs, CPU only."""

import dataclasses
import math

import pytest
import torch

import dalle
from dalle import DALLE, PRESETS, DALLEConfig

# smaller than the tiny preset so every test runs in well under a second or two
CFG = dataclasses.replace(
    PRESETS["tiny"], image_size=16, image_vocab_size=32, n_hid=8, n_init=8, text_len=16, d_model=32, n_layer=2, n_head=2
)


def make_batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # flat 4x4 patches of 8-bit colours: one patch per dVAE grid cell, like the shapes data
    x = torch.randint(0, 256, (B, 3, 4, 4), generator=g).float() / 255 * 2 - 1
    x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (B, 3, 16, 16)
    captions = ["a red circle", "a Blue square", "", "a green triangle at the top"][:B]
    return {"image": x, "label": torch.full((B,), -1), "caption": captions}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DALLE(CFG)


def test_dalle_12b_preset_has_12_billion_parameters():
    with torch.device("meta"):
        m = DALLE(PRESETS["dalle-12b"])
    n = sum(p.numel() for p in m.transformer.parameters())
    assert abs(n - 12e9) / 12e9 < 0.05, n
    assert m.grid == 32 and m.transformer.cfg.d_model == 62 * 64
    # 1024 image tokens of 8192 codes at 256x256, as in the paper
    logits = torch.empty(1, 3, 256, 256, device="meta")
    assert m.dvae.encoder(logits).shape == (1, 8192, 32, 32)


def test_shapes_and_finite_losses_and_gradients_per_phase(model):
    batch = make_batch()
    z = model.dvae.encode_tokens(batch["image"])
    assert z.shape == (4, 16) and z.dtype == torch.long and int(z.max()) < CFG.image_vocab_size
    assert model.dvae.decode_tokens(z).shape == (4, 3, 16, 16)
    assert model.reconstruct(batch["image"]).abs().max() <= 1
    model.set_progress(5, 10, "dvae")
    for phase in model.phases:
        model.zero_grad()
        out = model.loss(batch, phase)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        trained = model.phase_module(phase)
        other = model.phase_module([p for p in model.phases if p != phase][0])
        grads = [p.grad for p in trained.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # the Transformer phase reads the dVAE's tokens without gradient
        if phase == "transformer":
            assert all(p.grad is None or (p.grad == 0).all() for p in other.parameters())
    assert {id(p) for p in model.dvae.parameters()}.isdisjoint(id(p) for p in model.transformer.parameters())


def test_logit_laplace_is_the_density_of_a_squashed_laplace():
    # f(x | mu, b) = Laplace(mu, b).pdf(logit x) / (x (1 - x)), and it integrates to 1 on (0, 1)
    mu, ln_b = torch.tensor(0.7), torch.tensor(-0.5)
    x = torch.tensor([0.05, 0.3, 0.5, 0.93])
    expect = -(torch.distributions.Laplace(mu, ln_b.exp()).log_prob(torch.logit(x)) - torch.log(x * (1 - x)))
    torch.testing.assert_close(dalle.logit_laplace_nll(x, mu, ln_b), expect)
    grid = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    pdf = torch.exp(-dalle.logit_laplace_nll(grid, mu.double(), ln_b.double()).double())
    assert abs(torch.trapezoid(pdf, grid).item() - 1) < 1e-3
    # the discretized version used for training: a distribution over the 256 pixel values, with
    # finite gradients even far from the data, and density x bin width for a narrow interior bin
    for m, lb in ((0.3, -0.5), (-2.5, -3.0), (10.0, -6.0), (0.0, 2.0)):
        mu_k = torch.full((256,), m, requires_grad=True)
        nll = dalle.discretized_logit_laplace_nll(torch.arange(256) / 255, mu_k, torch.full((256,), lb), 0.1)
        assert torch.exp(-nll.double()).sum().item() == pytest.approx(1, abs=1e-6)
        nll.sum().backward()
        assert torch.isfinite(mu_k.grad).all()
    x01 = torch.tensor([100 / 255])
    width = 0.8 / 255  # phi shrinks [0, 1] by 1 - 2 eps
    expect = dalle.logit_laplace_nll(dalle.map_pixels(x01, 0.1), mu, ln_b) - math.log(width)
    torch.testing.assert_close(dalle.discretized_logit_laplace_nll(x01, mu, ln_b, 0.1), expect, rtol=1e-4, atol=1e-4)
    # phi keeps pixels away from logit's poles and inverts exactly
    x01 = torch.tensor([0.0, 0.5, 1.0])
    assert dalle.map_pixels(x01, 0.1).tolist() == pytest.approx([0.1, 0.5, 0.9])
    torch.testing.assert_close(dalle.unmap_pixels(dalle.map_pixels(x01, 0.1), 0.1), x01)


def test_logit_normal_is_the_density_of_a_squashed_normal():
    # f(x | mu, sigma) = Normal(mu, sigma).pdf(logit x) / (x (1 - x)), and it integrates to 1 on (0, 1)
    mu, sigma = torch.tensor(-0.4), 0.6
    x = torch.tensor([0.05, 0.3, 0.5, 0.93])
    expect = -(torch.distributions.Normal(mu, sigma).log_prob(torch.logit(x)) - torch.log(x * (1 - x)))
    torch.testing.assert_close(dalle.logit_normal_nll(x, mu, sigma), expect)
    grid = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    pdf = torch.exp(-dalle.logit_normal_nll(grid, mu.double(), sigma).double())
    assert abs(torch.trapezoid(pdf, grid).item() - 1) < 1e-3


def test_tiny_pixel_likelihood_lets_a_minority_colour_through():
    # Guards the failure that kept the tiny dVAE black. Where the codes do not yet pin a pixel, the
    # decoder's best (mu, ln_b) is the likelihood's fit to the pixel's values over the data; on the
    # shapes data most are black. Red in 1 of 4 images must pull the readout phi^-1(sigmoid(mu))
    # off black, so the encoder is rewarded for saying where the red is. The logit-Laplace's
    # location is a median and stays black: the tiny dVAE trained that way reconstructed black.
    x01 = torch.zeros(4, 3, 1, 1)
    x01[0, 0] = 1.0  # one red pixel among three black ones

    def fitted_readout(cfg):
        dvae = DALLE(cfg).dvae
        mu = torch.zeros(1, 3, 1, 1, requires_grad=True)
        ln_b = torch.zeros(1, 3, 1, 1, requires_grad=True)
        opt = torch.optim.Adam([mu, ln_b], lr=0.05)
        for _ in range(400):
            nll = dvae.pixel_nll(x01, mu.expand(4, 3, 1, 1), ln_b.expand(4, 3, 1, 1)).mean()
            opt.zero_grad()
            nll.backward()
            opt.step()
        return dalle.unmap_pixels(torch.sigmoid(mu.detach()), cfg.logit_laplace_eps).flatten()  # (3,) in [0, 1]

    small = dataclasses.replace(CFG, image_vocab_size=8, n_hid=4, n_init=4, d_model=8, n_layer=1, n_head=1)
    red, green, blue = fitted_readout(dataclasses.replace(small, pixel_likelihood=PRESETS["tiny"].pixel_likelihood))
    assert red > 0.1 and green < 0.01 and blue < 0.01
    red_laplace = fitted_readout(dataclasses.replace(small, pixel_likelihood="logit-laplace"))[0]
    assert red_laplace < 0.01  # the median: black


def test_kl_to_the_uniform_prior(model):
    # KL(q || U(K)) is 0 for uniform q and ln K for one-hot q: check through dvae_loss's kl part
    K = CFG.image_vocab_size
    x = make_batch()["image"]
    enc_out = model.dvae.encoder.blocks[-1]
    with torch.no_grad():
        enc_out.weight.zero_()
        enc_out.bias.zero_()
        assert model.dvae_loss(x, 1.0, 1.0)["kl"].item() == pytest.approx(0, abs=1e-6)
        enc_out.bias[3] = 1e4
        assert model.dvae_loss(x, 1.0, 1.0)["kl"].item() == pytest.approx(math.log(K), rel=1e-4)


def test_schedules_anneal_tau_and_ramp_beta(model):
    taus, betas = [], []
    for step in range(0, 101, 5):
        model.set_progress(step, 100, "dvae")
        taus.append(model.tau)
        betas.append(model.beta)
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(1 / 16)
    assert betas[0] == 0.0 and betas[-1] == pytest.approx(CFG.beta_max)
    assert all(a >= b for a, b in zip(taus, taus[1:])) and all(a <= b for a, b in zip(betas, betas[1:]))
    # beta is full after beta_ramp of the phase, tau after tau_anneal
    model.set_progress(int(100 * CFG.beta_ramp), 100, "dvae")
    assert model.beta == pytest.approx(CFG.beta_max)
    assert PRESETS["dalle-12b"].beta_max == 6.6 and PRESETS["dalle-12b"].tau_end == 1 / 16
    tau, beta = model.tau, model.beta
    model.set_progress(0, 100, "transformer")  # other phases leave the schedules alone
    assert (model.tau, model.beta) == (tau, beta)


def test_tokenizer_round_trip_and_padding(model):
    text = model.tokenize(["A Red Circle", ""])
    tr = model.transformer
    assert text.shape == (2, CFG.text_len)
    assert (text[:, 0] == tr.sot_id).all()
    # per-position padding tokens: position j holds pad_id + j
    assert text[1, 1:].tolist() == [tr.pad_id + j for j in range(1, CFG.text_len)]
    assert model.detokenize(text) == ["a red circle", ""]
    assert model.tokenize(["x" * 100]).shape == (1, CFG.text_len)  # training captions are cut
    with pytest.raises(ValueError, match="shorten the prompt"):
        model.tokenize(["x" * 100], strict=True)


def test_transformer_is_causal(model):
    tr = model.transformer.eval()
    batch = make_batch(2)
    text = model.tokenize(batch["caption"])
    z = torch.randint(0, CFG.image_vocab_size, (2, 16))
    text_logits, image_logits = tr(text, z)
    assert text_logits.shape == (2, CFG.text_len - 1, CFG.text_vocab_size + CFG.text_len)
    assert image_logits.shape == (2, 16, CFG.image_vocab_size)
    k = 9
    z2 = z.clone()
    z2[:, k] = (z[:, k] + 1) % CFG.image_vocab_size
    t2, i2 = tr(text, z2)
    torch.testing.assert_close(t2, text_logits)
    torch.testing.assert_close(i2[:, : k + 1], image_logits[:, : k + 1])  # cell k predicts z_k from z_<k
    assert not torch.allclose(i2[:, k + 1 :], image_logits[:, k + 1 :])
    # changing a late caption byte leaves the earlier text logits alone but moves every image logit
    text2 = text.clone()
    text2[:, 5] = ord("q")
    t3, i3 = tr(text2, z)
    torch.testing.assert_close(t3[:, :5], text_logits[:, :5])
    assert not torch.allclose(i3, image_logits)


def test_key_value_cache_matches_full_forward(model):
    tr = model.transformer.eval()
    text = model.tokenize(["a red circle"] * 2)
    z = torch.randint(0, CFG.image_vocab_size, (2, 16))
    _, image_logits = tr(text, z)
    caches = [{} for _ in tr.blocks]
    soi = torch.full((2, 1), tr.soi_id)
    h = tr.run(torch.cat([tr.embed_text(text), tr.embed_image(soi)], 1), caches)
    steps = [tr.to_image_logits(h[:, -1])]
    for k in range(15):
        h = tr.run(tr.embed_image(z[:, k : k + 1], start=k + 1), caches)
        steps.append(tr.to_image_logits(h[:, -1]))
    torch.testing.assert_close(torch.stack(steps, 1), image_logits, atol=1e-5, rtol=1e-4)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(dalle.filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    # nucleus: the smallest set whose mass reaches top_p
    assert torch.isfinite(dalle.filter_logits(logits, None, 0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(dalle.filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(dalle.filter_logits(logits, None, 1.0)).all()
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(dalle.filter_logits(shuffled, None, 0.75)).tolist() == [[False, True, False, True]]


def test_overfitting_one_batch_lowers_both_losses(model):
    batch = make_batch()
    # the dVAE starts slowly (its resblocks are scaled by 1 / n_layers^2), hence the smaller margin
    for phase, lr, margin in (("dvae", 3e-3, 0.03), ("transformer", 3e-3, 0.3)):
        module = model.phase_module(phase)
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        torch.manual_seed(1)
        model.set_progress(100, 100, "dvae")
        first = model.loss(batch, phase)["loss"].item()
        for _ in range(30):
            loss = model.loss(batch, phase)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first - margin, (phase, first, loss.item())


def test_sampling_is_reproducible_and_checks_arguments(model):
    model.eval()
    torch.manual_seed(3)
    a = model.sample(2, prompt="a red circle", top_k=5)
    torch.manual_seed(3)
    b = model.sample(2, prompt="a red circle", top_k=5)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1
    torch.manual_seed(3)
    c = model.sample(2, prompt=["a red circle", "a blue square"], top_p=0.9, temperature=0.7)
    assert c.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="one prompt or exactly n"):
        model.sample(3, prompt=["a", "b"])
    with pytest.raises(ValueError, match="top_p"):
        model.sample(1, prompt="a", top_p=0.0)
    with pytest.raises(ValueError, match="reranker"):
        model.sample(1, prompt="a", candidates=4)


def test_unconditional_sampling_draws_well_formed_captions(model):
    model.eval()
    torch.manual_seed(0)
    text, z = model.generate_tokens(None, 6)
    V, tr = CFG.text_vocab_size, model.transformer
    assert z.shape == (6, 16)
    for row in text.tolist():
        assert row[0] == tr.sot_id
        padded = [j for j in range(1, CFG.text_len) if row[j] >= V]
        assert all(row[j] == tr.pad_id + j for j in padded)  # each position's own padding token
        assert padded == list(range(padded[0], CFG.text_len)) if padded else True  # only padding after it
    assert model.sample(2).shape == (2, 3, 16, 16)


def test_reranking_keeps_the_best_candidate_per_prompt(model):
    model.eval()
    seen = {}

    def brightness(images, captions):  # a stand-in for CLIP: prefers bright images
        seen["images"], seen["captions"] = images, captions
        return images.mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    best = model.sample(2, prompt=["a", "b"], candidates=3, rerank=brightness, chunk=4)
    assert seen["captions"] == ["a", "a", "a", "b", "b", "b"]
    groups = seen["images"].view(2, 3, 3, 16, 16)
    expect = groups[torch.arange(2), groups.mean(dim=(2, 3, 4)).argmax(dim=1)]
    torch.testing.assert_close(best, expect)
    with pytest.raises(ValueError, match="give a prompt"):
        model.sample(2, candidates=3, rerank=brightness)


def test_evaluate_reports_finite_figures(model):
    out = model.evaluate(make_batch())
    assert {"dvae_nll", "dvae_kl", "rec_mse", "prior_text_ce", "prior_image_ce"} <= set(out)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="text_vocab_size"):
        DALLE(dataclasses.replace(CFG, text_vocab_size=100))
    with pytest.raises(ValueError, match="divisible"):
        DALLE(dataclasses.replace(CFG, image_size=18))
    with pytest.raises(ValueError, match="phase"):
        DALLE(CFG).phase_module("prior")
    assert isinstance(DALLEConfig(), DALLEConfig)
