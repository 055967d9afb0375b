"""clip.py value checks (issue 26): zero-shot weights and probabilities, retrieval accuracy, the
loss's accuracy figure and the clipped scale, against recomputation."""
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

import clip

CFG = replace(clip.PRESETS["tiny"], image_size=16, patch_size=4, vision_width=32, vision_layers=1,
              vision_heads=2, embed_dim=16, context_length=48, text_width=32, text_layers=1, text_heads=2)
CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def model_and_images(seed=0):
    torch.manual_seed(seed)
    m = clip.CLIP(CFG).eval()
    with torch.no_grad():
        m.logit_scale.fill_(math.log(20.0))
    g = torch.Generator().manual_seed(seed)
    return m, torch.rand(5, 3, 16, 16, generator=g) * 2 - 1


def test_zero_shot_weights_and_probabilities():
    m, x = model_and_images()
    templates = ("a {}", "a photo of a {}.")
    w = m.zero_shot_classifier(["circle", "square"], templates)
    for k, name in enumerate(["circle", "square"]):
        z = F.normalize(m.encode_text([t.format(name) for t in templates]), dim=-1)
        torch.testing.assert_close(w[k], F.normalize(z.mean(0), dim=-1))
    z_i = F.normalize(m.encode_image(x), dim=-1)
    torch.testing.assert_close(m.zero_shot_classify(x, w), (20.0 * z_i @ w.T).softmax(-1))


def test_forward_scales_cosine_similarities_and_transposes():
    m, x = model_and_images()
    with torch.no_grad():
        m.logit_scale.fill_(math.log(500.0))  # clipped to 100
    per_image, per_text = m(x, CAPTIONS)
    z_i = F.normalize(m.encode_image(x), dim=-1)
    z_t = F.normalize(m.encode_text(CAPTIONS), dim=-1)
    torch.testing.assert_close(per_image, 100.0 * z_i @ z_t.T)
    torch.testing.assert_close(per_text, per_image.T)


def test_retrieval_accuracy_and_the_loss_accuracy_figure():
    m, x = model_and_images()
    captions = [CAPTIONS[i % 3] for i in range(5)]
    candidates = CAPTIONS + ["a pink circle"]
    logits = m.rank_captions(x, candidates)
    target = torch.tensor([i % 3 for i in range(5)])
    expect = (logits.argmax(1) == target).float().mean()
    torch.testing.assert_close(m.retrieval_accuracy(x, captions, candidates), expect)
    out = m.loss({"image": x, "caption": captions})
    own = m.rank_captions(x, CAPTIONS)
    torch.testing.assert_close(out["retrieval_top1"], (own.argmax(1) == target).float().mean())
    torch.testing.assert_close(m.evaluate({"image": x, "caption": captions})["loss"], out["loss"])
    assert abs(out["logit_scale"].item() - 20.0) < 1e-4


def test_text_feature_is_the_projected_end_token_output():
    m, _ = model_and_images()
    tokens = m.tokenize(CAPTIONS)
    h = m.encode_text_tokens(tokens)
    eot = tokens.argmax(-1)
    torch.testing.assert_close(m.encode_text(tokens), h[torch.arange(3), eot] @ m.text_projection)
    pos = m.token_embedding(tokens) + m.positional_embedding[:tokens.shape[1]]
    torch.testing.assert_close(h, m.ln_final(m.transformer(pos, causal=True)))


def test_loss_cuts_training_captions_longer_than_the_context():
    # a training caption longer than context_length is cut (ending in the end token), not refused
    m, x = model_and_images()
    long = "a red circle " * 20
    captions = [long, "a blue square", long, "a green triangle", "a blue square"]
    tokens = m.tokenize([long, "a blue square", "a green triangle"], truncate=True, trim=True)
    logits = m(x, tokens)[0]  # (5, 3)
    target = torch.tensor([0, 1, 0, 2, 1])
    owners = F.one_hot(target, 3).T.float()
    expect = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, owners / owners.sum(1, keepdim=True))) / 2
    torch.testing.assert_close(m.loss({"image": x, "caption": captions})["loss"], expect)
