"""unclip.py: the priors (causality, PCA, quantisation, candidate choice), slerp, guidance
identities, the decoder and upsamplers, the paper presets' counts, and the CLI end to end."""
import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ddpm
import guided
import sample
import data
import train
import unclip
from conftest import overfit_losses

ROOT = Path(__file__).resolve().parent.parent
D, V = 16, 258
DP = unclip.DiffusionPriorConfig(width=32, layers=2, heads=2, text_ctx=12, timesteps=100, sample_steps=4,
                                 embed_std=1.0)
AR = unclip.ARPriorConfig(text_width=16, text_layers=1, text_heads=2, text_ctx=12, width=32, layers=2, heads=2,
                          components=6, buckets=64)


def tiny_config(**kw):
    """The tiny preset, smaller still: a few seconds per phase on a CPU."""
    c = unclip.PRESETS["tiny"]
    small = replace(c,
                    clip=replace(c.clip, vision_width=32, vision_layers=1, vision_heads=2, embed_dim=D,
                                 text_width=32, text_layers=1, text_heads=2),
                    diffusion_prior=replace(c.diffusion_prior, width=32, layers=1, heads=2, sample_steps=2),
                    ar_prior=replace(c.ar_prior, text_width=16, text_layers=1, width=32, layers=1, heads=2,
                                     components=4, buckets=32),
                    decoder=replace(c.decoder, unet=replace(c.decoder.unet, model_channels=16, norm_groups=8,
                                                            cond_dim=D, xf_width=16), sample_steps=2),
                    upsampler1=replace(c.upsampler1, unet=replace(c.upsampler1.unet, model_channels=8,
                                                                  norm_groups=8), sample_steps=1),
                    upsampler2=replace(c.upsampler2, unet=replace(c.upsampler2.unet, model_channels=8,
                                                                  norm_groups=8), sample_steps=1))
    return replace(small, **kw)


def text_ids(n, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, L), generator=g)


# --- the diffusion prior ---

def test_diffusion_prior_is_causal():
    """Outputs at the text, z_t and t positions do not depend on the later z_i^(t) (a causal mask);
    the prediction at the final query does."""
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(DP, D, V).eval()
    seen = []
    prior.transformer.register_forward_hook(lambda m, i, o: seen.append(o))
    text, z_t, t = text_ids(2), torch.randn(2, D), torch.tensor([5, 50])
    out_a = prior(torch.randn(2, D), t, text, z_t)
    out_b = prior(torch.randn(2, D), t, text, z_t)
    L = text.shape[1]
    torch.testing.assert_close(seen[0][:, :L + 2], seen[1][:, :L + 2])
    assert not torch.allclose(seen[0][:, L + 2:], seen[1][:, L + 2:])
    assert not torch.allclose(out_a, out_b)


