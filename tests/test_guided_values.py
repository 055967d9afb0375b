"""guided.py value checks (issue 26): guidance gradients against closed forms, the classifier's
masked loss, condition dropout and the sampling conditions (label, prompt, guidance route)."""

import json

import pytest
import torch
import torch.nn.functional as F

import guided
from guided import ADM, ClassifierConfig, ClassifierFreeGuidance, NoisyClassifier
from test_guided import tiny_adm, wake


def tiny_glide():
    """A GLIDE of an 8x8 text-conditional base and its 8 -> 16 upsampler, every path awake."""
    base = tiny_adm(num_classes=0, image_size=8, text_ctx=8, xf_width=8, xf_layers=1, xf_heads=2)
    up = tiny_adm(num_classes=0, image_size=16, low_res_size=8, text_ctx=8, xf_width=8,
                  xf_layers=1, xf_heads=2, channel_mult=(1, 2, 2), p_uncond=0.0)
    torch.manual_seed(0)
    return wake(guided.GLIDE(guided.GLIDEConfig(image_size=16, base=base, upsample=up))).eval()


class LinearClassifier(torch.nn.Module):
    """logits = W x + b t: grad_x log softmax_y = W_y - sum_k p_k W_k in closed form."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, 12, generator=g)
        self.b = torch.randn(3, generator=g)

    def forward(self, x, t):
        return x.flatten(1) @ self.W.t() + t[:, None].float() * self.b


def test_classifier_gradient_is_the_closed_form():
    clf = LinearClassifier()
    x, t, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 5, 9, 2]), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        got = guided.classifier_cond_fn(clf, y, 2.5)(x, t)
    p = clf(x, t).softmax(-1)  # (B, 3)
    expect = (clf.W[y] - p @ clf.W).view(4, 3, 2, 2) * 2.5
    torch.testing.assert_close(got, expect)


def test_clip_gradient_is_the_closed_form():
    """d/dx s * l * (Ax / |Ax|) . (c / |c|) = s l A^T (c^ - (u . c^) u) / |Ax|, u = Ax / |Ax|."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 12, generator=g)
    text = torch.randn(2, 5, generator=g)
    x, t = torch.randn(2, 3, 2, 2, generator=g), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        got = guided.clip_cond_fn(lambda x, t: x.flatten(1) @ A.t(), text, 3.0, logit_scale=7.0)(x, t)
    f = x.flatten(1) @ A.t()
    u, c = F.normalize(f, dim=-1), F.normalize(text, dim=-1)
    d = (c - (u * c).sum(-1, keepdim=True) * u) / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, (3.0 * 7.0 * d @ A).view(2, 3, 2, 2))


def test_classifier_free_guidance_on_a_known_model():
    """eps~ = eps_u + s (eps_c - eps_u) on the first C channels; the variance channels are the
    conditional ones; a keyword only in the conditional set (low_res) is shared by both halves."""
    def model(x, t, y=None, low_res=None):
        eps = x * (y[:, None, None, None].float() + 1) + low_res
        var = torch.full_like(x, 0.5) * y[:, None, None, None].float()
        return torch.cat([eps, var], 1)

    x, t = torch.randn(2, 3, 2, 2), torch.tensor([1, 4])
    y, null, low = torch.tensor([1, 2]), torch.tensor([5, 5]), torch.randn(2, 3, 2, 2)
    got = ClassifierFreeGuidance(model, 2.5, {"y": null})(x, t, y=y, low_res=low)
    c, u = model(x, t, y, low), model(x, t, null, low)
    torch.testing.assert_close(got[:, :3], u[:, :3] + 2.5 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(got[:, 3:], c[:, 3:])
    with pytest.raises(ValueError, match="unconditional half only"):
        ClassifierFreeGuidance(model, 2.0, {"y": null, "low_res": low})(x, t, y=y)


def test_classifier_loss_skips_unknown_labels():
    torch.manual_seed(0)
    clf = wake(NoisyClassifier(ClassifierConfig(
        image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
        num_head_channels=8, num_classes=3, diffusion_steps=50)))
    x, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([2, -1, 0, 1])
    torch.manual_seed(3)
    t = torch.randint(0, 50, (4,))
    logits = clf(clf.diffusion.q_sample(x, t), t)
    known = y >= 0
    torch.manual_seed(3)
    out = clf.loss({"image": x, "label": y})
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[known], y[known]))
    acc = (logits[known].argmax(-1) == y[known]).float().mean()
    torch.testing.assert_close(out["acc"], acc)


