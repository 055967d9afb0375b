"""Tests for guided.py: the released presets' sizes, the UNet's conditioning paths, classifier and
classifier-free guidance, CLIP guidance, the trainable models and the command line."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import guided
import sample
import data
import train
from guided import ADM, ADMConfig, ClassifierConfig, ClassifierFreeGuidance, GLIDE, NoisyClassifier, UNet


def tiny_adm(**kw):
    base = dict(image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                num_head_channels=8, num_classes=3, diffusion_steps=50, p_uncond=0.2)
    return ADMConfig(**{**base, **kw})


def tiny_clf(**kw):
    base = dict(image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                num_head_channels=8, num_classes=3, diffusion_steps=50)
    return ClassifierConfig(**{**base, **kw})


def wake(module, seed=0):
    """Give the zero-initialised output layers random weights, so every path affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


# --- the released models' sizes ---

UNET_COUNTS = {"adm-imagenet64": 295_904_454, "adm-imagenet128": 421_529_606,
               "adm-imagenet256": 553_838_086, "glide-base": 385_030_726,
               "glide-upsample": 398_361_286}
CLASSIFIER_COUNTS = {"adm-classifier-imagenet64": 65_438_568, "adm-classifier-imagenet128": 42_568_040,
                     "adm-classifier-imagenet256": 54_096_360}


@pytest.mark.parametrize("name", list(UNET_COUNTS))
def test_unet_presets_have_the_released_parameter_counts(name):
    with torch.device("meta"):
        model = UNet(guided.PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == UNET_COUNTS[name]


@pytest.mark.parametrize("name", list(CLASSIFIER_COUNTS))
def test_classifier_presets_have_the_released_parameter_counts(name):
    with torch.device("meta"):
        model = NoisyClassifier(guided.CLASSIFIER_PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == CLASSIFIER_COUNTS[name]


def test_released_module_names():
    """Names follow the released checkpoints, so loading their weights is a key-for-key copy."""
    with torch.device("meta"):
        keys = set(UNet(guided.PRESETS["glide-base"]).state_dict())
    for k in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight",
              "input_blocks.4.0.emb_layers.1.weight", "middle_block.1.encoder_kv.weight",
              "output_blocks.3.2.out_layers.3.weight", "out.2.weight", "token_embedding.weight",
              "padding_embedding", "transformer.resblocks.15.attn.c_qkv.weight", "final_ln.weight",
              "transformer_proj.weight"):
        assert k in keys, k


# --- the UNet ---


def test_unet_shapes_and_every_conditioning_path():
    torch.manual_seed(0)
    c = tiny_adm(cond_dim=5, text_ctx=6, xf_width=16, xf_layers=1, xf_heads=2, low_res_size=4)
    net = wake(UNet(c)).eval()
    B = 2
    x, t = torch.randn(B, 3, 8, 8), torch.tensor([3, 40])
    tokens, mask = guided.tokenize(["ab", "abcdefgh"], 6)
    kw = dict(y=torch.tensor([0, 2]), cond=torch.randn(B, 5), context=torch.randn(B, 3, 16),
              low_res=torch.randn(B, 3, 4, 4), tokens=tokens, mask=mask)
    out = net(x, t, **kw)
    assert out.shape == (B, 6, 8, 8)  # eps and the variance interpolation v
    for k, v in [("y", torch.tensor([1, 1])), ("cond", torch.randn(B, 5)), ("context", torch.randn(B, 3, 16)),
                 ("low_res", torch.randn(B, 3, 4, 4)), ("tokens", tokens.flip(1))]:
        assert not torch.allclose(net(x, t, **{**kw, k: v}), out), f"{k} does not reach the output"
    # padded text positions are replaced by learned embeddings: their token ids do not matter
    other = torch.where(mask, tokens, torch.full_like(tokens, 99))
    assert torch.allclose(net(x, t, **{**kw, "tokens": other}), out, atol=1e-6)


def test_context_tokens_join_the_keys_and_values():
    """GLIDE's encoder_kv: with context, attention = softmax over [context keys; pixel keys]."""
    torch.manual_seed(0)
    attn = wake(guided.AttentionBlock(8, num_head_channels=4, context_dim=5))
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 5)
    h = attn.qkv(attn.norm(x).reshape(2, 8, 9)).reshape(2, 2, 3, 4, 9)    # legacy layout per head
    q, k, v = h[:, :, 0], h[:, :, 1], h[:, :, 2]                           # (B, heads, ch, L)
    e = attn.encoder_kv(ctx.transpose(1, 2)).reshape(2, 2, 2, 4, 4)
    k, v = torch.cat([e[:, :, 0], k], -1), torch.cat([e[:, :, 1], v], -1)
    w = torch.softmax(torch.einsum("bhcl,bhcs->bhls", q, k) / 2.0, -1)   # 1/sqrt(ch), ch = 4
    a = torch.einsum("bhls,bhcs->bhcl", w, v).reshape(2, 8, 9)
    want = x + attn.proj_out(a).reshape(2, 8, 3, 3)
    assert torch.allclose(attn(x, ctx), want, atol=1e-5)