def test_diffusion_prior_keeps_the_candidate_nearest_the_caption(monkeypatch):
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(DP, D, V).eval()
    z_t = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    # candidate 0 is -z_t for captions 0, 2 and z_t for caption 1; candidate 1 the opposite
    signs = torch.tensor([[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    fake = (signs[..., None] * z_t[None]).reshape(6, D) * prior.scale

    def fake_sample(model, shape, **kw):
        assert shape == (6, D)
        return fake

    monkeypatch.setattr(prior.diffusion, "sample", fake_sample)
    z = prior.sample(text_ids(3), z_t, text_ids(1))
    torch.testing.assert_close(z, z_t)


def test_diffusion_prior_loss_falls_and_guidance_one_is_conditional():
    torch.manual_seed(0)
    prior = unclip.DiffusionPrior(replace(DP, cond_drop=0.0), D, V)
    z_i = torch.nn.functional.normalize(torch.randn(8, D), dim=-1)
    z_t, text, null = z_i.roll(1, -1), text_ids(8), text_ids(1)
    losses = overfit_losses(lambda: prior.loss(text, z_t, z_i, null), prior.parameters(), 60, 3e-3)
    assert losses[-1] < 0.5 * losses[0]
    prior.eval()
    torch.manual_seed(1)
    a = prior.sample(text[:2], z_t[:2], null, guidance_scale=1.0)
    torch.manual_seed(1)
    b = prior.sample(text[:2], z_t[:2], null, guidance_scale=1.0 + 1e-12)  # the batched CFG path
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_cfg_combine_identities():
    c, u = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(unclip.cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(unclip.cfg_combine(c, u, 0.0), u)
    torch.testing.assert_close(unclip.cfg_combine(c, u, 3.0), u + 3 * (c - u))


# --- the AR prior ---

def test_pca_orders_components_and_round_trips():
    torch.manual_seed(0)
    prior = unclip.ARPrior(replace(AR, components=D), D, V)
    scales = torch.linspace(3, 0.1, D)
    basis, _ = torch.linalg.qr(torch.randn(D, D))
    z = (torch.randn(2000, D) * scales) @ basis.T + 0.5  # known variances along a rotated basis
    prior.fit(z, z)
    lam = prior.eigenvalues
    assert (lam[:-1] >= lam[1:]).all()
    torch.testing.assert_close(lam.sqrt(), scales, rtol=0.1, atol=0.02)
    C = prior.components
    torch.testing.assert_close(C @ C.T, torch.eye(D), atol=1e-5, rtol=0)
    # the first component is the direction of largest variance, up to sign
    assert abs(float(C[0] @ basis[:, 0])) > 0.99
    torch.testing.assert_close(prior.unproject(prior.project(z)), z, atol=1e-4, rtol=0)
    # with K < D the round trip is exact for points in the span of the first K components
    small = unclip.ARPrior(AR, D, V)
    small.fit(z, z)
    y = torch.randn(10, AR.components)
    torch.testing.assert_close(small.project(small.unproject(y)), y, atol=1e-4, rtol=0)


def test_quantization_round_trip():
    prior = unclip.ARPrior(AR, D, V)
    lo, hi = torch.tensor(-2.0), torch.tensor(3.0)
    y = torch.rand(1000) * 5 - 2
    q = prior.quantize(y, lo, hi)
    assert q.min() >= 0 and q.max() < AR.buckets
    width = 5 / AR.buckets
    assert (prior.dequantize(q, lo, hi) - y).abs().max() <= width / 2 + 1e-6
    k = torch.arange(AR.buckets)
    assert torch.equal(prior.quantize(prior.dequantize(k, lo, hi), lo, hi), k)
    assert prior.quantize(torch.tensor([-10.0, 10.0]), lo, hi).tolist() == [0, AR.buckets - 1]


def test_ar_prior_is_causal_and_decodes_unit_vectors():
    torch.manual_seed(0)
    prior = unclip.ARPrior(AR, D, V).eval()
    z = torch.nn.functional.normalize(torch.randn(64, D), dim=-1)
    prior.fit(z, z.roll(1, 0))
    text, z_t = text_ids(2), z[:2]
    dot, codes = prior.encode(z[:2], z_t)
    k = 3
    a = prior.logits(text, z_t, dot, codes[:, :-1])
    changed = codes[:, :-1].clone()
    changed[:, k:] = (changed[:, k:] + 7) % AR.buckets
    b = prior.logits(text, z_t, dot, changed)
    assert a.shape == (2, AR.components + 1, AR.buckets)
    torch.testing.assert_close(a[:, :k + 1], b[:, :k + 1])  # rows that predict codes 1..k
    assert not torch.allclose(a[:, k + 1:], b[:, k + 1:])
    zs = prior.sample(text, z_t)
    assert zs.shape == (2, D) and torch.allclose(zs.norm(dim=-1), torch.ones(2))


def test_dot_token_comes_from_the_top_half():
    p = torch.full((1, 8), 1 / 8)
    kept = unclip.top_half(p)
    assert kept[0, :4].sum() == 0 and torch.allclose(kept.sum(-1), torch.ones(1))
    # a peaked distribution keeps the bucket holding its median
    p = torch.tensor([[0.1, 0.7, 0.1, 0.1]])
    assert unclip.top_half(p)[0, 1] > 0 and unclip.top_half(p)[0, 0] == 0


# --- slerp, decoder, upsamplers ---

def test_slerp_endpoints_and_norm():
    torch.manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    torch.testing.assert_close(unclip.slerp(a, b, 0.0), a)
    torch.testing.assert_close(unclip.slerp(a, b, 1.0), b)
    mid = unclip.slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close((mid * a).sum(-1), (mid * b).sum(-1))  # equal angles to both ends
    torch.testing.assert_close(unclip.slerp(a, a, 0.3), a)  # parallel ends


def test_decoder_guidance_identities():
    torch.manual_seed(0)
    cfg = tiny_config().decoder
    dec = unclip.Decoder(cfg, D).eval()
    for p in dec.parameters():  # a non-trivial output (the UNet's last layer starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    caps = ["a large red circle at the top", "a small blue square at the left"]
    model, kw = dec.guided_model(z, caps, 1.0)
    assert model is dec
    cond = dec(x, t, **kw)
    tokens, mask = dec.tokenize(["", ""], "cpu")
    uncond = dec(x, t, torch.zeros_like(z), tokens, mask)
    g, kw = dec.guided_model(z, caps, 3.0)
    out = g(x, t, **kw)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.guided_model(z, caps, 0.0)[0](x, t, **kw)[:, :3], uncond[:, :3],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond, uncond)


def test_decoder_feeds_z_i_at_unit_variance(monkeypatch):
    """The unit-norm z_i reaches the UNet's cond and the context projection as sqrt(D) z_i."""
    dec = unclip.Decoder(tiny_config().decoder, D)
    seen = {}
    monkeypatch.setattr(dec.unet, "forward", lambda x_t, t, cond=None, context=None, **kw: seen.update(cond=cond))
    z = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    dec(torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4]), z)
    torch.testing.assert_close(seen["cond"], z * math.sqrt(D))
    assert abs(seen["cond"].pow(2).mean().item() - 1.0) < 1e-5  # unit variance per coordinate


def test_upsamplers_are_convolutional_and_degrade():
    torch.manual_seed(0)
    cfg = tiny_config()
    up = unclip.Upsampler(cfg.upsampler2)
    names = [type(m).__name__ for m in up.modules()]
    assert "AttentionBlock" not in names
    out = up.loss(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert torch.isfinite(out["loss"])
    # any input size: trained on crops, applied to the whole image
    y = up(torch.randn(1, 3, 64, 64), torch.tensor([3]), torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 3, 64, 64)
    k = unclip.gaussian_kernel(0.6, 3)
    assert abs(float(k.sum()) - 1) < 1e-6 and k[1] > k[0]
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(unclip.blur(flat, 0.6, 3), flat)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    d = unclip.bsr_degrade(x, torch.Generator().manual_seed(0))
    assert d.shape == x.shape and not torch.allclose(d, x) and d.abs().max() <= 1


def test_unclip_phases_losses_and_sampling():
    torch.manual_seed(0)
    for prior in ("diffusion", "ar"):
        model = unclip.UnCLIP(tiny_config(prior=prior))
        S = model.cfg.image_size  # the final side, after both upsamplers
        ds = data.ShapesDataset(8, S)
        b = torch.utils.data.default_collate([ds[i] for i in range(4)])
        b["caption"] = list(b["caption"])
        model.prepare("prior", [b])
        for phase in model.phases:
            out = model.loss(b, phase)
            assert torch.isfinite(out["loss"]), (prior, phase)
            out["loss"].backward()
            params = list(model.phase_module(phase).parameters())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (prior, phase)
        model.eval()
        torch.manual_seed(3)
        x = model.sample(2, prompt=b["caption"][:2])
        torch.manual_seed(3)
        y = model.sample(2, prompt=b["caption"][:2])
        assert x.shape == (2, 3, S, S) and torch.equal(x, y)
        assert model.variations(b["image"][0], 2).shape == (2, 3, S, S)
        assert model.interpolate(b["image"][0], b["image"][1], 3).shape == (3, 3, S, S)
        assert model.text_diff(b["image"][0], "a red circle", "a blue circle", 2).shape == (2, 3, S, S)
        ev = model.evaluate(b)
        assert set(ev) >= {"clip_retrieval_top1", "prior_cosine"}


def test_decoder_trains_on_the_data_sets_own_rendering():
    model = unclip.UnCLIP(tiny_config())
    S = model.cfg.decoder.unet.image_size
    assert unclip.UnCLIP.extra_image_sizes(model.cfg, "decoder") == (S,)
    assert all(unclip.UnCLIP.extra_image_sizes(model.cfg, p) == () for p in model.phases if p != "decoder")
    ds = data.ShapesDataset(4, model.cfg.image_size, extra_sizes=(S,))
    b = torch.utils.data.default_collate([ds[i] for i in range(4)])
    b["caption"] = list(b["caption"])
    z_i = model.embed_image(b["image"])

    def loss(batch=None, x_0=None):
        torch.manual_seed(0)
        if batch is not None:
            return model.loss(batch, "decoder")["loss"]
        return model.decoder.loss(x_0, z_i, b["caption"])["loss"]

    assert torch.equal(loss(b), loss(x_0=b[f"image_{S}"]))  # the native rendering is the target
    shrunk = {k: v for k, v in b.items() if k != f"image_{S}"}  # without it: `image` shrunk
    assert torch.equal(loss(shrunk), loss(x_0=unclip.resize(b["image"], S)))
    assert not torch.equal(loss(b), loss(shrunk))


def test_bad_configs_are_reported():
    with pytest.raises(ValueError, match="prior"):
        unclip.UnCLIP(tiny_config(prior="gan"))
    with pytest.raises(ValueError, match="chain"):
        unclip.UnCLIP(tiny_config(image_size=2 * unclip.PRESETS["tiny"].image_size))


# --- the paper's presets ---

PAPER = {"decoder": 3.5e9, "upsampler1": 700e6, "upsampler2": 300e6}


def test_paper_presets_counts_on_meta():
    """Decoder 3.5B, upsamplers 700M and 300M within 10% (Table 3); CLIP ViT-H/16 ~1B. The priors
    follow appendix C's shapes (see the module docstring): one 24-block 2048-wide Transformer is
    24 * 12 * 2048^2 weights in its blocks; the AR prior adds a 1664 x 24 latent decoder."""
    counts = {}
    for prior in ("diffusion", "ar"):
        with torch.device("meta"):
            model = unclip.UnCLIP(replace(unclip.PRESETS["unclip"], prior=prior))
        for phase in model.phases:
            counts[prior, phase] = sum(p.numel() for p in model.phase_module(phase).parameters())
        blocks = sum(p.numel() for p in model.prior.transformer.parameters())
        W = 1664 if prior == "ar" else 2048
        assert abs(blocks - 24 * 12 * W ** 2) / blocks < 0.01
    for phase, n in PAPER.items():
        assert abs(counts["diffusion", phase] - n) / n < 0.10, (phase, counts["diffusion", phase])
    assert 0.9e9 < counts["diffusion", "clip"] < 1.1e9
    assert 1.2e9 < counts["diffusion", "prior"] < 1.4e9
    assert 2.0e9 < counts["ar", "prior"] < 2.2e9


# --- train.py and sample.py ---

# the CLI's flags for tiny_config() on 16 images, 2 steps per phase
TINY = ["--steps", "2", "--batch-size", "4", "--data", "shapes:16", "--log-every", "1", "--sample-n", "2",
        "--clip.vision-width", "32", "--clip.vision-layers", "1", "--clip.embed-dim", str(D),
        "--clip.text-width", "32", "--clip.text-layers", "1", "--clip.text-heads", "2",
        "--clip.vision-heads", "2", "--diffusion-prior.width", "32", "--diffusion-prior.layers", "1",
        "--diffusion-prior.heads", "2", "--diffusion-prior.sample-steps", "2",
        "--decoder.unet.model-channels", "16", "--decoder.unet.norm-groups", "8",
        "--decoder.unet.cond-dim", str(D), "--decoder.unet.xf-width", "16", "--decoder.sample-steps", "2",
        "--upsampler1.unet.model-channels", "8", "--upsampler1.unet.norm-groups", "8",
        "--upsampler1.sample-steps", "1", "--upsampler2.unet.model-channels", "8",
        "--upsampler2.unet.norm-groups", "8", "--upsampler2.sample-steps", "1"]


def test_cli_trains_every_part_and_samples(tmp_path, capsys, monkeypatch):
    run = tmp_path / "u"
    keys = {}  # the batch keys each phase trains on: the decoder's native rendering, and only there
    loss = unclip.UnCLIP.loss
    monkeypatch.setattr(unclip.UnCLIP, "loss", lambda self, b, ph: keys.setdefault(ph, set(b)) and loss(self, b, ph))
    monkeypatch.setattr(train, "thread_shares", lambda *a: {})  # every phase in this process
    flags = [*TINY, "--out", str(run)]
    assert train.main(["unclip", "--part", "clip", *flags]) == 0
    assert sample.main([str(run), "--prompt", "a red circle"]) == 2  # not finished yet
    assert "has not finished phase prior" in capsys.readouterr().err
    assert train.main(["unclip", "--out", str(run), "--resume", "--steps", "2", "--batch-size", "4"]) == 0
    for phase in unclip.UnCLIP.phases:
        assert (run / f"ckpt_{phase}.pt").exists()
        assert keys[phase] == {"image", "label", "caption"} | ({"image_32"} if phase == "decoder" else set())
    # the preview draws 25 samples of the test captions (16 here, so they repeat), listed beside it
    captions = [data.ShapesDataset(16, 128, split="test")[i]["caption"] for i in range(16)]
    assert (run / "samples.txt").read_text().splitlines() == (captions * 2)[:25]
    out = tmp_path / "s.png"
    assert sample.main([str(run), "-n", "2", "--prompt", "a large red circle at the top left",
                        "--steps", "2", "--out", str(out)]) == 0 and out.exists()
    img = tmp_path / "in.png"
    data.save_grid(data.ShapesDataset(1, 64)[0]["image"][None], img, pad=0)
    for mode in (["--variations", str(img)], ["--interpolate", str(img), str(img)],
                 ["--text-diff", str(img), "a red circle", "a blue circle"]):
        assert sample.main([str(run), "-n", "2", *mode]) == 0, mode
    assert sample.main([str(run), "--eval-captions", "2", "--steps", "2"]) == 0
    assert "position" in capsys.readouterr().out
    assert sample.main([str(run), "--variations", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    # --prior ar is a config field
    assert train.main(["unclip", "--part", "clip", "--prior", "ar", *flags[:-2], "--out", str(tmp_path / "ar")]) == 0
    assert json_config(tmp_path / "ar")["prior"] == "ar"


def test_upsamplers_train_beside_clip_as_they_train_alone(tmp_path, capfd, monkeypatch):
    # on a 2-thread CPU the upsamplers train in a second process while CLIP trains, each with one
    # thread; a phase always trains with its share, so phase by phase gives the same weights
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what train.py reads, on any machine
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert train.main(["unclip", *TINY, "--sample-n", "0", "--out", str(both)]) == 0
    out = capfd.readouterr().out
    assert "upsampler1 and upsampler2: in a second process" in out
    assert out.index("[unclip/upsampler1] step 2/2") < out.index("[unclip/prior] training")
    assert train.main(["unclip", *TINY, "--sample-n", "0", "--out", str(alone), "--phase", "clip"]) == 0
    for phase in unclip.UnCLIP.phases[1:]:
        assert train.main(["unclip", "--out", str(alone), "--phase", phase, "--steps", "2",
                           "--batch-size", "4", "--sample-n", "0"]) == 0
    assert "second process" not in capfd.readouterr().out
    for phase in unclip.UnCLIP.phases:
        a, b = (torch.load(r / f"ckpt_{phase}.pt", weights_only=True)["ema"] for r in (both, alone))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), phase


def _start_beside(run, steps=5000):
    """train.py unclip (tiny, long) in a subprocess on 2 threads, returned once CLIP and the
    upsampler beside it have both logged a step; also the second process's pid."""
    import os, re, signal, subprocess, sys
    p = subprocess.Popen([sys.executable, "train.py", "unclip", *TINY, "--steps", str(steps), "--out", str(run)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, pid = set(), None
    for line in p.stdout:
        m = re.search(r"in a second process \((\d+)\)", line)
        pid = int(m.group(1)) if m else pid
        seen |= {ph for ph in ("clip", "upsampler1") if line.startswith(f"[unclip/{ph}] step")}
        if len(seen) == 2:
            return p, pid
    raise AssertionError(p.communicate())


def _gone(pid, timeout=60):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]:
                return True  # a zombie: it has exited
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ctrl_c_stops_both_processes_and_resume_finishes(tmp_path):
    import signal
    run = tmp_path / "u"
    p, pid = _start_beside(run)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1, err
    assert lines[0].count("interrupted at step") == 2 and "beside it" in lines[0], err
    assert _gone(pid)
    steps = {ph: torch.load(run / f"ckpt_{ph}.pt", weights_only=True)["step"] for ph in ("clip", "upsampler1")}
    assert all(0 < s < 5000 for s in steps.values()), steps
    assert train.main(["unclip", "--out", str(run), "--resume", "--steps", "2", "--sample-n", "0"]) == 0
    assert all((run / f"ckpt_{ph}.pt").exists() for ph in unclip.UnCLIP.phases)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_second_process_saves_and_stops_when_the_first_is_killed(tmp_path):
    run = tmp_path / "u"
    p, pid = _start_beside(run)
    p.kill()
    p.communicate(timeout=120)  # until the second process, which shares the pipes, has ended
    assert _gone(pid)
    assert 0 < torch.load(run / "ckpt_upsampler1.pt", weights_only=True)["step"] < 5000


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_first_process_says_when_the_second_dies(tmp_path):
    import os, signal
    run = tmp_path / "u"
    p, pid = _start_beside(run, steps=1500)
    os.kill(pid, signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, err
    assert "upsampler1, upsampler2 ended (exit code -9)" in lines[0] and "--resume" in lines[0], err
    assert torch.load(run / "ckpt_clip.pt", weights_only=True)["step"] == 1500  # CLIP finished
    assert not (run / "ckpt_prior.pt").exists()


def json_config(run):
    import json
    return json.loads((run / "run.json").read_text())["config"]


def test_moving_the_model_moves_every_schedule(monkeypatch):
    # the float64 tables follow .to(device), so a training step never copies them from the host
    model = unclip.UnCLIP(tiny_config())
    moved = []
    real = ddpm.GaussianDiffusion.to

    def spy(self, device):
        moved.append((id(self), torch.device(device).type))
        return real(self, device)

    monkeypatch.setattr(ddpm.GaussianDiffusion, "to", spy)
    model.to(torch.float32)
    parts = (model.prior, model.decoder, model.upsampler1, model.upsampler2)
    assert sorted(moved) == sorted((id(p.diffusion), "cpu") for p in parts)
    with torch.device("meta"):
        meta = unclip.UnCLIP(tiny_config())
    moved.clear()
    meta.to(torch.float32)
    assert moved == [] and meta.decoder.diffusion.betas.device.type == "cpu"


def test_self_conditioning_trains_on_half_the_batch_and_samples_with_the_last_estimate(monkeypatch):
    """Chen et al. 2022, algorithm 1: in training, a random half of the batch gets the model's own
    clipped x_0 estimate (computed without gradients) as x_self and the other half zeros; in
    sampling, each step gets the previous step's x_0 estimate, the first step zeros."""
    torch.manual_seed(0)
    cfg = tiny_config().decoder
    cfg = replace(cfg, unet=replace(cfg.unet, self_condition=True))
    dec = unclip.Decoder(cfg, D)
    for p in dec.parameters():  # a non-trivial output (the UNet's last layer starts at zero)
        p.data.add_(0.05 * torch.randn_like(p))
    z = torch.nn.functional.normalize(torch.randn(6, D), dim=-1)
    x, t = torch.randn(6, 3, 16, 16), torch.full((6,), 500)
    tok = dec.tokenize([""] * 6, "cpu")
    assert not torch.allclose(dec(x, t, z, *tok, x_self=x.clamp(-1, 1)), dec(x, t, z, *tok))
    torch.testing.assert_close(dec(x, t, z, *tok), dec(x, t, z, *tok, x_self=torch.zeros_like(x)))
    calls = []
    forward = unclip.Decoder.forward

    def spy(self, x_t, t, z_i, tokens=None, mask=None, x_self=None):
        out = forward(self, x_t, t, z_i, tokens, mask, x_self)
        calls.append((x_t, t, x_self, out.detach(), torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(unclip.Decoder, "forward", spy)
    x_0 = torch.rand(6, 3, 16, 16) * 2 - 1
    dec.loss(x_0, z, ["a small red square at the top"] * 6)
    (xt_h, t_h, xs_h, out_h, grad_h), (xt, t, xs, _, grad) = calls
    assert not grad_h and grad and xs_h is None
    ab = dec.diffusion.alpha_bar[t_h].float().view(-1, 1, 1, 1)
    v = out_h[:, :3]
    expect = (ab.sqrt() * xt_h - (1 - ab).sqrt() * v).clamp(-1, 1)  # x_0 from v (Salimans & Ho eq. 9)
    used = xs.flatten(1).abs().sum(1) > 0
    assert 0 < int(used.sum()) < 6 and int(used.sum()) == len(xt_h)
    torch.testing.assert_close(xs[used], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xt[used], xt_h)  # the same x_t (same noise and t) in both passes
    # sampling: the previous step's x_0 estimate
    calls.clear()
    model = unclip.UnCLIP(tiny_config(decoder=cfg)).eval()
    model.decoder.load_state_dict(dec.state_dict())
    model.decode(z[:2], [""] * 2, steps=3, guidance_scale=1.0, upsample=False)
    assert len(calls) == 3 and calls[0][2] is None
    for (xt_a, t_a, _, out_a, _), (_, _, xs_b, _, _) in zip(calls, calls[1:]):
        ab = dec.diffusion.alpha_bar[t_a].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(xs_b, (ab.sqrt() * xt_a - (1 - ab).sqrt() * out_a[:, :3]).clamp(-1, 1),
                                   atol=1e-5, rtol=1e-5)


def test_self_conditioning_uses_its_estimate_with_probability_p():
    torch.manual_seed(0)
    cfg = tiny_config().decoder
    dec = unclip.Decoder(replace(cfg, unet=replace(cfg.unet, self_condition=True)), D)
    for p in dec.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    B = 400
    x_0 = torch.rand(B, 3, 8, 8) * 2 - 1
    tokens, mask = dec.tokenize([""] * B, "cpu")
    kw = {"z_i": torch.nn.functional.normalize(torch.randn(B, D), dim=-1), "tokens": tokens, "mask": mask}
    t = torch.randint(0, dec.diffusion.num_timesteps, (B,))
    used = dec.self_condition(x_0, t, torch.randn_like(x_0), kw, p=0.9).flatten(1).abs().sum(1) > 0
    assert 0.85 < used.float().mean() < 0.95  # binomial(400, 0.9): sd 1.5 points
