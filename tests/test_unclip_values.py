"""unclip.py value checks (issue 26): slerp, the dot token's top half, the blur, the priors' and
decoder's losses with their condition dropout, guidance toward the null condition, DDIM inversion
and the text diff, each against an independent computation."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import unclip

D, V = 8, 258
DP = unclip.DiffusionPriorConfig(width=16, layers=1, heads=2, text_ctx=6, timesteps=50, sample_steps=3,
                                 embed_std=1.0, cond_drop=0.5)
AR = unclip.ARPriorConfig(text_width=16, text_layers=1, text_heads=2, text_ctx=6, width=16, layers=1,
                          heads=2, components=3, buckets=8, cond_drop=0.5)


def unit(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=-1)


def text_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 6), generator=g)


def test_slerp_follows_the_great_circle():
    a, b = unit(3), unit(3, seed=1)
    w = torch.acos((a * b).sum(-1, keepdim=True))
    for theta in (0.25, 0.6):
        got = unclip.slerp(a, b, theta)
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
        # the angle to a is theta w and to b (1 - theta) w
        torch.testing.assert_close(torch.acos((got * a).sum(-1, keepdim=True).clamp(-1, 1)), theta * w, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.acos((got * b).sum(-1, keepdim=True).clamp(-1, 1)), (1 - theta) * w,
                                   atol=1e-4, rtol=0)
    # almost parallel vectors: the linear interpolation
    c = F.normalize(a + 1e-4 * b, dim=-1)
    torch.testing.assert_close(unclip.slerp(a, c, 0.3), 0.7 * a + 0.3 * c)


def test_slerp_of_a_batch_of_any_rank_is_the_slerp_of_each_pair():
    # a, b: (..., D); a scalar theta applies to every pair (rows of 2 and 3: any mix-up of the
    # batch dims fails to broadcast or pairs the wrong vectors)
    a, b = unit(6).view(2, 3, D), unit(6, seed=1).view(2, 3, D)
    got = unclip.slerp(a, b, 0.3)
    for i in range(2):
        for j in range(3):
            w = torch.acos((a[i, j] * b[i, j]).sum())
            expect = (torch.sin(0.7 * w) * a[i, j] + torch.sin(0.3 * w) * b[i, j]) / torch.sin(w)
            torch.testing.assert_close(got[i, j], expect)


def test_slerp_of_opposite_vectors_stays_finite():
    # a . (-a) rounds to -1.0000002 in float32 here: below acos's domain unless clamped. The
    # great circle is then undefined, but the formula's limit as w -> pi is cos(theta pi) a
    # ((sin((1 - theta) w) - sin(theta w)) / sin(w) -> cos(theta pi)).
    a = F.normalize(torch.ones(2, 7), dim=-1)
    assert (a * -a).sum(-1).min() < -1
    for theta in (0.25, 0.6):
        torch.testing.assert_close(unclip.slerp(a, -a, theta), math.cos(theta * math.pi) * a,
                                   atol=1e-3, rtol=0)


def test_slerp_of_nearly_parallel_vectors_is_the_great_circle_without_the_clamps_bend():
    # The dot is clamped to 1 - 1e-7, so for vectors closer than that the formula would use
    # w = acos(1 - 1e-7) ~ 4.5e-4 instead of the true angle and leave the sphere by up to w^2 / 8
    # ~ 2.5e-8; the linear branch is off by as much only at w ~ 4.5e-4, by 1e-11 at w = 1e-5. In
    # float32 both are below rounding, so this runs in float64.
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=-1)
    e = torch.randn(4, D, generator=g, dtype=torch.float64)
    u = F.normalize(e - (e * a).sum(-1, keepdim=True) * a, dim=-1)  # orthogonal to a
    for w in (0.0, 1e-5):
        b = math.cos(w) * a + math.sin(w) * u  # at angle w from a
        for theta in (0.25, 0.6):
            # the point at angle theta w along the great circle from a to b
            expect = math.cos(theta * w) * a + math.sin(theta * w) * u
            torch.testing.assert_close(unclip.slerp(a, b, theta), expect, atol=1e-10, rtol=0)


def test_upsampler_trains_on_matching_crops_at_every_offset(monkeypatch):
    cfg = unclip.UpsamplerConfig(unet=unclip.guided.ADMConfig(
        image_size=16, low_res_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        norm_groups=8, attention_resolutions=(), num_head_channels=-1, learn_sigma=False),
        crop_fraction=0.75)  # crops of 12 (a multiple of the UNet's step 2): offsets 0..4
    up = unclip.Upsampler(cfg)
    seen = []
    monkeypatch.setattr(up.diffusion, "training_losses", lambda model, x_0, t, model_kwargs:
                        seen.append((x_0, model_kwargs["low_res"])) or {"loss": torch.zeros(1)})
    r = torch.arange(16.0)
    image = torch.stack([r[:, None].expand(16, 16), r[None, :].expand(16, 16), torch.zeros(16, 16)])[None] / 16
    low = unclip.resize(up.degrade(unclip.resize(image, 8)), 16)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(40):
        up.loss(image)
        x_0, lo = seen[-1]
        i, j = round(x_0[0, 0, 0, 0].item() * 16), round(x_0[0, 1, 0, 0].item() * 16)
        torch.testing.assert_close(x_0, image[..., i:i + 12, j:j + 12])
        torch.testing.assert_close(lo, low[..., i:i + 12, j:j + 12])
        offsets |= {i, j}
    assert offsets == {0, 1, 2, 3, 4}


def test_top_half_keeps_the_buckets_at_and_above_the_median():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3], [0.6, 0.2, 0.1, 0.1]])
    expect = torch.tensor([[0.0, 0.0, 0.3, 0.4], [0.0, 0.1, 0.1, 0.3], [0.6, 0.2, 0.1, 0.1]])
    torch.testing.assert_close(unclip.top_half(p), expect / expect.sum(-1, keepdim=True))


def test_gaussian_blur_is_the_separable_kernel():
    k = unclip.gaussian_kernel(0.6, 3)
    e = math.exp(-1 / (2 * 0.36))
    torch.testing.assert_close(k, torch.tensor([e, 1.0, e]) / (1 + 2 * e))
    x = torch.randn(1, 2, 5, 6)
    got = unclip.blur(x, 0.6, 3)
    k2 = (k[:, None] * k[None, :]).expand(2, 1, 3, 3)
    expect = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k2, groups=2)
    torch.testing.assert_close(got, expect)


def test_diffusion_prior_loss_drops_the_text_and_regresses_the_clean_embedding():
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(DP, D, V)
    z_i, z_t, text, null = unit(6), unit(6, 1), text_ids(6), text_ids(1, seed=5)
    torch.manual_seed(4)
    drop = torch.rand(6) < 0.5
    t = torch.randint(0, 50, (6,))
    noise = torch.randn(6, D)
    assert drop.any() and not drop.all()
    x_t = prior.diffusion.q_sample(z_i * prior.scale, t, noise)
    text_d = torch.where(drop[:, None], null.expand_as(text), text)
    z_t_d = z_t * (~drop)[:, None].float()
    pred = prior(x_t, t, text_d, z_t_d)
    expect = ((pred - z_i * prior.scale) ** 2).mean(1).mean()
    torch.manual_seed(4)
    torch.testing.assert_close(prior.loss(text, z_t, z_i, null), expect)


def test_diffusion_prior_reads_text_and_z_t():
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(DP, D, V).eval()
    x_t, t, text, z_t = torch.randn(2, D), torch.tensor([3, 40]), text_ids(2), unit(2)
    out = prior(x_t, t, text, z_t)
    assert not torch.allclose(prior(x_t, t, text_ids(2, seed=1), z_t), out)
    assert not torch.allclose(prior(x_t, t, text, unit(2, seed=4)), out)
    assert not torch.allclose(prior(x_t, torch.tensor([4, 41]), text, z_t), out)


def test_diffusion_prior_forward_reads_z_t_at_the_scale_of_the_image_embeddings():
    # Appendix C: CLIP embeddings enter the prior scaled so each coordinate has RMS embed_std,
    # i.e. times embed_std sqrt(D); the unit z_t token must be on that scale, as x_t is.
    cfg = replace(DP, layers=2, embed_std=0.7)  # two layers: the causal mask reaches the query
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(cfg, D, V).eval()
    x_t, t, text, z_t = 2 * torch.randn(3, D), torch.tensor([0, 17, 49]), text_ids(3), unit(3, seed=2)
    scale = 0.7 * math.sqrt(D)
    seen = []
    prior.z_t_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    prior(x_t, t, text, z_t)
    torch.testing.assert_close(seen[0], z_t * scale)
    # the pass by hand: tokens [caption, z_t, t, x_t, query] plus the first L + 4 positions, the
    # causal Transformer, and the final query's output; captions may be shorter than text_ctx
    for L in (6, 4):
        with torch.no_grad():
            tokens = torch.cat([prior.token_embedding(text[:, :L]), prior.z_t_proj(z_t * scale)[:, None],
                                prior.time_embed(unclip.guided.timestep_embedding(t, 16))[:, None],
                                prior.x_proj(x_t)[:, None], prior.query.expand(3, 1, 16)], 1)  # (3, L + 4, 16)
            h = prior.transformer(tokens + prior.positional_embedding[:L + 4], causal=True)  # (3, L + 4, 16)
            expect = prior.out(prior.ln_final(h[:, -1]))
        torch.testing.assert_close(prior(x_t, t, text[:, :L], z_t), expect)


def test_guided_prior_sampling_is_cfg_against_null_text_and_zero_z_t():
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(DP, D, V).eval()
    text, z_t, null = text_ids(2), unit(2), text_ids(1, seed=5)

    def guided_model(x, t, text, z_t):
        c = prior(x, t, text, z_t)
        u = prior(x, t, null.expand_as(text), torch.zeros_like(z_t))
        return u + 2.0 * (c - u)

    torch.manual_seed(1)
    x_0 = prior.diffusion.sample(guided_model, (2 * 2, D), steps=3, clip_denoised=False,
                                 model_kwargs={"text": text.repeat(2, 1), "z_t": z_t.repeat(2, 1)})
    z = F.normalize(x_0, dim=-1).view(2, 2, D)
    best = (z * z_t[None]).sum(-1).argmax(0)
    torch.manual_seed(1)
    got = prior.sample(text, z_t, null, guidance_scale=2.0, steps=3, candidates=2)
    torch.testing.assert_close(got, z[best, torch.arange(2)], atol=1e-5, rtol=1e-4)


def test_ar_prior_loss_targets_the_dot_then_the_codes():
    torch.manual_seed(0)
    prior = unclip.ARPrior(AR, D, V)
    z_i, z_t, text, null = unit(12), unit(12, 1), text_ids(12), text_ids(1, seed=5)
    prior.fit(z_i, z_t)
    dot, codes = prior.encode(z_i, z_t)
    torch.manual_seed(3)
    drop = torch.rand(12) < 0.5
    assert drop.any() and not drop.all()
    logits = prior.logits(torch.where(drop[:, None], null.expand_as(text), text),
                          z_t * (~drop)[:, None].float(), dot, codes[:, :-1])
    target = torch.cat([dot[:, None], codes], 1)
    expect = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    torch.manual_seed(3)
    torch.testing.assert_close(prior.loss(text, z_t, z_i, null), expect)
    # the dot token is the bucket of z_i . z_t, the codes those of the PCA coordinates
    n = AR.buckets
    d = (z_i * z_t).sum(-1)
    assert torch.equal(dot, ((d - prior.dot_lo) / (prior.dot_hi - prior.dot_lo) * n).floor().long().clamp(0, n - 1))
    y = (z_i - prior.mean) @ prior.components.T
    assert torch.equal(codes, ((y - prior.code_lo) / (prior.code_hi - prior.code_lo) * n).floor().long().clamp(0, n - 1))


def test_ar_prior_sampling_draws_the_dot_from_the_top_half_then_the_codes():
    torch.manual_seed(0)
    prior = unclip.ARPrior(AR, D, V).eval()
    z_i, z_t, text = unit(12), unit(12, 1), text_ids(2)
    prior.fit(z_i, z_t)
    torch.manual_seed(4)
    p = prior.logits(text, z_t[:2], None, None)[:, 0].softmax(-1)
    dot = torch.multinomial(unclip.top_half(p), 1)[:, 0]
    codes = torch.zeros(2, 0, dtype=torch.long)
    for _ in range(AR.components):
        nxt = torch.multinomial((prior.logits(text, z_t[:2], dot, codes)[:, -1] / 0.7).softmax(-1), 1)
        codes = torch.cat([codes, nxt], 1)
    torch.manual_seed(4)
    got = prior.sample(text, z_t[:2], temperature=0.7)
    torch.testing.assert_close(got, prior.decode(codes))
    mid = (prior.dequantize(codes, prior.code_lo, prior.code_hi) @ prior.components) + prior.mean
    torch.testing.assert_close(got, F.normalize(mid, dim=-1))


def tiny_unclip():
    c = unclip.PRESETS["tiny"]
    cfg = replace(c,
                  clip=replace(c.clip, vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16,
                               text_width=32, text_layers=1, text_heads=2),
                  diffusion_prior=replace(c.diffusion_prior, width=32, layers=1, heads=2, sample_steps=2),
                  decoder=replace(c.decoder, unet=replace(c.decoder.unet, model_channels=16, norm_groups=8,
                                                          cond_dim=16, xf_width=16), sample_steps=2),
                  upsampler1=replace(c.upsampler1, unet=replace(c.upsampler1.unet, model_channels=8,
                                                                norm_groups=8), sample_steps=1),
                  upsampler2=replace(c.upsampler2, unet=replace(c.upsampler2.unet, model_channels=8,
                                                                norm_groups=8), sample_steps=1))
    torch.manual_seed(0)
    m = unclip.UnCLIP(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # wake the zero-initialised output layers, so every path matters
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_decoder_loss_drops_z_i_and_captions():
    m = tiny_unclip()
    dec = m.decoder
    S = m.cfg.decoder.unet.image_size
    x_0, z_i = torch.rand(4, 3, S, S) * 2 - 1, F.normalize(torch.randn(4, 16), dim=-1)
    caps = ["red", "blue", "green", "pink"]
    torch.manual_seed(2)
    keep = (torch.rand(4) >= dec.cfg.z_drop).float()
    drop = torch.rand(4).tolist()
    tokens, mask = dec.tokenize(["" if r < dec.cfg.text_drop else c for r, c in zip(drop, caps)], "cpu")
    t = torch.randint(0, dec.diffusion.num_timesteps, (4,))
    terms = dec.diffusion.training_losses(dec, x_0, t, model_kwargs={"z_i": z_i * keep[:, None], "tokens": tokens,
                                                                     "mask": mask})
    torch.manual_seed(2)
    torch.testing.assert_close(dec.loss(x_0, z_i, caps)["loss"], terms["loss"].mean())


def test_decoder_guidance_is_against_zero_z_i_and_the_empty_caption():
    m = tiny_unclip()
    dec = m.decoder
    S = m.cfg.decoder.unet.image_size
    z_i = F.normalize(torch.randn(2, 16), dim=-1)
    model, kw = dec.guided_model(z_i, ["red", "blue"], 3.0)
    x, t = torch.randn(2, 3, S, S), torch.tensor([5, 50])
    tokens, mask = dec.tokenize(["red", "blue"], "cpu")
    null_tokens, null_mask = dec.tokenize(["", ""], "cpu")
    c = dec(x, t, z_i, tokens, mask)
    u = dec(x, t, torch.zeros_like(z_i), null_tokens, null_mask)
    out = model(x, t, **kw)
    torch.testing.assert_close(out[:, :3], u[:, :3] + 3.0 * (c[:, :3] - u[:, :3]), atol=1e-4, rtol=1e-4)
    one, kw1 = dec.guided_model(z_i, ["red", "blue"], 1.0)
    torch.testing.assert_close(one(x, t, **kw1), c)


def test_ddim_inversion_steps_are_song_eq12_reversed():
    m = tiny_unclip()
    dec = m.decoder
    S = m.cfg.decoder.unet.image_size
    x_0, z_i = torch.rand(1, 3, S, S) * 2 - 1, F.normalize(torch.randn(1, 16), dim=-1)
    r = dec.diffusion.respace(3)
    tokens, mask = dec.tokenize([""], "cpu")
    x = x_0.clone()
    for i in range(3):
        t = torch.full((1,), i)
        eps = r.p_mean_variance(dec, x, t, clip_denoised=False,
                                model_kwargs={"z_i": z_i, "tokens": tokens, "mask": mask})["pred_eps"]
        ab_prev, ab = r.alpha_bar_prev[i].item(), r.alpha_bar[i].item()
        x0_hat = (x - math.sqrt(1 - ab_prev) * eps) / math.sqrt(ab_prev)
        x = math.sqrt(ab) * x0_hat + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(m.ddim_invert(x_0, z_i, [""], steps=3), x)


def test_text_diff_walks_from_z_i_toward_the_caption_difference(monkeypatch):
    m = tiny_unclip()
    seen = {}

    def fake_decode(z, captions, steps, eta, guidance_scale, noise=None, upsample_steps=None):
        seen["z"], seen["eta"] = z, eta
        return torch.zeros(len(z), 3, 8, 8)

    monkeypatch.setattr(m, "decode", fake_decode)
    monkeypatch.setattr(m, "ddim_invert", lambda x, z, c, s: torch.zeros(1, 3, 8, 8))
    image = torch.rand(3, 16, 16) * 2 - 1
    m.text_diff(image, "a red circle", "a blue square", 3, max_theta=0.5)
    z_i = m.embed_image(image[None])
    z_t = m.embed_text(["a blue square", "a red circle"])
    z_d = F.normalize(z_t[:1] - z_t[1:], dim=-1)
    for k, theta in enumerate((0.0, 0.25, 0.5)):
        torch.testing.assert_close(seen["z"][k:k + 1], unclip.slerp(z_i, z_d, theta), atol=1e-5, rtol=1e-5)
    assert seen["eta"] == 0.0


def test_sample_prior_uses_the_caption_and_zero_z_t_for_empty_captions(monkeypatch):
    m = tiny_unclip()
    seen = []
    monkeypatch.setattr(m.prior, "sample", lambda text, z_t, null, s, steps: seen.append((text, z_t)) or z_t)
    m.sample_prior(["a red circle", ""])
    text, z_t = seen[0]
    torch.testing.assert_close(z_t[0], m.embed_text(["a red circle"])[0])
    assert (z_t[1] == 0).all()
    assert torch.equal(text, m.prior_text(["a red circle", ""]))


def test_ar_prior_fit_sets_pca_and_bucket_ranges_with_five_percent_margins():
    prior = unclip.ARPrior(AR, D, V)
    z_i, z_t = unit(40), unit(40, 1)
    prior.fit(z_i, z_t)
    zc = (z_i - z_i.mean(0)).double()
    lam, vecs = torch.linalg.eigh(zc.T @ zc / 39)
    top = vecs[:, lam.argsort(descending=True)[:3]].T.float()  # (K, D), up to sign
    torch.testing.assert_close(prior.components.abs(), top.abs(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prior.mean, z_i.mean(0))
    torch.testing.assert_close(prior.eigenvalues, lam.sort(descending=True).values[:3].float())
    y = (z_i - z_i.mean(0)) @ prior.components.T
    pad = 0.05 * (y.max(0).values - y.min(0).values) + 1e-6
    torch.testing.assert_close(prior.code_lo, y.min(0).values - pad)
    torch.testing.assert_close(prior.code_hi, y.max(0).values + pad)
    dot = (z_i * z_t).sum(-1)
    dpad = 0.05 * (dot.max() - dot.min()) + 1e-6
    torch.testing.assert_close(prior.dot_lo, dot.min() - dpad)
    torch.testing.assert_close(prior.dot_hi, dot.max() + dpad)


def test_interpolate_slerps_embeddings_and_inverted_noises(monkeypatch):
    m = tiny_unclip()
    seen = {}

    def fake_decode(z, captions, steps, eta, guidance_scale, noise=None, upsample_steps=None):
        seen.update(z=z, noise=noise, eta=eta)
        return torch.zeros(len(z), 3, 8, 8)

    x_T = torch.randn(2, 3, 4, 4)
    x_T[1] *= 3  # endpoints of different lengths
    monkeypatch.setattr(m, "decode", fake_decode)
    monkeypatch.setattr(m, "ddim_invert", lambda x, z, c, s: x_T)
    a, b = torch.rand(3, 16, 16) * 2 - 1, torch.rand(3, 16, 16) * 2 - 1
    m.interpolate(a, b, 3)
    z = m.embed_image(torch.stack([a, b]))
    flat = x_T.flatten(1)
    for k, theta in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(seen["z"][k], unclip.slerp(z[:1], z[1:], theta)[0], atol=1e-5, rtol=1e-5)
        d = unclip.slerp(F.normalize(flat[:1], dim=-1), F.normalize(flat[1:], dim=-1), theta)[0]
        length = (1 - theta) * flat[0].norm() + theta * flat[1].norm()
        torch.testing.assert_close(seen["noise"][k].flatten(), d * length, atol=1e-5, rtol=1e-5)
    assert seen["eta"] == 0.0


def test_evaluate_reports_mean_cosines_and_retrieval(monkeypatch):
    m = tiny_unclip()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    caps = ["a red circle", "a blue square", "a red circle"]
    z_hat = F.normalize(torch.randn(3, 16), dim=-1)
    monkeypatch.setattr(m, "sample_prior", lambda c, s, steps: z_hat)
    out = m.evaluate({"image": x, "caption": caps})
    z_i = m.embed_image(x)
    torch.testing.assert_close(out["prior_cosine"], (z_hat * z_i).sum(-1).mean())
    torch.testing.assert_close(out["caption_cosine"], (m.embed_text(caps) * z_i).sum(-1).mean())
    torch.testing.assert_close(out["clip_retrieval_top1"],
                               m.clip.retrieval_accuracy(unclip.resize(x, m.cfg.clip.image_size), caps))
