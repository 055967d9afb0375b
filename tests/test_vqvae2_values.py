"""vqvae2.py value checks (issue 26): attention recomputed by hand, the conditions of the priors,
the two-level autoencoder's data flow, the losses, and sampling that carries the top codes and
the label to the bottom level."""
import dataclasses
import math

import torch
import torch.nn.functional as F

import vqvae2

TINY = dataclasses.replace(
    vqvae2.PRESETS["tiny"], image_size=16, hidden=8, res_hidden=4, num_res_blocks=1,
    num_codes=8, code_dim=3, restart_after=0, num_classes=3, top_channels=4, top_layers=2,
    top_heads=2, top_attention=1, bottom_channels=4, bottom_layers=2, bottom_cond_blocks=1,
    prior_out_hidden=8,
)


def images(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 16, 16, generator=g) * 2 - 1


def decisive_model(seed=0):
    """Codebooks on encoder outputs (so images use several codes of each level) and sharp priors
    whose label and top-code conditions decide the codes, as trained ones do."""
    torch.manual_seed(seed)
    model = vqvae2.VQVAE2(TINY).eval()
    ae = model.vqvae
    with torch.no_grad():
        x = images(8, seed=9)
        h_b = ae.enc_b(x)
        z_t = ae.pre_quant_t(ae.enc_t(h_b))
        ae.quantizer_t.restart_dead_codes(z_t.permute(0, 2, 3, 1).reshape(-1, 3))
        z_b = ae.pre_quant_b(torch.cat([h_b, ae.dec_t(ae.quantizer_t(z_t, False)["z_q"])], 1))
        ae.quantizer_b.restart_dead_codes(z_b.permute(0, 2, 3, 1).reshape(-1, 3))
        for prior in (model.prior_top, model.prior_bottom):
            prior.out[-1].weight.mul_(30)
            prior.label_embed.weight.mul_(3)
        model.prior_bottom.cond_stack[-1].weight.mul_(10)
    return model


def test_attention_matches_a_hand_computation():
    torch.manual_seed(0)
    B, C, H, W, heads = 2, 6, 2, 3, 2  # 3 channels per head: heads != channels per head
    att = vqvae2.CausalSelfAttention(C, heads, H * W)
    with torch.no_grad():
        att.pos.normal_()
    h, x = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    N, d = H * W, C // heads
    hs = F.layer_norm(h.flatten(2).transpose(1, 2) + att.pos, (C,), att.norm.weight, att.norm.bias)
    xs = torch.zeros(B, N, C)
    xs[:, 1:] = x.flatten(2).transpose(1, 2)[:, :-1]  # x_{j-1}; nothing before position 0
    q = hs @ att.q.weight.t() + att.q.bias
    kv = torch.cat([hs, xs], -1) @ att.kv.weight.t() + att.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    out = torch.zeros(B, N, C)
    for a in range(heads):
        s = slice(a * d, (a + 1) * d)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d)  # (B, N, N)
        scores = scores.masked_fill(torch.ones(N, N).triu(1).bool(), float("-inf"))
        out[..., s] = scores.softmax(-1) @ v[..., s]
    y = out @ att.proj.weight.t() + att.proj.bias
    expect = h + y.transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(att(h, x), expect, atol=1e-5, rtol=1e-5)


def test_condition_sums_label_and_top_code_terms_per_layer():
    torch.manual_seed(0)
    prior = vqvae2.PixelCNNPrior(K=6, channels=4, layers=3, kernel=3, out_hidden=4, size=4,
                                 num_classes=3, cond_K=5, cond_blocks=1, res_hidden=4)
    label = torch.tensor([2, -1, 0])
    top = torch.randint(0, 5, (3, 2, 2))
    both = prior.condition(3, label, top)
    lab = prior.label_embed(torch.tensor([2, 3, 0])).view(3, 3, 8, 1, 1)  # -1: row num_classes
    spatial = prior.cond_stack(prior.cond_embed(top).permute(0, 3, 1, 2)).view(3, 3, 8, 4, 4)
    # the layout of the top map matters (a transposed map conditions differently)
    transposed = prior.cond_stack(prior.cond_embed(top).permute(0, 3, 2, 1)).view(3, 3, 8, 4, 4)
    assert not torch.allclose(spatial, transposed)
    for i in range(3):
        torch.testing.assert_close(both[i], lab[:, i] + spatial[:, i])
    only_label = prior.condition(3, label)
    only_top = prior.condition(3, None, top)
    for i in range(3):
        torch.testing.assert_close(only_label[i], lab[:, i])
        torch.testing.assert_close(only_top[i], spatial[:, i])
    assert prior.condition(2) == [None] * 3


