"""The authors' released checkpoints: layouts key for key, weights in the right parameter, one-line
errors for a wrong file, and the reference outputs of their code reproduced (issue 23).

The layouts and reference outputs live in ../shared/released (built with the authors' code, see
its README); the tests skip where it is absent (a user's clone). Full-size state dicts are made of
views into one small random storage, so a 550M-parameter file takes 4 MB and loads in a blink.
"""
import argparse
import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

import ddpm
import guided

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "released"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent: the authors' layouts "
                                  "and reference outputs live outside the project")
LAYOUTS = sorted(p.name for p in SHARED.glob("*.json")) if SHARED.is_dir() else []
STORAGE = 1 << 20  # floats in the shared random storage


def layout(name):
    return json.loads((SHARED / name).read_text())


def loader_of(name):
    return ddpm.load_openai if name.startswith("improved-diffusion") else guided.load_openai


def cheap_state_dict(spec, dtype=None, seed=0):
    """{key: tensor} with the layout's keys, shapes and dtypes, every tensor a view into one random
    storage: the trailing dimensions that fit are contiguous (each key at its own offset), the
    leading ones repeat (stride 0). Distinct keys hold distinct values."""
    g = torch.Generator().manual_seed(seed)
    base = {torch.float32: torch.randn(STORAGE, generator=g)}
    out = {}
    for i, (k, v) in enumerate(spec.items()):
        dt = dtype or getattr(torch, v["dtype"])
        if dt not in base:
            base[dt] = (base[torch.float32].to(dt) if dt.is_floating_point
                        else torch.randint(0, 100, (STORAGE,), generator=g))
        shape = v["shape"]
        strides, inner = [0] * len(shape), 1
        for d in reversed(range(len(shape))):
            if inner * shape[d] > STORAGE // 2:
                break
            strides[d], inner = inner, inner * shape[d]
        offset = (i * 7919) % (STORAGE - inner)
        out[k] = base[dt].as_strided(shape, strides, offset)
    return out


def same(got, cheap):
    """got equals the cheap tensor on its distinct part (index 0 along its repeated dimensions)."""
    idx = tuple(0 if s == 0 else slice(None) for s in cheap.stride())
    return got.shape == cheap.shape and torch.equal(got[idx], cheap[idx])


def module_state(model, name):
    if name.startswith("improved-diffusion"):
        return model.net.state_dict()
    return (model if isinstance(model, guided.NoisyClassifier) else model.unet).state_dict()


# --- layouts ---


@needs_shared
@pytest.mark.parametrize("name", [n for n in LAYOUTS])
def test_every_released_layout_loads_key_for_key(name, tmp_path):
    spec = layout(name)
    sd = cheap_state_dict(spec["state_dict"])
    torch.save(sd, tmp_path / spec["url_name"])
    model = loader_of(name)(tmp_path / spec["url_name"])
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == spec["parameters"]
    got = module_state(model, name)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in got.values())
    if name.startswith("improved-diffusion"):  # renamed, and the attention rows regrouped
        names = ddpm._iddpm_names(model.net)
        heads = model.config.num_heads
        for k, (ours, _) in names.items():
            want = sd[k] if not k.endswith(("qkv.weight", "qkv.bias")) else ddpm._qkv_from_iddpm(sd[k], heads)
            assert same(got[ours].reshape(sd[k].shape), want), k
    else:
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert same(got[k], v), k


@needs_shared
def test_float16_weights_load_into_float32_parameters(tmp_path):
    spec = layout("128x128_classifier.json")
    sd = cheap_state_dict(spec["state_dict"], dtype=torch.float16)
    torch.save(sd, tmp_path / "c.pt")
    model = guided.load_openai(tmp_path / "c.pt")
    got = model.state_dict()
    k = "input_blocks.1.0.in_layers.2.weight"
    assert got[k].dtype == torch.float32 and torch.equal(got[k], sd[k].float())
    assert isinstance(model, guided.NoisyClassifier) and model.config.noise_schedule == "linear"