def test_attention_orders_differ_only_in_layout():
    torch.manual_seed(0)
    legacy = wake(guided.AttentionBlock(8, num_head_channels=4))
    new = guided.AttentionBlock(8, num_head_channels=4, new_order=True)
    new.load_state_dict(legacy.state_dict())
    x = torch.randn(1, 8, 2, 2)
    assert not torch.allclose(legacy(x), new(x))
    # permuting the qkv rows from [head][q,k,v][ch] to [q,k,v][head][ch] makes them equal
    perm = torch.arange(24).reshape(2, 3, 4).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[perm])
        new.qkv.bias.copy_(legacy.qkv.bias[perm])
    assert torch.allclose(legacy(x), new(x), atol=1e-6)


# --- classifier-free guidance ---


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    torch.manual_seed(0)
    net = wake(UNet(tiny_adm())).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 20, 49])
    y, null = torch.tensor([0, 1, 2]), torch.full((3,), 3)
    cond, uncond = net(x, t, y=y), net(x, t, y=null)
    assert torch.allclose(ClassifierFreeGuidance(net, 1.0, {"y": null})(x, t, y=y), cond, atol=1e-5)
    # scale 0: eps of the unconditional model (the variance channels stay the conditional ones)
    assert torch.allclose(ClassifierFreeGuidance(net, 0.0, {"y": null})(x, t, y=y)[:, :3], uncond[:, :3], atol=1e-5)
    got = ClassifierFreeGuidance(net, 3.0, {"y": null})(x, t, y=y)
    assert torch.allclose(got[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(got[:, 3:], cond[:, 3:], atol=1e-5)  # the conditional variance


def test_guidance_is_one_batched_forward():
    calls = []

    def model(x, t, y=None):
        calls.append(x.shape[0])
        return x * (y[:, None, None, None].float() + 1)

    ClassifierFreeGuidance(model, 2.0, {"y": torch.zeros(4, dtype=torch.long)})(
        torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), y=torch.ones(4, dtype=torch.long))
    assert calls == [8]


def test_text_guidance_uses_the_empty_caption():
    torch.manual_seed(0)
    m = ADM(tiny_adm(num_classes=0, text_ctx=8, xf_width=16, xf_layers=1, xf_heads=2))
    wake(m)
    kw, un, _ = m.conditions(2, prompt="red", device="cpu")
    assert kw["mask"][:, :3].all() and not kw["mask"][:, 3:].any() and not un["mask"].any()


def test_label_dropout_in_training():
    torch.manual_seed(0)
    m = ADM(tiny_adm(p_uncond=0.3))
    batch = {"image": torch.zeros(4000, 3, 8, 8), "label": torch.randint(0, 3, (4000,)), "caption": [""] * 4000}
    y = m.training_kwargs(batch, batch["image"])["y"]
    assert abs((y == 3).float().mean().item() - 0.3) < 0.03
    assert torch.equal(y[y != 3], batch["label"][y != 3])
    assert m.unet.label_emb.num_embeddings == 4  # the null label is one extra row
    m0 = ADM(tiny_adm(p_uncond=0.0))
    assert torch.equal(m0.training_kwargs(batch, batch["image"])["y"], batch["label"])
    assert m0.unet.label_emb.num_embeddings == 3
    with pytest.raises(ValueError, match="p_uncond"):
        m0.sample(2, label=1, guidance_scale=3.0, steps=2, progress=False)


# --- classifier guidance ---


class ConstantClassifier(torch.nn.Module):
    """Logits that ignore x: grad_x log p(y | x_t) = 0."""
    config = None

    def forward(self, x, t):
        return torch.stack([t.float(), -t.float(), t.float() * 0], 1) + 0 * x.sum((1, 2, 3))[:, None]


@pytest.mark.parametrize("eta", [None, 0.0, 1.0])
def test_zero_classifier_gradient_leaves_sampling_unchanged(eta, monkeypatch):
    # float64, so that DDIM's round trip eps -> x_0 -> eps leaves only negligible rounding
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.randn_like(torch.empty(*a, dtype=torch.float64)))
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm())).double().eval()
    y = torch.tensor([0, 2])
    torch.manual_seed(1)
    plain = m.sample(2, label=y, steps=5, eta=eta, progress=False)
    torch.manual_seed(1)
    guided_ = m.sample(2, label=y, steps=5, eta=eta, classifier=ConstantClassifier(), classifier_scale=10.0,
                       progress=False)
    if eta is None:  # ancestral: mu + Sigma * 0 is exactly mu
        assert torch.equal(plain, guided_)
    else:  # DDIM: eps - sqrt(1 - alpha_bar) * 0 goes through x_0 and back (float rounding only)
        assert torch.allclose(plain, guided_, atol=1e-9)
    torch.manual_seed(1)  # a real classifier does change the samples
    clf = wake(NoisyClassifier(tiny_clf())).eval()
    other = m.sample(2, label=y, steps=5, eta=eta, classifier=clf, classifier_scale=10.0, progress=False)
    assert not torch.allclose(plain, other)


