"""Tests for clip.py: shapes, the contrastive loss, the causal text encoder, tokenizers, OpenAI loading."""

import gzip
import math
import os
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip  # noqa: E402

# Smaller than the tiny preset so each test takes a fraction of a second.
CFG = replace(clip.PRESETS["tiny"], image_size=16, patch_size=4, vision_width=32, vision_layers=2,
              vision_heads=2, embed_dim=16, context_length=48, text_width=32, text_layers=2, text_heads=2)
CAPTIONS = ["a large red circle at the top left", "a small blue square at the center",
            "a large green triangle at the bottom", "a small yellow circle at the right"]


def make_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return clip.CLIP(cfg)


def make_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, CFG.image_size, CFG.image_size, generator=g) * 2 - 1
    return {"image": image, "label": torch.full((n,), -1), "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}


# --- shapes, loss, gradients ---

def test_shapes():
    model, batch = make_model(), make_batch()
    assert model.encode_image(batch["image"]).shape == (4, CFG.embed_dim)
    tokens = model.tokenize(batch["caption"])
    assert tokens.shape == (4, CFG.context_length) and tokens.dtype == torch.long
    assert model.encode_text(tokens).shape == (4, CFG.embed_dim)
    assert model.encode_text_tokens(tokens).shape == (4, CFG.context_length, CFG.text_width)
    logits_per_image, logits_per_text = model(batch["image"], batch["caption"][:3])
    assert logits_per_image.shape == (4, 3) and logits_per_text.shape == (3, 4)


def test_trimmed_tokens_give_the_same_features():
    # padding after the end token must not change a causal encoder's end-token feature
    model = make_model()
    full, trimmed = model.tokenize(CAPTIONS), model.tokenize(CAPTIONS, trim=True)
    assert trimmed.shape[1] == max(len(c) for c in CAPTIONS) + 2 < full.shape[1]
    torch.testing.assert_close(model.encode_text(full), model.encode_text(trimmed), rtol=1e-5, atol=1e-5)


def test_finite_loss_and_gradients():
    model = make_model()
    out = model.loss(make_batch())
    assert set(out) >= {"loss", "loss_i2t", "loss_t2i", "retrieval_top1", "logit_scale"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.logit_scale.grad.abs() > 0 and model.visual.conv1.weight.grad.abs().sum() > 0


def test_loss_equals_the_papers_with_distinct_captions():
    # Figure 3 of the paper: logits = exp(t) I_e T_e^T, labels = arange(n), the mean of both CEs.
    model, batch = make_model(), make_batch()
    with torch.no_grad():
        I_e = F.normalize(model.encode_image(batch["image"]), dim=-1)
        T_e = F.normalize(model.encode_text(batch["caption"]), dim=-1)
        logits = I_e @ T_e.T * math.exp(model.logit_scale.item())
        labels = torch.arange(4)
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        torch.testing.assert_close(model.loss(batch)["loss"], expected)


def test_repeated_captions_are_one_column():
    # 6 images, 3 distinct captions: image -> text is a 3-way CE; a caption's targets are its 2 images
    model = make_model()
    batch = make_batch(6)
    batch["caption"] = [CAPTIONS[i % 3] for i in range(6)]
    with torch.no_grad():
        out = model.loss(batch)
        logits = model.rank_captions(batch["image"], CAPTIONS[:3])  # (6, 3)
        target = torch.arange(6) % 3
        torch.testing.assert_close(out["loss_i2t"], F.cross_entropy(logits, target))
        log_p = logits.T.log_softmax(dim=1)  # (3, 6)
        expected = -torch.stack([log_p[j, target == j].mean() for j in range(3)]).mean()
        torch.testing.assert_close(out["loss_t2i"], expected)


def test_loss_falls_when_overfitting_one_batch():
    model, batch = make_model(), make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(batch)["loss"].item()
    for _ in range(40):
        loss = model.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    model.eval()
    assert model.evaluate(batch)["retrieval_top1"].item() == 1.0


# --- paper identities ---

def test_text_encoder_is_causal():
    model = make_model().eval()
    tokens = model.tokenize(CAPTIONS[:2])  # (2, L)
    i = 10
    changed = tokens.clone()
    changed[:, i + 1:] = torch.randint(0, 256, changed[:, i + 1:].shape)
    with torch.no_grad():
        a, b = model.encode_text_tokens(tokens), model.encode_text_tokens(changed)
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1])  # positions <= i see nothing later
    assert (a[:, i + 1:] - b[:, i + 1:]).abs().amax() > 1e-3  # later positions do see the change


def test_text_feature_is_read_at_the_end_token():
    model = make_model().eval()
    tokens = model.tokenize(CAPTIONS[:1])
    eot = len(CAPTIONS[0]) + 1
    assert tokens[0, eot] == clip.ByteTokenizer.eot == tokens.max()
    with torch.no_grad():
        expected = model.encode_text_tokens(tokens)[0, eot] @ model.text_projection
        torch.testing.assert_close(model.encode_text(tokens)[0], expected)