def mutations(spec):
    """(description, state dict, the key the error must name) for one key renamed, removed, added,
    or of another shape; meta tensors, since the check fails before any weight is read."""
    keys = list(spec)
    meta = lambda s: torch.empty(s, device="meta")  # noqa: E731
    sd = {k: meta(v["shape"]) for k, v in spec.items()}
    k = keys[len(keys) // 2]
    renamed = {(k + "_old" if j == k else j): v for j, v in sd.items()}
    removed = {j: v for j, v in sd.items() if j != k}
    extra = {**sd, "extra.weight": meta([3])}
    reshaped = {**sd, k: meta([s + 1 for s in spec[k]["shape"]])}
    return [("renamed", renamed, k + "_old"), ("removed", removed, k), ("extra", extra, "extra.weight"),
            ("reshaped", reshaped, k)]


@needs_shared
@pytest.mark.parametrize("name", [n for n in LAYOUTS])
def test_a_changed_key_is_a_one_line_error_naming_it(name, tmp_path):
    spec = layout(name)
    for what, sd, key in mutations(spec["state_dict"]):
        torch.save(sd, tmp_path / "bad.pt")
        with pytest.raises(ValueError) as e:
            loader_of(name)(tmp_path / "bad.pt")
        msg = str(e.value)
        assert "\n" not in msg and repr(key) in msg and spec["url_name"] in msg, (what, msg)


def test_unknown_truncated_and_code_needing_files_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    for load, known in ((guided.load_openai, "64x64_diffusion.pt"), (ddpm.load_openai, "cifar10_uncond_50M_500K")):
        with pytest.raises(ValueError, match="not a known layout") as e:
            load(tmp_path / "other.pt")
        assert known in str(e.value) and "\n" not in str(e.value)
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:900])
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "code.pt")  # unpickling it runs code
    for f in ("cut.pt", "code.pt", "missing.pt"):
        with pytest.raises(ValueError) as e:
            guided.load_openai(tmp_path / f)
        assert "\n" not in str(e.value) and f in str(e.value)
    with pytest.raises(ValueError, match="not the preset of a released file"):
        guided.load_openai(tmp_path / "full.pt", preset="tiny")


def test_released_presets_have_the_authors_parameter_counts():
    with torch.device("meta"):
        counts = {p: sum(q.numel() for q in ddpm.UNet(ddpm.PRESETS[p]).parameters())
                  for p in ddpm.OPENAI_FILES.values()}
        uncond = sum(q.numel() for q in guided.UNet(guided.PRESETS["adm-imagenet256-uncond"]).parameters())
    assert counts == {"cifar10_uncond_50M_500K": 52_546_438, "imagenet64_uncond_100M_1500K": 121_063_942}
    assert uncond == 552_814_086


# --- reference outputs of the authors' code ---


def golden(name):
    d = torch.load(SHARED / "golden" / f"{name}.pt", weights_only=True)
    return d, {k: v.float() for k, v in d["state_dict"].items()}