def test_classifier_gradient_raises_log_p_y_given_x_t():
    torch.manual_seed(0)
    clf = wake(NoisyClassifier(tiny_clf())).eval()
    x_t, t, y = torch.randn(6, 3, 8, 8), torch.randint(0, 50, (6,)), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():  # as under sample.py: the hook enables gradients itself
        grad = guided.classifier_cond_fn(clf, y, 1.0)(x_t, t)
        grad2 = guided.classifier_cond_fn(clf, y, 2.5)(x_t, t)
    assert torch.allclose(grad2, 2.5 * grad)

    def log_p(x):
        return clf(x, t).log_softmax(-1)[torch.arange(6), y]

    with torch.no_grad():
        before, after = log_p(x_t), log_p(x_t + 1e-2 * grad)
    assert (after > before).all()


def test_classifier_guidance_shifts_the_mean_by_sigma_grad():
    """ADM algorithm 1: mu + s Sigma grad; algorithm 2: eps - sqrt(1 - alpha_bar) s grad."""
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm())).eval()
    d = m.diffusion
    x_t, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 30]), torch.tensor([1, 2])
    g = torch.randn_like(x_t)
    p = d.p_mean_variance(m.unet, x_t, t, model_kwargs={"y": y})
    assert torch.allclose(d.condition_mean(lambda x, t, **_: g, p, x_t, t), p["mean"] + p["variance"] * g)
    x_0, eps = d.condition_score(lambda x, t, **_: g, p, x_t, t)
    ab = d.alpha_bar[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(eps, p["pred_eps"] - (1 - ab).sqrt() * g, atol=1e-5)


def test_clip_guidance_raises_the_similarity():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    image_encoder = lambda x, t: enc(x)
    text = torch.randn(16)
    x_t, t = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        grad = guided.clip_cond_fn(image_encoder, text, 1.0)(x_t, t)
        cos = lambda x: F.cosine_similarity(enc(x), text[None], dim=-1)
        assert (cos(x_t + 0.05 * grad) > cos(x_t)).all()


# --- trainable models ---


def overfit(model, batch, steps, lr=3e-3, phase=None):
    opt = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)  # the same t and noise every step: a fixed objective
        out = model.loss(batch) if phase is None else model.loss(batch, phase)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    return losses


def shapes_batch(n, size):
    ds = data.ShapesDataset(n, size)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def test_adm_and_classifier_losses_fall():
    torch.manual_seed(0)
    batch = shapes_batch(8, 8)
    batch["label"] = batch["label"] % 3
    losses = overfit(ADM(tiny_adm()), batch, 25)
    assert losses[-1] < 0.7 * losses[0]
    losses = overfit(NoisyClassifier(tiny_clf()), batch, 25)
    assert losses[-1] < 0.7 * losses[0]


def glide_config():
    base = tiny_adm(num_classes=0, image_size=8, text_ctx=16, xf_width=16, xf_layers=1, xf_heads=2)
    up = tiny_adm(num_classes=0, image_size=16, low_res_size=8, text_ctx=16, xf_width=16, xf_layers=1,
                  xf_heads=2, channel_mult=(1, 2, 2), p_uncond=0.0)
    return guided.GLIDEConfig(image_size=16, base=base, upsample=up)


def test_glide_phases_train_and_sample():
    torch.manual_seed(0)
    m = GLIDE(glide_config())
    batch = shapes_batch(4, 16)
    for phase in GLIDE.phases:
        out = m.loss(batch, phase)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert all(p.grad is None for p in m.phase_module(
            "upsample" if phase == "base" else "base").parameters())
        m.zero_grad(set_to_none=True)
    m.eval()
    x = m.sample(2, prompt=["a red circle", "a blue square"], guidance_scale=3.0, steps=3, progress=False)
    assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="upsampler"):
        GLIDE(dataclasses.replace(glide_config(), image_size=32))


