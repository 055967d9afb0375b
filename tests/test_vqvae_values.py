"""vqvae.py value checks (issue 26): the quantiser's loss terms and gradients, dead-code restarts,
the gated unit, label conditioning and ancestral sampling, against hand-worked values."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import vqvae

TINY = dataclasses.replace(
    vqvae.PRESETS["tiny"], image_size=8, hidden=8, res_hidden=4, num_res_blocks=1,
    num_codes=8, code_dim=3, restart_after=0, num_classes=3, prior_channels=4, prior_layers=2,
    prior_out_hidden=8,
)


def images(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 8, 8, generator=g) * 2 - 1


def decisive_model(seed=0):
    """A VQ-VAE whose codebook sits on encoder outputs (so images use several codes) and whose
    prior is sharp and label-driven (large output and label weights), as a trained one is."""
    torch.manual_seed(seed)
    model = vqvae.VQVAE(TINY).eval()
    with torch.no_grad():
        z_e = model.vqvae.pre_quant(model.vqvae.encoder(images(8, seed=9)))
        model.vqvae.quantizer.restart_dead_codes(z_e.permute(0, 2, 3, 1).reshape(-1, 3))
        model.prior.out[-1].weight.mul_(30)
        model.prior.label_embed.weight.mul_(3)
    return model


def test_down_shift_and_gate_values():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    shifted = vqvae.down_shift(x)
    assert shifted[0, 0, 0].eq(0).all() and torch.equal(shifted[0, 0, 1:], x[0, 0, :2])
    f, g = torch.tensor([0.3, -1.2]), torch.tensor([2.0, -0.5])
    out = vqvae.gate(torch.cat([f, g]).view(1, 4, 1, 1)).flatten()
    torch.testing.assert_close(out, torch.tanh(f) * torch.sigmoid(g))


def test_distances_and_lookup():
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=5, D=3, ema=False)
    q.e.data.normal_()
    z = torch.randn(7, 3)
    torch.testing.assert_close(q.distances(z), torch.cdist(z, q.e) ** 2, atol=1e-5, rtol=1e-5)
    codes = torch.tensor([[[0, 4], [2, 2]]])
    torch.testing.assert_close(q.lookup(codes), q.e[codes].permute(0, 3, 1, 2))


@pytest.mark.parametrize("ema", [False, True])
def test_quantizer_loss_terms_gradients_and_statistics(ema):
    """loss = ||sg[z_e] - e||^2 (without EMA) + beta ||z_e - sg[e]||^2, each a mean; z_q = e_k
    forward; the codebook gradient is the codebook term's alone; perplexity and usage from the
    code histogram."""
    torch.manual_seed(0)
    beta = 0.4
    q = vqvae.VectorQuantizer(K=6, D=2, beta=beta, ema=ema).eval()
    q.e.data.copy_(torch.tensor([[0.0, 0], [3, 0], [0, 3], [3, 3], [-3, 0], [0, -3]]))
    # 4 positions: three near code 0, one near code 3
    z_e = torch.tensor([[0.1, 0.2], [-0.3, 0.1], [0.2, -0.4], [2.5, 3.5]]).t().reshape(1, 2, 2, 2)
    z_e.requires_grad_(True)
    out = q(z_e)
    assert out["codes"].flatten().tolist() == [0, 0, 0, 3]
    e_k = q.e.detach()[out["codes"]].permute(0, 3, 1, 2)
    torch.testing.assert_close(out["z_q"], e_k)
    mse = (z_e.detach() - e_k).pow(2).mean()
    torch.testing.assert_close(out["commitment"], mse)
    torch.testing.assert_close(out["loss"], beta * mse if ema else (1 + beta) * mse)
    p = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(out["perplexity"], torch.exp(-(p * p.log()).sum()))
    assert out["usage"].item() == pytest.approx(2 / 6)
    out["loss"].backward()
    n = z_e.numel()
    torch.testing.assert_close(z_e.grad, beta * 2 * (z_e - e_k).detach() / n)
    if not ema:
        grad_e = torch.zeros(6, 2)
        diff = (e_k - z_e.detach()).permute(0, 2, 3, 1).reshape(-1, 2)
        grad_e.index_add_(0, out["codes"].flatten(), 2 * diff / n)
        torch.testing.assert_close(q.e.grad, grad_e)


def test_ema_codebook_moves_only_when_training():
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=4, D=2, ema=True, gamma=0.5)
    z_e = torch.randn(1, 2, 3, 3) + 2
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(z_e)
    q.train()(z_e, update=False)
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    q.train()(z_e)
    assert not torch.equal(q.e, before["e"])


def test_unused_steps_count_and_reset():
    q = vqvae.VectorQuantizer(K=3, D=1, ema=False, restart_after=0).train()
    q.e.data.copy_(torch.tensor([[0.0], [10.0], [20.0]]))
    z_e = torch.tensor([0.1, 0.2, 9.8, 10.1]).view(1, 1, 2, 2)
    q(z_e)
    q(z_e)
    assert q.unused_steps.tolist() == [0, 0, 2]


def test_dead_code_restart_moves_only_dead_codes_onto_rows():
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=4, D=2, ema=True, restart_after=5)
    q.e.copy_(torch.tensor([[0.0, 0], [1, 1], [2, 2], [3, 3]]))
    q.m.copy_(q.e * 2)
    q.N.fill_(2.0)
    q.unused_steps.copy_(torch.tensor([5, 4, 7, 0]))
    z = torch.tensor([[10.0, 11], [12, 13], [14, 15]])
    q.restart_dead_codes(z)
    rows = {tuple(r) for r in z.tolist()}
    assert tuple(q.e[0].tolist()) in rows and tuple(q.e[2].tolist()) in rows  # dead: moved
    assert q.e[1].tolist() == [1, 1] and q.e[3].tolist() == [3, 3]  # alive: kept
    torch.testing.assert_close(q.m[[0, 2]], q.e[[0, 2]])  # e = m / N holds again, with N = 1
    assert q.N.tolist() == [1, 2, 1, 2]
    assert q.m[1].tolist() == [2, 2]
    assert q.unused_steps.tolist() == [0, 4, 0, 0]


def test_gated_layer_residual_and_condition_by_hand():
    """With the convolutions zeroed, the layer's outputs are the gated biases plus the condition;
    the type-B horizontal stack adds its input back (residual), the type-A one does not."""
    torch.manual_seed(0)
    C = 2
    cond = torch.randn(1, 2 * C, 1, 1)
    v, h = torch.randn(1, C, 3, 3), torch.randn(1, C, 3, 3)
    for mask_type in "AB":
        layer = vqvae.GatedLayer(C, 3, mask_type)
        with torch.no_grad():
            for conv in (layer.v_conv, layer.h_conv, layer.v_to_h):
                conv.weight.zero_()
            layer.h_out.weight.copy_(torch.eye(C).view(C, C, 1, 1))
            layer.h_out.bias.zero_()
        v_new, h_new = layer(v, h, cond)
        b_v = layer.v_conv.bias.view(1, -1, 1, 1)
        b_h = (layer.h_conv.bias + layer.v_to_h.bias).view(1, -1, 1, 1)
        torch.testing.assert_close(v_new, vqvae.gate(b_v + cond).expand(1, C, 3, 3))
        expect_h = vqvae.gate(b_h + cond).expand(1, C, 3, 3)
        torch.testing.assert_close(h_new, h + expect_h if mask_type == "B" else expect_h)


def test_label_condition_rows_and_no_label():
    torch.manual_seed(0)
    prior = vqvae.GatedPixelCNN(K=5, channels=2, layers=3, kernel=3, out_hidden=4, num_classes=3)
    conds = prior.label_cond(torch.tensor([2, -1, 0]), 3)
    table = prior.label_embed.weight.view(4, 3, 4)  # (classes + 1, layers, 2C)
    for i, c in enumerate(conds):
        assert c.shape == (3, 4, 1, 1)
        torch.testing.assert_close(c[0].flatten(), table[2, i])
        torch.testing.assert_close(c[1].flatten(), table[3, i])  # -1: the "no label" row
        torch.testing.assert_close(c[2].flatten(), table[0, i])  # class 0 is a class
    assert prior.label_cond(None, 2) == [None] * 3


def test_sampling_labels():
    assert vqvae.sampling_labels(3, 2, 4, "cpu").tolist() == [2, 2, 2]
    assert vqvae.sampling_labels(3, 0, 4, "cpu").tolist() == [0, 0, 0]
    torch.manual_seed(0)
    drawn = vqvae.sampling_labels(400, None, 4, "cpu")
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    assert vqvae.sampling_labels(3, None, 0, "cpu") is None
    with pytest.raises(ValueError):
        vqvae.sampling_labels(1, 4, 4, "cpu")
    with pytest.raises(ValueError):
        vqvae.sampling_labels(1, -1, 4, "cpu")


def test_sample_codes_follows_the_conditionals_in_raster_order():
    """A prior that puts its mass on (code before + 1) mod K: greedy sampling must give 1, 2, 3,
    ... in raster order, reading only the rows it was given."""
    K = 7
    seen_rows = []

    def logits_fn(codes, rows):
        seen_rows.append(rows)
        assert codes.shape[1] == rows
        flat = codes.flatten(1)  # (B, rows * W)
        prev = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1)  # code before each
        return 50 * F.one_hot((prev + 1) % K, K).float().permute(0, 2, 1).reshape(
            codes.shape[0], K, rows, -1)

    codes = vqvae.sample_codes(logits_fn, 2, 2, 3, 1.0, "cpu")
    assert codes[0].flatten().tolist() == [1, 2, 3, 4, 5, 6]
    assert seen_rows == [1, 1, 1, 2, 2, 2]


def test_sample_codes_temperature_scales_the_logits():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, math.log(3.0)])

    def logits_fn(codes, rows):
        return logits.view(1, 2, 1, 1).expand(codes.shape[0], 2, rows, 1)

    for T in (1.0, 2.0, 0.5):
        p = torch.softmax(logits / T, 0)[1].item()
        freq = vqvae.sample_codes(logits_fn, 4000, 1, 1, T, "cpu").float().mean().item()
        assert abs(freq - p) < 0.03, (T, freq, p)


def test_vqvae_loss_and_evaluate_values():
    model = decisive_model()
    x, label = images(), torch.tensor([0, 0, 0])
    b = {"image": x, "label": label, "caption": [""] * 3}
    out = model.vqvae(x, update=False)
    recon = F.mse_loss(out["x_hat"], x)
    loss = model.loss(b, "vqvae")
    torch.testing.assert_close(loss["recon"], recon)
    torch.testing.assert_close(loss["loss"], recon + out["loss"])
    assert out["loss"] > 1e-5 * recon  # above assert_close's rtol: a dropped term would show
    codes = out["codes"]
    nll = F.cross_entropy(model.prior(codes, label), codes)
    prior = model.loss(b, "prior")
    torch.testing.assert_close(prior["loss"], nll)
    torch.testing.assert_close(prior["bits_per_code"], nll / math.log(2))
    assert len(codes.unique()) > 2
    other = model.loss({**b, "label": torch.tensor([1, 1, 1])}, "prior")["loss"]
    assert not torch.isclose(other, nll)  # the label reaches the prior's loss
    ev = model.evaluate(b)
    mse = (out["x_hat"].clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(ev["mse"], mse.mean())
    torch.testing.assert_close(ev["psnr"], (10 * torch.log10(4 / mse)).mean())
    torch.testing.assert_close(ev["prior_bits_per_code"], nll / math.log(2))
    torch.testing.assert_close(ev["perplexity"], out["perplexity"])
    torch.testing.assert_close(ev["codes_in_use"], out["usage"])
    torch.testing.assert_close(model.reconstruct(x), out["x_hat"].clamp(-1, 1))
    torch.testing.assert_close(model.decode(codes), model.vqvae.decoder(
        model.vqvae.quantizer.lookup(codes)).clamp(-1, 1))


def test_sample_decodes_codes_drawn_from_the_label_conditioned_prior():
    model = decisive_model()
    s = model.latent_size
    y = torch.full((2,), 1)
    torch.manual_seed(5)
    codes = vqvae.sample_codes(lambda c, r: model.prior(c, y), 2, s, s, 0.7, "cpu")
    torch.manual_seed(5)
    got = model.sample(2, temperature=0.7, label=1)
    torch.testing.assert_close(got, model.decode(codes))
    torch.manual_seed(5)
    assert not torch.equal(model.sample(2, temperature=0.7, label=2), got)


def test_ema_update_laplace_smoothing_with_a_large_eps():
    """eq. 6-8 with N~_i = (N_i + eps) / (sum N + K eps) sum N: with eps = 0.5 the smoothing moves
    e by percents, so a dropped or misplaced eps shows (at 1e-5 it would hide in rounding)."""
    torch.manual_seed(0)
    K, D, gamma, eps = 4, 2, 0.8, 0.5
    q = vqvae.VectorQuantizer(K, D, ema=True, gamma=gamma, eps=eps)
    z = torch.randn(10, D)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 1, 2, 0, 1, 0, 0]), K).float()
    n_i = one_hot.sum(0)
    N = gamma * q.N + (1 - gamma) * n_i
    m = gamma * q.m + (1 - gamma) * one_hot.t() @ z
    N_s = (N + eps) / (N.sum() + K * eps) * N.sum()
    q.ema_update(z, one_hot, n_i)
    torch.testing.assert_close(q.N, N)
    torch.testing.assert_close(q.m, m)
    torch.testing.assert_close(q.e, m / N_s[:, None])
    assert ((m / N[:, None] - q.e).abs() > 1e-3).any()