def test_training_kwargs_drop_labels_and_captions_to_the_null_condition():
    torch.manual_seed(0)
    m = ADM(tiny_adm(num_classes=3, text_ctx=6, xf_width=8, xf_layers=1, xf_heads=2, p_uncond=0.5,
                     low_res_size=4))
    B = 400
    x = torch.rand(B, 3, 8, 8)
    label = torch.randint(0, 3, (B,))
    label[:10] = -1  # unknown labels are the null label too
    torch.manual_seed(1)
    drop = torch.rand(B) < 0.5
    torch.manual_seed(1)
    kw = m.training_kwargs({"image": x, "label": label, "caption": ["ab"] * B}, x)
    assert torch.equal(kw["y"], torch.where(drop | (label < 0), torch.full_like(label, 3), label))
    assert torch.equal(kw["mask"], guided.tokenize(["ab"] * B, 6)[1] & ~drop[:, None])
    assert (kw["tokens"][drop] == 0).all() and (kw["tokens"][~drop, :2] != 0).all()
    torch.testing.assert_close(kw["low_res"], F.avg_pool2d(x, 2))


def test_sampling_conditions_and_their_effect():
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm())).eval()
    kw, un, y = m.conditions(2, label=1)
    assert kw["y"].tolist() == [1, 1] and un["y"].tolist() == [3, 3]
    outs = {}
    for label, s in ((1, 1.0), (2, 1.0), (1, 3.0), (1, 0.0)):
        torch.manual_seed(5)
        outs[label, s] = m.sample(2, label=label, guidance_scale=s, steps=3, progress=False)
    assert not torch.allclose(outs[1, 1.0], outs[2, 1.0])  # the label reaches the samples
    assert not torch.allclose(outs[1, 1.0], outs[1, 3.0])  # and the guidance scale
    # scale 0 is the unconditional model: the label no longer matters
    torch.manual_seed(5)
    torch.testing.assert_close(m.sample(2, label=2, guidance_scale=0.0, steps=3, progress=False), outs[1, 0.0])
    # the same as sampling the null label directly with the plain model
    torch.manual_seed(5)
    d = m.diffusion
    direct = d.sample(m.unet, (2, 3, 8, 8), 3, None, model_kwargs={"y": torch.full((2,), 3)},
                      device="cpu").clamp(-1, 1)
    torch.testing.assert_close(outs[1, 0.0], direct)


def test_timestep_embedding_is_adm_cos_then_sin():
    t = torch.tensor([0, 3, 250])
    emb = guided.timestep_embedding(t, 7)
    half = 3
    w = torch.tensor([10000 ** (-i / half) for i in range(half)])
    arg = t[:, None].float() * w
    torch.testing.assert_close(emb, torch.cat([arg.cos(), arg.sin(), torch.zeros(3, 1)], 1))


def test_tokenize_bytes_truncation_and_mask():
    tokens, mask = guided.tokenize(["ab", "", "abcdef"], 4)
    assert tokens.tolist() == [[97, 98, 0, 0], [0, 0, 0, 0], [97, 98, 99, 100]]
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]


def test_glide_upsamples_its_base_samples_with_the_prompt():
    m = tiny_glide()
    torch.manual_seed(1)
    low = m.base.sample(2, prompt="red", guidance_scale=2.0, steps=2, progress=False)
    high = m.upsample.sample(2, prompt="red", steps=2, low_res=low, progress=False)
    torch.manual_seed(1)
    got = m.sample(2, prompt="red", guidance_scale=2.0, steps=2, progress=False)
    torch.testing.assert_close(got, high)
    torch.manual_seed(1)
    assert not torch.allclose(m.sample(2, prompt="blue", guidance_scale=2.0, steps=2, progress=False), got)
    # the base model learns the images shrunk to its size
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = {"image": x, "label": torch.full((2,), -1), "caption": ["a", "b"]}
    torch.manual_seed(2)
    expect = m.base.loss({**batch, "image": F.avg_pool2d(x, 2)})["loss"]
    torch.manual_seed(2)
    torch.testing.assert_close(m.loss(batch, "base")["loss"], expect)