def test_logit_scale_init_and_clamp():
    model = make_model()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026 without the clip
    assert model.scale().item() == pytest.approx(100.0)
    batch = make_batch()
    logits, _ = model(batch["image"], batch["caption"])
    assert logits.abs().max().item() <= 100.0 + 1e-4


# --- tokenizers ---

def test_byte_tokenizer_round_trip():
    tok = clip.ByteTokenizer()
    for text in ["a large red circle at the top left", "Ünïcødé, 日本語 and emoji 🙂!", ""]:
        ids = clip.tokenize(text, context_length=64, tokenizer=tok)[0]
        assert ids[0] == tok.sot and (ids == tok.eot).sum() == 1
        assert tok.decode(ids.tolist()) == text
    with pytest.raises(ValueError, match="context length"):
        clip.tokenize("x" * 100, context_length=16, tokenizer=tok)
    cut = clip.tokenize("x" * 100, context_length=16, tokenizer=tok, truncate=True)[0]
    assert cut[-1] == tok.eot and tok.decode(cut.tolist()) == "x" * 14


def _write_merges(path, merges):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def test_bpe_tokenizer(tmp_path):
    merges = [("a", "</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("l", "e</w>"), ("circ", "le</w>"), ("t", "h")]
    path = str(tmp_path / "merges.txt.gz")
    _write_merges(path, merges)
    tok = clip.BPETokenizer(path)
    assert tok.vocab_size == 256 + 256 + len(merges) + 2 and (tok.sot, tok.eot) == (tok.vocab_size - 2, tok.vocab_size - 1)
    ids = tok.encode("A   Circle &amp; the")
    assert [tok.decoder[i] for i in ids] == ["a</w>", "circle</w>", "&</w>", "th", "e</w>"]
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"  # OpenAI's id order
    text = "a large circle at the top left"
    row = clip.tokenize(text, 64, tok)[0].tolist()
    assert tok.decode(row) == text  # round trip
    # as OpenAI's decoder: every pre-token ends a word, so punctuation and digits come back spaced
    assert tok.decode(tok.encode("At the top-left: 12 it's")) == "at the top - left : 1 2 it 's"
    assert tok.decode(tok.encode("Ünïcødé 🙂")) == "ünïcødé 🙂"


def test_pretokenizer_matches_openai_expression():
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)
    for text in ["hello, world!! it's 2021; we'll see ''s", "naïve café—ünï 12.5% <|endoftext|>", "x'y'd'll !'s ²³ ٣"]:
        text = text.lower()
        assert clip._pretokenize(text) == regex.findall(pattern, text)


def test_bpe_model_needs_enough_ids(tmp_path):
    path = str(tmp_path / "merges.txt.gz")
    _write_merges(path, [("a", "b")])
    model = make_model(replace(CFG, bpe_path=path))  # vocab 258 < 515 ids of this tokenizer
    with pytest.raises(ValueError, match="tokenizer has 515 ids"):
        model.tokenize(["ab"])
    with pytest.raises(FileNotFoundError, match="merges file"):
        make_model(replace(CFG, bpe_path=str(tmp_path / "missing.gz"))).tokenize(["ab"])


# --- OpenAI checkpoints ---

def _openai_keys(vision_layers, text_layers):
    """The key names of OpenAI's released ViT checkpoints, written out independently of clip.py."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
    keys = ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
            "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
            "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
            "ln_final.weight", "ln_final.bias"]
    keys += [f"visual.transformer.resblocks.{i}.{k}" for i in range(vision_layers) for k in block]
    keys += [f"transformer.resblocks.{i}.{k}" for i in range(text_layers) for k in block]
    return set(keys)


def test_vit_b_32_preset_matches_openai_on_meta_device():
    with torch.device("meta"):
        model = clip.CLIP(clip.PRESETS["vit-b-32"])
    assert sum(p.numel() for p in model.parameters()) == 151_277_313
    sd = model.state_dict()
    assert set(sd) == _openai_keys(12, 12)
    shapes = {"visual.conv1.weight": (768, 3, 32, 32), "visual.class_embedding": (768,),
              "visual.positional_embedding": (50, 768), "visual.proj": (768, 512),
              "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
              "transformer.resblocks.0.attn.out_proj.weight": (512, 512),
              "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
              "ln_final.weight": (512,), "text_projection": (512, 512), "logit_scale": ()}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert clip.config_from_state_dict(sd) == replace(clip.PRESETS["vit-b-32"], openai_normalize=True)


class _Archive(nn.Module):
    """Holds tensors under dotted names, to trace into a TorchScript archive like OpenAI's files."""

    def __init__(self, state_dict):
        super().__init__()
        for key, value in state_dict.items():
            *path, name = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if value.is_floating_point() and key != "input_resolution":
                module.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                module.register_buffer(name, value)

    def forward(self, x):
        return x * self.logit_scale


@pytest.mark.parametrize("archive", [False, True])
def test_load_openai_round_trip(tmp_path, archive):
    # A small model with OpenAI's key structure, stored as OpenAI stores it: fp16 weights plus the
    # input_resolution, context_length and vocab_size entries.
    cfg = replace(CFG, vocab_size=300, vision_width=64, text_width=128)  # OpenAI's heads: width / 64
    source = make_model(cfg, seed=1)
    sd = {k: v.half() for k, v in source.state_dict().items()}
    sd.update(input_resolution=torch.tensor(16), context_length=torch.tensor(48), vocab_size=torch.tensor(300))
    path = str(tmp_path / "model.pt")
    if archive:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.trace(_Archive(sd), torch.ones(1)).save(path)
    else:
        torch.save(sd, path)
    model = clip.load_openai(path)
    expected = replace(cfg, vision_heads=1, text_heads=2, openai_normalize=True)
    assert model.cfg == expected and not model.training
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, sd[key].float(), rtol=0, atol=0)
    # strict: an extra or a missing key is an error
    sd["visual.extra"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="visual.extra"):
        clip.load_openai(path)
    del sd["visual.extra"], sd["ln_final.bias"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="ln_final.bias"):
        clip.load_openai(path)