def adm_config(flags):
    """guided-diffusion's / glide-text2im's create_model flags -> ADMConfig (attention at sides)."""
    f = flags
    kw = dict(image_size=f["image_size"], model_channels=f["num_channels"], num_res_blocks=f["num_res_blocks"],
              channel_mult=tuple(int(c) for c in f["channel_mult"].split(",")),
              attention_resolutions=tuple(int(r) for r in f["attention_resolutions"].split(",")),
              num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
              num_heads_upsample=f["num_heads_upsample"], new_attention_order=f.get("use_new_attention_order", False),
              use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f["resblock_updown"],
              dropout=f["dropout"], learn_sigma=f.get("learn_sigma", True), p_uncond=0.0,
              num_classes=1000 if f.get("class_cond") else 0)
    if "text_ctx" in f:
        kw.update(text_ctx=f["text_ctx"], xf_width=f["xf_width"], xf_layers=f["xf_layers"], xf_heads=f["xf_heads"],
                  xf_final_ln=f["xf_final_ln"], xf_padding=f["xf_padding"], vocab_size=50257,
                  low_res_size=f["image_size"] // 4 if f["super_res"] else 0)
    return guided.ADMConfig(**kw)


@needs_shared
@pytest.mark.parametrize("name", ["adm_new_order_class", "adm_legacy_heads_class", "adm_legacy_headch_uncond",
                                  "glide_text2im_base", "glide_text2im_upsample"])
def test_guided_unet_reproduces_the_authors_output(name):
    d, sd = golden(name)
    net = guided.UNet(adm_config(d["flags"]))
    net.load_state_dict(sd, strict=True)
    inp = dict(d["inputs"])
    with torch.no_grad():
        out = net(inp.pop("x"), inp.pop("timesteps"), **inp)
    assert (out - d["output"]).abs().max() < 1e-4


@needs_shared
def test_noisy_classifier_reproduces_the_authors_output():
    d, sd = golden("adm_classifier_attention_pool")
    f = d["flags"]  # EncoderUNetModel's attention_resolutions are downsampling factors
    cfg = guided.ClassifierConfig(
        image_size=f["image_size"], num_classes=f["out_channels"], model_channels=f["model_channels"],
        channel_mult=f["channel_mult"], num_res_blocks=f["num_res_blocks"],
        attention_resolutions=tuple(f["image_size"] // r for r in f["attention_resolutions"]),
        num_head_channels=f["num_head_channels"])
    net = guided.NoisyClassifier(cfg)
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = net(d["inputs"]["x"], d["inputs"]["timesteps"])
    assert (out - d["output"]).abs().max() < 1e-4


@needs_shared
def test_ddpm_unet_reproduces_improved_diffusion(monkeypatch):
    d, sd = golden("improved_diffusion_unet")
    f = d["flags"]
    cfg = dataclasses.replace(ddpm.PRESETS["cifar10_uncond_50M_500K"], image_size=f["image_size"],
                              ch=f["num_channels"], num_res_blocks=f["num_res_blocks"], num_heads=f["num_heads"],
                              dropout=f["dropout"])
    t = d["inputs"]["timesteps"] * cfg.T / 1000  # their input was already rescaled to t * 1000 / T

    def error(cfg):
        net = ddpm.UNet(cfg)
        net.load_state_dict(ddpm.from_iddpm(sd, net), strict=True)
        with torch.no_grad():
            return (net(d["inputs"]["x"], t) - d["output"]).abs().max()

    assert error(cfg) < 1e-4
    # each difference matters: Ho's embedding, no rescaled t, or the qkv rows left as stored miss it
    assert error(dataclasses.replace(cfg, time_embedding="ho")) > 1e-3
    assert error(dataclasses.replace(cfg, rescale_timesteps=False)) > 1e-3
    monkeypatch.setattr(ddpm, "_qkv_from_iddpm", lambda w, heads: w)
    assert error(cfg) > 1e-3


# --- GLIDE's tokenizer ---


def test_gpt2_pretokenizer_matches_the_pattern_on_spaces_and_unicode():
    # expected: the `regex` package on GPT-2's pattern
    assert guided._gpt2_pretokenize("  two   spaces\tand a tab\nnew line  ") == [
        " ", " two", "  ", " spaces", "\t", "and", " a", " tab", "\n", "new", " line", "  "]
    assert guided._gpt2_pretokenize("it's x² ½ café\u0301 東京 \xa0\x1c!") == [
        "it", "'s", " x", "²", " ½", " café", "\u0301", " 東京", " ", "\xa0", "\x1c!"]


@needs_shared
def test_glide_bpe_reproduces_the_authors_tokens():
    ref = json.loads((SHARED / "golden" / "glide_bpe.json").read_text())
    bpe = guided.get_bpe(str(SHARED / "glide_bpe"))
    assert (bpe.n_vocab, bpe.end_token) == (ref["n_vocab"], ref["end_token"])
    for case in ref["cases"]:
        ids = bpe.encode(case["caption"])
        assert ids == case["ids"], case["caption"]
        assert bpe.decode(ids) == case["caption"].lower()
        tokens, mask = guided.tokenize([case["caption"]], 16, bpe)
        assert tokens[0].tolist() == case["padded16"] and mask[0].tolist() == case["mask16"]


@needs_shared
def test_glide_reads_captions_with_the_bpe_when_given(tmp_path):
    cfg = guided.ADMConfig(image_size=8, channel_mult=(1, 2), attention_resolutions=(4,), text_ctx=8, xf_width=32,
                           xf_layers=1, xf_heads=2, vocab_size=50257)
    model = guided.ADM(cfg)
    tokens, _ = model._text(["a corgi"], "cpu")
    assert tokens[0, :7].tolist() == list(b"a corgi")  # bytes by default
    model.config.bpe_dir = str(SHARED / "glide_bpe")
    tokens, mask = model._text(["a corgi", ""], "cpu")
    assert tokens[0, :2].tolist() == [64, 1162] and tokens[1].tolist() == [50256] * 8 and not mask[1].any()
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        guided.GPT2Tokenizer(str(tmp_path))


# --- sample.py on released files (tiny stand-ins for the full-size presets) ---


@pytest.fixture
def tiny_released(monkeypatch, tmp_path):
    """The released tables with tiny presets in place of the full-size ones, and a file of each
    in the authors' layout (random weights), so sample.py's released path runs in seconds."""
    net = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               num_head_channels=16)
    text = dict(text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2, vocab_size=50257, num_classes=0)
    tiny = {
        "adm-imagenet64": guided.ADMConfig(image_size=8, num_classes=1000, p_uncond=0.0, **net),
        "glide-base": guided.ADMConfig(image_size=8, p_uncond=0.2, **net, **text),
        "glide-upsample": guided.ADMConfig(image_size=16, low_res_size=8, noise_schedule="linear", p_uncond=0.0,
                                           **net, **text),
    }
    for k, v in tiny.items():
        monkeypatch.setitem(guided.PRESETS, k, v)
    clf = guided.ClassifierConfig(image_size=8, num_classes=1000, **net)
    monkeypatch.setitem(guided.CLASSIFIER_PRESETS, "adm-classifier-imagenet64", clf)
    monkeypatch.setattr(guided, "_LAYOUTS", {})
    iddpm = dataclasses.replace(ddpm.PRESETS["cifar10_uncond_50M_500K"], image_size=8, ch=32, ch_mult=(1, 2),
                                num_res_blocks=1, attn_resolutions=(4,))
    monkeypatch.setitem(ddpm.PRESETS, "cifar10_uncond_50M_500K", iddpm)
    torch.manual_seed(0)
    files = {}
    for name, model in (("64x64_diffusion.pt", guided.UNet(tiny["adm-imagenet64"])),
                        ("64x64_classifier.pt", guided.NoisyClassifier(clf)),
                        ("base.pt", guided.UNet(tiny["glide-base"])),
                        ("upsample.pt", guided.UNet(tiny["glide-upsample"]))):
        files[name] = tmp_path / name
        torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in model.state_dict().items() if "diffusion" not in k}, files[name])
    theirs = {k: 0.05 * torch.randn(shape) for k, (_, shape) in ddpm._iddpm_names(ddpm.UNet(iddpm)).items()}
    files["cifar10.pt"] = tmp_path / "cifar10.pt"
    torch.save(theirs, files["cifar10.pt"])
    return files