def test_classifier_evaluate_accuracies():
    torch.manual_seed(0)
    clf = wake(NoisyClassifier(ClassifierConfig(
        image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
        num_head_channels=8, num_classes=3, diffusion_steps=50))).eval()
    x, y = torch.rand(6, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    zero = torch.zeros(6, dtype=torch.long)
    acc_t0 = (clf(x, zero).argmax(-1) == y).float().mean()
    torch.manual_seed(4)
    t = torch.randint(0, 50, (6,))
    acc_t = (clf(clf.diffusion.q_sample(x, t), t).argmax(-1) == y).float().mean()
    torch.manual_seed(4)
    out = clf.evaluate({"image": x, "label": y})
    torch.testing.assert_close(out["acc_t0"], acc_t0)
    torch.testing.assert_close(out["acc_random_t"], acc_t)


def test_adm_loss_is_the_mean_hybrid_loss_of_the_dropped_conditions():
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm()))
    x, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 1])
    batch = {"image": x, "label": y, "caption": [""] * 4}
    torch.manual_seed(6)
    kw = m.training_kwargs(batch, x)
    t = torch.randint(0, 50, (4,))
    terms = m.diffusion.training_losses(m.unet, x, t, model_kwargs=kw)
    torch.manual_seed(6)
    out = m.loss(batch)
    assert set(out) == {"loss", "mse", "vb"}
    for k in out:
        torch.testing.assert_close(out[k], terms[k].mean())
    assert m.diffusion.loss_type == "hybrid" and m.diffusion.variance == "learned_range"
    plain = ADM(tiny_adm(learn_sigma=False))
    assert plain.diffusion.loss_type == "simple" and plain.diffusion.variance == "fixed_small"


def test_conditions_take_label_tensors_prompt_lists_and_low_res():
    m = ADM(tiny_adm(num_classes=3, text_ctx=6, xf_width=8, xf_layers=1, xf_heads=2, low_res_size=4))
    low = torch.randn(2, 3, 4, 4)
    kw, un, y = m.conditions(2, label=torch.tensor([2, 0]), prompt=["ab", "c"], low_res=low)
    assert y.tolist() == [2, 0] and kw["y"].tolist() == [2, 0] and un["y"].tolist() == [3, 3]
    tokens, mask = guided.tokenize(["ab", "c"], 6)
    assert torch.equal(kw["tokens"], tokens) and torch.equal(kw["mask"], mask)
    assert not un["mask"].any() and torch.equal(kw["low_res"], low)
    torch.manual_seed(0)
    _, _, drawn = m.conditions(300, low_res=torch.zeros(300, 3, 4, 4))
    assert set(drawn.tolist()) == {0, 1, 2}  # random classes when no label is given
    with pytest.raises(ValueError):
        m.conditions(2, label=3, low_res=low)
    with pytest.raises(ValueError):
        m.conditions(2, prompt=["a"], low_res=low)


def test_glide_without_prompt_samples_the_unguided_empty_caption():
    m = tiny_glide()
    torch.manual_seed(1)
    low = m.base.sample(2, prompt=None, guidance_scale=1.0, steps=2, progress=False)
    high = m.upsample.sample(2, prompt=None, steps=2, low_res=low, progress=False)
    torch.manual_seed(1)
    torch.testing.assert_close(m.sample(2, guidance_scale=5.0, steps=2, progress=False), high)