def test_autoencoder_data_flow_by_hand():
    """Algorithm 1: the bottom code map is quantised from [h_bottom, dec_t(e_top)], and the decoder
    reads the upsampled top map joined with the bottom map."""
    model = decisive_model()
    ae, x = model.vqvae, images()
    with torch.no_grad():
        ae.decoder.net[-1].weight.mul_(50)  # outputs beyond [-1, 1], so decode's clamp acts
    out = ae(x, update=False)
    assert (out["x_hat"].abs() > 1).any()
    h_b = ae.enc_b(x)
    qt = ae.quantizer_t(ae.pre_quant_t(ae.enc_t(h_b)), update=False)
    z_e_bot = ae.pre_quant_b(torch.cat([h_b, ae.dec_t(qt["z_q"])], 1))
    qb = ae.quantizer_b(z_e_bot, update=False)
    assert torch.equal(out["top"]["codes"], qt["codes"])
    assert torch.equal(out["bottom"]["codes"], qb["codes"])
    x_hat = ae.decoder(torch.cat([ae.upsample_t(qt["z_q"]), qb["z_q"]], 1))
    torch.testing.assert_close(out["x_hat"], x_hat)
    torch.testing.assert_close(model.decode(qt["codes"], qb["codes"]), x_hat.clamp(-1, 1))
    assert len(qt["codes"].unique()) > 1 and len(qb["codes"].unique()) > 1
    # the bottom codes depend on the top codes: other top codes, other bottom codes (with the
    # weight on dec_t's features raised, as training raises it when the top codes inform)
    with torch.no_grad():
        ae.pre_quant_b.weight[:, TINY.hidden:] *= 20
        qb = ae(x, update=False)["bottom"]
        ae.quantizer_t.e.normal_()  # top maps far from the ones before
    assert not torch.equal(ae(x, update=False)["bottom"]["codes"], qb["codes"])


def test_losses_and_evaluate_values():
    model = decisive_model()
    x, label = images(), torch.tensor([0, 0, 0])
    b = {"image": x, "label": label, "caption": [""] * 3}
    out = model.vqvae(x, update=False)
    top, bottom = out["top"]["codes"], out["bottom"]["codes"]
    recon = F.mse_loss(out["x_hat"], x)
    loss = model.loss(b, "vqvae")
    vq = out["top"]["loss"] + out["bottom"]["loss"]
    torch.testing.assert_close(loss["loss"], recon + vq)
    torch.testing.assert_close(loss["recon"], recon)
    torch.testing.assert_close(loss["vq"], vq)
    assert out["top"]["loss"] > 1e-5 * recon and out["bottom"]["loss"] > 1e-5 * recon
    nll_t = F.cross_entropy(model.prior_top(top, label), top)
    nll_b = F.cross_entropy(model.prior_bottom(bottom, label, top), bottom)
    torch.testing.assert_close(model.loss(b, "prior_top")["loss"], nll_t)
    torch.testing.assert_close(model.loss(b, "prior_top")["bits_per_code"], nll_t / math.log(2))
    torch.testing.assert_close(model.loss(b, "prior_bottom")["loss"], nll_b)
    torch.testing.assert_close(model.loss(b, "prior_bottom")["bits_per_code"], nll_b / math.log(2))
    # the bottom prior's loss reads the top codes and the label
    assert not torch.isclose(nll_b, F.cross_entropy(model.prior_bottom(bottom, label, (top + 1) % 8), bottom))
    other = {**b, "label": torch.tensor([1, 1, 1])}
    assert not torch.isclose(model.loss(other, "prior_bottom")["loss"], nll_b)
    assert not torch.isclose(model.loss(other, "prior_top")["loss"], nll_t)
    ev = model.evaluate(b)
    mse = (out["x_hat"].clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(ev["mse"], mse.mean())
    torch.testing.assert_close(ev["psnr"], (10 * torch.log10(4 / mse)).mean())
    torch.testing.assert_close(ev["top_bits_per_code"], nll_t / math.log(2))
    torch.testing.assert_close(ev["bottom_bits_per_code"], nll_b / math.log(2))
    torch.testing.assert_close(ev["codes_in_use_top"], out["top"]["usage"])
    torch.testing.assert_close(ev["codes_in_use_bottom"], out["bottom"]["usage"])
    torch.testing.assert_close(model.reconstruct(x), out["x_hat"].clamp(-1, 1))


def full_map_sampler(prior, label, cond, size, T, B):
    """Algorithm 2 the slow way: every step runs the prior on the whole (zero-padded) map."""
    def logits_fn(codes, rows):
        full = torch.zeros(B, size, size, dtype=torch.long)
        full[:, :rows] = codes
        return prior(full, label, cond)[:, :, :rows]
    return vqvae2.sample_codes(logits_fn, B, size, size, T, "cpu")


def test_sampling_carries_label_and_top_codes_to_the_bottom_level():
    model = decisive_model()
    y = torch.full((2,), 1)
    torch.manual_seed(3)
    top = full_map_sampler(model.prior_top, y, None, model.size_t, 0.8, 2)
    bottom = full_map_sampler(model.prior_bottom, y, top, model.size_b, 0.8, 2)
    torch.manual_seed(3)
    got = model.sample(2, temperature=0.8, label=1)
    torch.testing.assert_close(got, model.decode(top, bottom))
    # the bottom prior's draws follow the top codes it is given
    torch.manual_seed(4)
    a = model.prior_bottom.sample(2, model.size_b, 0.8, y, top)
    torch.manual_seed(4)
    b = model.prior_bottom.sample(2, model.size_b, 0.8, y, (top + 3) % 8)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    assert not torch.equal(model.sample(2, temperature=0.8, label=2), got)