def test_load_openai_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        clip.load_openai(str(tmp_path / "missing.pt"))
    path = str(tmp_path / "resnet.pt")
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="ResNet"):
        clip.load_openai(path)


def test_openai_normalisation_and_image_size():
    model = make_model(replace(CFG, openai_normalize=True)).eval()
    image = make_batch()["image"]
    x = ((image + 1) / 2 - torch.tensor(clip.OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(clip.OPENAI_STD).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), model.visual(x))
    with pytest.raises(ValueError, match="resize"):
        model.encode_image(torch.zeros(1, 3, 8, 8))


# --- zero-shot and retrieval ---

def test_zero_shot_and_retrieval():
    model, batch = make_model().eval(), make_batch()
    weights = model.zero_shot_classifier(["circle", "square"], templates=("a {}", "a picture of a {}"))
    assert weights.shape == (2, CFG.embed_dim)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2))
    probs = model.zero_shot_classify(batch["image"], weights)
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    acc = model.retrieval_accuracy(batch["image"], batch["caption"], candidates=CAPTIONS + ["a caption"])
    assert 0.0 <= acc.item() <= 1.0
    with pytest.raises(ValueError, match="candidates"):
        model.retrieval_accuracy(batch["image"], batch["caption"], candidates=CAPTIONS[:2])
    assert not hasattr(model, "sample")  # CLIP embeds; it does not generate


def test_captionless_batch_is_an_error():
    batch = make_batch()
    batch["caption"][1] = ""
    with pytest.raises(ValueError, match="without one"):
        make_model().loss(batch)


# --- train.py and sample.py ---

def test_cli_trains_resumes_and_evaluates(tmp_path, capsys):
    import sample
    import train
    run = tmp_path / "clip"
    small = ["--image-size", "16", "--patch-size", "8", "--vision-width", "32", "--vision-layers", "1",
             "--vision-heads", "2", "--text-width", "32", "--text-layers", "1", "--text-heads", "2",
             "--embed-dim", "16", "--batch-size", "8", "--data", "shapes:64", "--log-every", "2"]
    assert train.main(["clip", *small, "--steps", "2", "--out", str(run)]) == 0
    assert train.main(["clip", "--steps", "4", "--out", str(run), "--resume"]) == 0
    assert not (run / "samples.png").exists()  # CLIP has nothing to sample
    model, info = sample.load_model(run)
    assert isinstance(model, clip.CLIP) and info["step"] == 4 and model.cfg.vision_width == 32
    capsys.readouterr()
    assert sample.main([str(run), "--eval", "16", "--batch-size", "16"]) == 0
    assert "retrieval_top1" in capsys.readouterr().out
    assert sample.main([str(run)]) == 2
    assert "not a generative model" in capsys.readouterr().err
    assert train.main(["clip", "--patch-size", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "not a multiple of patch_size" in capsys.readouterr().err


def test_cli_captionless_folder_is_a_one_line_error(tmp_path, capsys):
    from PIL import Image

    from conftest import error_line, run_train
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):  # images without caption files
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert run_train("clip", "--image-size", "16", "--patch-size", "8", "--vision-width", "32",
                     "--vision-layers", "1", "--vision-heads", "2", "--text-width", "32", "--text-layers", "1",
                     "--text-heads", "2", "--embed-dim", "16", "--batch-size", "4", "--steps", "2",
                     "--data", f"folder:{folder}", "--out", run) == 2
    assert "images without one" in error_line(capsys)
    assert not (run / "ckpt.pt").exists()