def run_sample(*argv):
    import sample
    return sample.main([str(a) for a in argv])


def test_sample_py_samples_released_files(tiny_released, tmp_path, capsys):
    f = tiny_released
    out = tmp_path / "out"
    out.mkdir()
    assert run_sample(f["64x64_diffusion.pt"], "--label", 207, "-n", 2, "--steps", 3, "--out", out / "a.png") == 0
    assert run_sample(f["64x64_diffusion.pt"], "--label", 207, "-n", 2, "--steps", 3, "--classifier",
                      f["64x64_classifier.pt"], "--classifier-scale", 1, "--out", out / "b.png") == 0
    assert run_sample(f["cifar10.pt"], "-n", 2, "--steps", 3, "--out", out / "c.png") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    assert run_sample(f["64x64_diffusion.pt"], "--label", 1000, "-n", 1, "--steps", 2) == 2
    assert "--label must be in 0..999" in capsys.readouterr().err


@needs_shared
def test_sample_py_runs_glide_with_its_upsampler_and_bpe(tiny_released, tmp_path, capsys, monkeypatch):
    import sample
    f = tiny_released
    seen = {}
    real = guided.GLIDE.sample

    @functools.wraps(real)  # keeps the signature, which sample.py reads
    def spy(self, n, **kw):
        seen.update(kw)
        return real(self, n, **kw)

    monkeypatch.setattr(guided.GLIDE, "sample", spy)
    bpe = SHARED / "glide_bpe"
    assert run_sample(f["base.pt"], "--upsampler", f["upsample.pt"], "--bpe-dir", bpe, "--prompt", "a corgi",
                      "-n", 1, "--steps", 3, "--out", tmp_path / "g.png") == 0
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] >= 16
    # the notebook's settings where no flag is given: guidance 3, fast27 DDIM from x_T * 0.997
    assert seen["guidance_scale"] == 3.0 and seen["upsample_steps"] == guided.glide_fast27()
    assert seen["upsample_eta"] == 0.0 and seen["upsample_temp"] == 0.997 and seen["steps"] == 3
    capsys.readouterr()
    assert run_sample(f["base.pt"], "--prompt", "a corgi", "-n", 1, "--steps", 2) == 2
    assert "--bpe-dir" in capsys.readouterr().err
    assert run_sample(f["upsample.pt"], "--bpe-dir", bpe, "--prompt", "a corgi", "-n", 1) == 2
    assert "upsampler" in capsys.readouterr().err
    assert run_sample(f["64x64_diffusion.pt"], "--bpe-dir", bpe, "-n", 1) == 2
    assert "GLIDE" in capsys.readouterr().err
    assert sample.RELEASED_DEFAULTS["adm"]["steps"] == 250


