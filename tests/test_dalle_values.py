"""dalle.py value checks (issue 26): the relaxed ELB with its temperature and KL weight, the
schedules, the bin probabilities of the discretized logit-Laplace, the loss weights of stage two,
token embeddings, and sampling (captions, then images given them) against a slow reference."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Laplace, kl_divergence

import dalle
from dalle import DALLE, PRESETS

CFG = dataclasses.replace(
    PRESETS["tiny"], image_size=8, image_vocab_size=16, n_hid=4, n_init=8, group_count=2,
    text_len=8, d_model=16, n_layer=1, n_head=2, logit_laplace_eps=0.15, logit_normal_sigma=0.7,
)


def images(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, 8, 8), generator=g).float() / 127.5 - 1


def sharp_model(seed=0):
    """Confident encoder and Transformer (scaled output layers), as trained ones are, so that
    tokens and samples follow their inputs."""
    torch.manual_seed(seed)
    m = DALLE(CFG).eval()
    with torch.no_grad():
        m.dvae.encoder.blocks[-1].weight.mul_(20)
        m.transformer.to_image_logits.weight.mul_(40)
        m.transformer.to_text_logits.weight.mul_(40)
        for block in m.transformer.blocks:  # attention that reads the caption
            block.attn.c_attn.weight.mul_(10)
            block.attn.c_proj.weight.mul_(10)
    return m


def test_cosine_ramp_values():
    assert dalle.cosine_ramp(0.0, 1.0, 0.1) == pytest.approx(1.0)
    assert dalle.cosine_ramp(0.25, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert dalle.cosine_ramp(0.5, 2.0, 0.0) == pytest.approx(1.0)
    assert dalle.cosine_ramp(3.0, 1.0, 0.1) == pytest.approx(0.1)  # clamped after the ramp
    assert dalle.cosine_ramp(-1.0, 1.0, 0.1) == pytest.approx(1.0)


def test_unmap_pixels_inverts_and_clamps():
    eps = 0.15
    assert dalle.map_pixels(torch.tensor([0.0, 1.0]), eps).tolist() == pytest.approx([0.15, 0.85])
    x = torch.tensor([0.05, 0.15, 0.5, 0.85, 0.95])
    assert dalle.unmap_pixels(x, eps).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_set_progress_follows_the_cosine_schedules():
    m = DALLE(dataclasses.replace(CFG, tau_anneal=0.4, beta_ramp=0.2, beta_max=3.0, tau_start=2.0,
                                  tau_end=0.5))
    m.set_progress(10, 100, "dvae")  # 1/4 of tau's anneal, 1/2 of beta's ramp
    assert m.tau == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert m.beta == pytest.approx(1.5)
    m.set_progress(30, 100, "dvae")
    assert m.beta == pytest.approx(3.0) and m.tau == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    m = DALLE(dataclasses.replace(CFG, tau_anneal=0.0, beta_ramp=0.0))
    m.set_progress(0, 100, "dvae")
    assert m.tau == pytest.approx(CFG.tau_end) and m.beta == pytest.approx(CFG.beta_max)


def test_discretized_logit_laplace_bins_match_the_laplace_cdf():
    eps = 0.1
    mu, b = torch.tensor(0.4, dtype=torch.float64), 0.3
    k = torch.tensor([0, 1, 80, 140, 141, 200, 254, 255], dtype=torch.float64)
    L = Laplace(mu, b)

    def t(v):
        return torch.logit(torch.tensor(eps + (1 - 2 * eps) * v, dtype=torch.float64))

    expect = []
    for kk in k.tolist():
        lo = L.cdf(t((kk - 0.5) / 255)) if kk > 0 else 0.0
        hi = L.cdf(t((kk + 0.5) / 255)) if kk < 255 else 1.0
        expect.append(-torch.log(torch.as_tensor(hi - lo, dtype=torch.float64)))
    got = dalle.discretized_logit_laplace_nll(k / 255, mu.expand(8), torch.full((8,), math.log(b),
                                              dtype=torch.float64), eps)
    torch.testing.assert_close(got.double(), torch.stack(expect), rtol=1e-4, atol=1e-5)


def test_pixel_nll_uses_the_configured_likelihood_and_its_constants():
    x01 = torch.rand(1, 3, 4, 4)
    mu, ln_b = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4) * 0.3
    normal = DALLE(CFG).dvae
    torch.testing.assert_close(normal.pixel_nll(x01, mu, ln_b),
                               dalle.logit_normal_nll(0.15 + 0.7 * x01, mu, 0.7))
    laplace = DALLE(dataclasses.replace(CFG, pixel_likelihood="logit-laplace")).dvae
    torch.testing.assert_close(laplace.pixel_nll(x01, mu, ln_b),
                               dalle.discretized_logit_laplace_nll(x01, mu, ln_b, 0.15))


def test_tokens_are_the_argmax_of_the_encoder_and_decode_through_sigmoid():
    m = sharp_model()
    x = images(8)  # 128 cells: enough that a mis-scaled input flips some argmax
    logits = m.dvae.encoder(0.15 + 0.7 * (x + 1) / 2)  # phi of the [0, 1] image
    z = m.dvae.encode_tokens(x)
    assert torch.equal(z, logits.argmax(1).flatten(1))
    assert len(z.unique()) > 2
    y = F.one_hot(z.view(8, 4, 4), 16).permute(0, 3, 1, 2).float()
    mu = m.dvae.decoder(y)[0]
    expect = ((torch.sigmoid(mu) - 0.15) / 0.7).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(m.dvae.decode_tokens(z), expect)
    torch.testing.assert_close(m.reconstruct(x), expect)
    assert not torch.allclose(m.reconstruct(x), m.reconstruct(images(8, seed=1)))


@pytest.mark.parametrize("likelihood", ["logit-normal", "logit-laplace"])
def test_dvae_loss_is_the_relaxed_elb_with_its_tau_and_beta(likelihood):
    m = sharp_model()
    m.config = dataclasses.replace(CFG, pixel_likelihood=likelihood)
    m.dvae.cfg = m.config
    x = images()
    tau, beta = 0.37, 2.7
    x01 = (x + 1) / 2
    logits = m.dvae.encoder(0.15 + 0.7 * x01)  # (B, K, h, w)
    torch.manual_seed(9)
    u = torch.rand_like(logits)
    gumbel = -torch.log(-torch.log(u))
    y = torch.softmax((logits + gumbel) / tau, dim=1)
    mu, ln_b = m.dvae.decoder(y)
    nll = m.dvae.pixel_nll(x01, mu, ln_b).sum((1, 2, 3))
    q = Categorical(logits=logits.permute(0, 2, 3, 1))
    kl = kl_divergence(q, Categorical(logits=torch.zeros(16))).sum((1, 2))  # to the uniform prior
    D = 3 * 8 * 8
    torch.manual_seed(9)
    out = m.dvae_loss(x, tau, beta)
    torch.testing.assert_close(out["loss"], ((nll + beta * kl) / D).mean())
    torch.testing.assert_close(out["nll"], nll.mean() / D)
    torch.testing.assert_close(out["kl"], kl.mean() / 16)  # per grid cell
    x_hat = ((torch.sigmoid(mu) - 0.15) / 0.7).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(out["mse"], F.mse_loss(x_hat, x))
    q_mean = q.probs.mean((0, 1, 2))
    torch.testing.assert_close(out["perplexity"], torch.exp(Categorical(probs=q_mean).entropy()))
    assert out["tau"].item() == pytest.approx(tau) and out["beta"].item() == pytest.approx(beta)
    assert kl.mean() > 0.1  # the KL weight shows in the loss
    # the temperature reaches the relaxation: another tau, another reconstruction term
    torch.manual_seed(9)
    assert not torch.isclose(m.dvae_loss(x, 1.0, beta)["nll"], out["nll"])


def test_loss_passes_the_scheduled_tau_and_beta():
    m = sharp_model()
    m.set_progress(1, 20, "dvae")
    batch = {"image": images(), "label": torch.full((2,), -1), "caption": ["a", "b"]}
    torch.manual_seed(1)
    expect = m.dvae_loss(batch["image"], m.tau, m.beta)
    torch.manual_seed(1)
    out = m.loss(batch, "dvae")
    assert 0 < m.beta < CFG.beta_max and CFG.tau_end < m.tau < 1
    for k in ("loss", "tau", "beta"):
        torch.testing.assert_close(out[k], expect[k])


def test_transformer_loss_weights_text_and_image_cross_entropies():
    m = sharp_model()
    x, captions = images(), ["a red circle", "blue"]
    z = m.dvae.encode_tokens(x)
    text = m.tokenize(captions)
    text_logits, image_logits = m.transformer(text, z)
    ce_text = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text[:, 1:].reshape(-1))
    ce_image = F.cross_entropy(image_logits.reshape(-1, 16), z.reshape(-1))
    out = m.transformer_loss(x, captions)
    torch.testing.assert_close(out["text_ce"], ce_text)
    torch.testing.assert_close(out["image_ce"], ce_image)
    torch.testing.assert_close(out["loss"], ce_text / 8 + 7 * ce_image / 8)
    assert abs(ce_text - ce_image) > 0.1  # so swapped weights would show
    torch.testing.assert_close(m.loss({"image": x, "caption": captions}, "transformer")["loss"], out["loss"])


def test_image_embedding_adds_row_and_column_of_each_cell():
    m = sharp_model()
    tr = m.transformer
    ids = torch.tensor([[3, 16, 5]])  # 16: start-of-image
    got = tr.embed_image(ids, start=5)  # cells 5, 6, 7 of the 4 x 4 grid: row 1, columns 1, 2, 3
    rows, cols = torch.tensor([1, 1, 1]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(got[0], tr.image_emb(ids[0]) + tr.row_emb(rows) + tr.col_emb(cols))
    text = torch.tensor([[7, 8]])
    torch.testing.assert_close(tr.embed_text(text, start=3)[0],
                               tr.text_emb(text[0]) + tr.text_pos_emb(torch.tensor([3, 4])))


def test_forward_reads_start_of_image_then_the_earlier_tokens():
    m = sharp_model()
    tr = m.transformer
    text = m.tokenize(["ab", "c"])
    z = torch.randint(0, 16, (2, 16))
    image_in = torch.cat([torch.full((2, 1), tr.soi_id), z[:, :-1]], 1)
    h = tr.run(torch.cat([tr.embed_text(text), tr.embed_image(image_in)], 1))
    text_logits, image_logits = tr(text, z)
    torch.testing.assert_close(text_logits, tr.to_text_logits(h[:, : CFG.text_len - 1]))
    torch.testing.assert_close(image_logits, tr.to_image_logits(h[:, CFG.text_len:]))


def slow_generate(m, text, n, temperature, top_k, top_p):
    """Ancestral sampling with full forwards and no cache: captions (when text is None) position by
    position, a caption byte or that position's padding token, only padding after padding;
    then the image tokens given the caption."""
    tr, T, V = m.transformer, CFG.text_len, CFG.text_vocab_size

    def pick(logits):
        logits = dalle.filter_logits(logits / temperature, top_k, top_p)
        return torch.multinomial(logits.softmax(-1), 1)[:, 0]

    z = torch.zeros(n, 16, dtype=torch.long)
    if text is None:
        text = torch.full((n, T), tr.sot_id)
        for j in range(1, T):
            logits = tr(text, z)[0][:, j - 1]
            bad = torch.ones_like(logits, dtype=torch.bool)
            bad[:, :V] = False
            bad[:, V + j] = False
            if j > 1:
                bad[text[:, j - 1] >= V, :V] = True
            text[:, j] = pick(logits.masked_fill(bad, float("-inf")))
    for k in range(16):
        z[:, k] = pick(tr(text, z)[1][:, k])
    return text, z


@pytest.mark.parametrize("prompted", [True, False])
def test_generate_tokens_matches_slow_ancestral_sampling(prompted):
    m = sharp_model()
    with torch.no_grad():  # padding about as likely as a byte, so both rules of the mask act
        m.transformer.to_text_logits.bias[CFG.text_vocab_size:] += 6
    text = m.tokenize(["a red", "xy", "", "q"]) if prompted else None
    torch.manual_seed(2)
    expect = slow_generate(m, text, 4, 1.3, 6, 0.95)
    torch.manual_seed(2)
    got = m.generate_tokens(text, 4, temperature=1.3, top_k=6, top_p=0.95)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    if not prompted:
        padded = got[0][:, 1:] >= CFG.text_vocab_size
        assert padded.any() and not padded.all()  # captions of bytes, then padding


def test_samples_follow_the_prompt():
    m = sharp_model()
    torch.manual_seed(5)
    _, z = m.generate_tokens(m.tokenize(["red"] * 2), 2, temperature=0.5)
    torch.manual_seed(5)
    got = m.sample(2, prompt="red", temperature=0.5)
    torch.testing.assert_close(got, m.dvae.decode_tokens(z))
    torch.manual_seed(5)
    assert not torch.equal(m.sample(2, prompt="blue", temperature=0.5), got)
    torch.manual_seed(5)
    assert not torch.equal(m.sample(2, prompt="red", temperature=2.0), got)


def test_filter_logits_per_row_and_combined():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    keep = torch.isfinite(dalle.filter_logits(logits, 3, 0.7)).tolist()
    assert keep == [[True, True, False, False], [False, False, True, True]]
    keep = torch.isfinite(dalle.filter_logits(logits, 1, None)).tolist()
    assert keep == [[True, False, False, False], [False, False, False, True]]
    assert torch.isfinite(dalle.filter_logits(logits, 4, None)).all()
    kept = dalle.filter_logits(logits, 3, None)
    torch.testing.assert_close(kept[0, :3], logits[0, :3])  # kept logits are not changed