def test_sampling_is_reproducible_and_rejects_bad_labels():
    m = wake(ADM(tiny_adm())).eval()
    torch.manual_seed(3)
    a = m.sample(2, label=1, guidance_scale=2.0, steps=3, progress=False)
    torch.manual_seed(3)
    b = m.sample(2, label=1, guidance_scale=2.0, steps=3, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="label"):
        m.sample(2, label=7, steps=2, progress=False)
    torch.manual_seed(3)  # scale 0 samples the unconditional model alone (the null label)
    u = m.sample(2, label=1, guidance_scale=0.0, steps=3, progress=False)
    torch.manual_seed(3)
    want = m.diffusion.sample(m.unet, (2, 3, 8, 8), 3, model_kwargs={"y": torch.full((2,), 3)}).clamp(-1, 1)
    assert torch.equal(u, want)
    with pytest.raises(ValueError, match="T=100"):
        m.sample(2, label=1, steps=2, classifier=NoisyClassifier(tiny_clf(diffusion_steps=100)), progress=False)


# --- command line ---

SMALL = ["--image-size", "16", "--model-channels", "8", "--channel-mult", "1,2", "--attention-resolutions", "8",
         "--num-head-channels", "8", "--diffusion-steps", "50", "--batch-size", "4", "--data", "shapes:16",
         "--log-every", "2", "--steps", "2", "--sample-n", "2"]


def test_cli_train_and_guided_sampling(tmp_path, capsys):
    adm, clf = tmp_path / "adm", tmp_path / "clf"
    assert train.main(["adm", *SMALL, "--out", str(adm)]) == 0
    assert train.main(["classifier", *SMALL, "--out", str(clf)]) == 0
    model, info = sample.load_model(adm)
    assert isinstance(model, ADM) and model.config.num_classes == 18  # set from the data
    out = tmp_path / "s.png"
    assert sample.main([str(adm), "-n", "2", "--label", "4", "--guidance-scale", "3", "--steps", "3",
                        "--classifier", str(clf), "--classifier-scale", "10", "--out", str(out)]) == 0
    assert out.exists()
    assert sample.main([str(adm), "-n", "2", "--label", "4", "--steps", "3", "--eta", "0",
                        "--classifier", str(clf), "--out", str(tmp_path / "d.png")]) == 0
    assert sample.main([str(clf), "--eval", "4"]) == 0
    assert "acc_t0" in capsys.readouterr().out
    assert sample.main([str(adm), "-n", "2", "--label", "18"]) == 2
    assert "--label must be in 0..17" in capsys.readouterr().err
    assert sample.main([str(adm), "-n", "2", "--prompt", "a red circle"]) == 2
    assert "not text-conditional" in capsys.readouterr().err
    assert sample.main([str(adm), "-n", "2", "--classifier", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_glide_two_phases(tmp_path, capsys):
    run = tmp_path / "glide"
    argv = ["glide", "--base.image-size", "8", "--base.model-channels", "8", "--base.channel-mult", "1,2",
            "--base.attention-resolutions", "4", "--base.num-head-channels", "8", "--base.xf-width", "16",
            "--base.xf-layers", "1", "--base.diffusion-steps", "50", "--image-size", "16",
            "--upsample.image-size", "16", "--upsample.low-res-size", "8", "--upsample.model-channels", "8",
            "--upsample.channel-mult", "1,2", "--upsample.attention-resolutions", "8",
            "--upsample.num-head-channels", "8", "--upsample.xf-width", "16", "--upsample.xf-layers", "1",
            "--upsample.diffusion-steps", "50", "--data", "shapes:16", "--batch-size", "4", "--steps", "2",
            "--sample-n", "2", "--out", str(run)]
    assert train.main(argv) == 0
    assert (run / "ckpt_base.pt").exists() and (run / "ckpt_upsample.pt").exists()
    assert sample.main([str(run), "-n", "2", "--prompt", "a large red circle at the top left",
                        "--guidance-scale", "3", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert sample.main([str(run), "--eval-captions", "2", "--steps", "2"]) == 0
    assert "color" in capsys.readouterr().out
    assert train.main(["glide", "--image-size", "64", "--out", str(tmp_path / "bad")]) == 2
    assert "upsampler must map" in capsys.readouterr().err


def test_attention_hands_sdpa_channel_contiguous_inputs(sdpa_strides):
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 5)
    guided.AttentionBlock(8, num_head_channels=4, context_dim=5)(x, ctx)
    guided.AttentionBlock(8, num_head_channels=4, new_order=True)(x)
    guided.AttentionPool2d(4, 8, 4, 3)(x)
    assert sdpa_strides == [[1, 1, 1]] * 3


def test_host_to_device_keeps_cpu_tensors_as_they_are():
    t = torch.arange(5)
    assert torch.equal(guided.host_to_device(t, "cpu"), t)
    assert guided.host_to_device(t, torch.device("cpu")).device.type == "cpu"