def test_classifier_loss_of_an_unlabelled_batch_is_zero_not_nan():
    torch.manual_seed(0)
    clf = NoisyClassifier(ClassifierConfig(
        image_size=8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
        num_head_channels=8, num_classes=3, diffusion_steps=50))
    out = clf.loss({"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([-1, -1])})
    assert out["loss"].item() == 0 and out["acc"].item() == 0


def test_tokenize_gpt2_bpe_merges_truncates_and_pads_with_the_end_token(tmp_path):
    # a hand-made vocabulary: the 256 byte symbols with id = byte, then "re" (256), "red" (257)
    # and <|endoftext|> (258, the pad); the merges r+e, then re+d
    symbols = guided._byte_symbols()
    encoder = {symbols[b]: b for b in range(256)}
    encoder.update({"re": 256, "red": 257, "<|endoftext|>": 258})
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nr e\nre d\n")
    bpe = guided.GPT2Tokenizer(str(tmp_path))
    tokens, mask = guided.tokenize(["Red", "a red dog", ""], 4, bpe)
    # "a red dog" -> "a", " red", " dog": the space (byte 32) starts a word and is not merged
    assert tokens.tolist() == [[257, 258, 258, 258], [97, 32, 257, 32], [258] * 4]
    assert mask.tolist() == [[True, False, False, False], [True] * 4, [False] * 4]


def test_classifier_guided_samples_are_clamped_to_the_data_range():
    # Alg. 1 shifts every mean by Sigma grad log p(y | x_t), the last one (t = 0) too, after the
    # clamp of the predicted x_0: a strong gradient there pushes the raw samples past [-1, 1]. The
    # classifier acts at t = 0 only, so earlier shifts cannot saturate its softmax.
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm())).eval()
    W = torch.randn(3, 3 * 8 * 8, generator=torch.Generator().manual_seed(1))

    def classifier(x, t):
        return x.flatten(1) @ W.t() * (t == 0)[:, None]  # (B, 3)

    torch.manual_seed(5)
    got = m.sample(2, label=1, classifier=classifier, classifier_scale=300.0, steps=3, progress=False)
    torch.manual_seed(5)
    y = torch.ones(2, dtype=torch.long)
    raw = m.diffusion.sample(m.unet, (2, 3, 8, 8), 3, None, model_kwargs={"y": y},
                             cond_fn=guided.classifier_cond_fn(classifier, y, 300.0), device="cpu")
    assert raw.min() < -1.5 and raw.max() > 1.5
    torch.testing.assert_close(got, raw.clamp(-1, 1))


def test_sampling_labels_of_any_integer_dtype_are_class_indices():
    # labels as a data set may store them (uint8) reach the embedding as long indices
    torch.manual_seed(0)
    m = wake(ADM(tiny_adm())).eval()
    kw, un, y = m.conditions(2, label=torch.tensor([2, 0], dtype=torch.uint8))
    assert y.dtype == kw["y"].dtype == un["y"].dtype == torch.long
    torch.manual_seed(5)
    got = m.sample(2, label=torch.tensor([2, 0], dtype=torch.uint8), steps=2, progress=False)
    torch.manual_seed(5)
    torch.testing.assert_close(got, m.sample(2, label=torch.tensor([2, 0]), steps=2, progress=False))


def test_glide_upsampler_takes_the_base_eta_unless_given_its_own_and_scales_its_x_T():
    m = tiny_glide()

    def two_stage(base_eta, up_eta, up_steps, temp):
        torch.manual_seed(1)
        low = m.base.sample(2, prompt="red", guidance_scale=2.0, steps=2, eta=base_eta, progress=False)
        noise = torch.randn(2, 3, 16, 16) * temp  # x_T * temperature (GLIDE's notebook: 0.997)
        return m.upsample.sample(2, prompt="red", steps=up_steps, eta=up_eta, low_res=low, noise=noise,
                                 progress=False)

    for eta, up_eta, up_steps, temp in ((0.0, None, None, 1.0), (None, 0.0, 3, 0.5), (0.5, 1.0, None, 1.0)):
        torch.manual_seed(1)
        got = m.sample(2, prompt="red", guidance_scale=2.0, steps=2, eta=eta, progress=False,
                       upsample_steps=up_steps, upsample_eta=up_eta, upsample_temp=temp)
        expect = two_stage(eta, eta if up_eta is None else up_eta, up_steps or 2, temp)
        torch.testing.assert_close(got, expect)