def test_sample_py_refuses_unknown_corrupt_and_changed_files(tiny_released, tmp_path, capsys):
    from conftest import error_line
    d = tmp_path / "bad"
    d.mkdir()
    torch.save({"encoder.weight": torch.zeros(3, 3)}, d / "other.pt")
    (d / "cut.pt").write_bytes(tiny_released["64x64_diffusion.pt"].read_bytes()[:5000])
    sd = torch.load(tiny_released["64x64_diffusion.pt"], weights_only=True)
    sd["label_emb.weight"] = sd["label_emb.weight"][:10]
    torch.save(sd, d / "changed.pt")
    before = sorted(p.name for p in d.iterdir())
    assert run_sample(d / "other.pt", "-n", 1) == 2
    line = error_line(capsys)
    assert "neither a checkpoint of this project nor a released file" in line
    assert "64x64_diffusion.pt" in line and "cifar10_uncond_50M_500K.pt" in line and "base.pt" in line
    assert run_sample(d / "cut.pt", "-n", 1) == 2
    assert "not a readable checkpoint" in error_line(capsys)
    assert run_sample(d / "changed.pt", "-n", 1) == 2
    assert "'label_emb.weight'" in error_line(capsys)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written


def test_sample_py_fid_without_weights_says_where_to_get_them(tiny_released, tmp_path, capsys):
    # (the whole --fid path runs in tests/test_fid.py)
    from conftest import error_line
    assert run_sample(tiny_released["64x64_diffusion.pt"], "--fid", tmp_path, "-n", 2) == 2
    line = error_line(capsys)
    assert "pt_inception-2015-12-05-6726825d.pth" in line and "github.com/mseitzer/pytorch-fid/releases" in line
