"""Tests for vqvae2.py: the two-level autoencoder, causality of both priors, training, sampling."""

import dataclasses

import pytest
import torch

import vqvae2
from conftest import overfit_losses

TINY = dataclasses.replace(
    vqvae2.PRESETS["tiny"], image_size=16, hidden=16, res_hidden=8, num_res_blocks=1,
    num_codes=16, code_dim=4, restart_after=0, num_classes=0, top_channels=8, top_layers=3,
    top_heads=2, bottom_channels=8, bottom_layers=3, bottom_kernel=3, bottom_cond_blocks=1,
    prior_out_hidden=16,
)


def batch(B=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(B, 3, 4, 4, generator=g) * 2 - 1  # smooth images a few steps can fit
    return {"image": torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear"),
            "label": torch.randint(0, 3, (B,), generator=g), "caption": [""] * B}


def assert_causal(logits_fn, x, H, W):
    """Output at raster position i: zero gradient w.r.t. inputs at positions >= i, nonzero
    w.r.t. every earlier one (no blind spot)."""
    for i in range(H * W):
        r, c = divmod(i, W)
        (g,) = torch.autograd.grad(logits_fn(x)[:, :, r, c].sum(), x)
        dep = g.abs().sum((0, 1)).flatten()  # (H*W,)
        assert dep[i:].eq(0).all(), f"position {(r, c)} sees its own or a later input"
        assert dep[:i].gt(0).all(), f"position {(r, c)} has a blind spot"


def test_top_prior_with_attention_is_causal():
    torch.manual_seed(0)
    H = 4
    prior = vqvae2.PixelCNNPrior(K=10, channels=8, layers=2, kernel=3, out_hidden=8, size=H,
                                 num_classes=3, attention=2, heads=2)
    assert prior.attend_after == {0, 1}
    conds = prior.condition(2, torch.tensor([0, 1]))
    x = torch.randn(2, 8, H, H, requires_grad=True)
    assert_causal(lambda x: prior.forward_embedded(x, conds), x, H, H)


def test_attention_alone_gives_global_context():
    """With a single type-A layer (reach: one row up) the attention layer is what lets the last
    position see the first."""
    torch.manual_seed(0)
    H = 4
    kw = dict(K=10, channels=8, layers=1, kernel=3, out_hidden=8, size=H)
    for attention, sees_first in ((0, False), (1, True)):
        prior = vqvae2.PixelCNNPrior(**kw, attention=attention, heads=2)
        x = torch.randn(1, 8, H, H, requires_grad=True)
        (g,) = torch.autograd.grad(prior.forward_embedded(x, [None])[:, :, -1, -1].sum(), x)
        assert bool(g[:, :, 0, 0].abs().sum() > 0) == sees_first


def test_bottom_prior_conditioned_on_top_is_causal():
    torch.manual_seed(0)
    H = 4
    prior = vqvae2.PixelCNNPrior(K=10, channels=8, layers=3, kernel=3, out_hidden=8, size=H,
                                 num_classes=3, cond_K=7, cond_blocks=1, res_hidden=4)
    top = torch.randint(0, 7, (2, H // 2, H // 2))
    conds = prior.condition(2, torch.tensor([0, 2]), top)
    x = torch.randn(2, 8, H, H, requires_grad=True)
    assert_causal(lambda x: prior.forward_embedded(x, conds), x, H, H)
    # and the top codes matter, at every position
    other = prior.condition(2, torch.tensor([0, 2]), (top + 1) % 7)
    a, b = prior.forward_embedded(x, conds), prior.forward_embedded(x, other)
    assert (a - b).abs().sum((0, 1)).gt(0).all()


def test_shapes_and_finite_losses():
    torch.manual_seed(0)
    model = vqvae2.VQVAE2(dataclasses.replace(TINY, num_classes=3))
    b = batch()
    top, bottom = model.encode(b["image"])
    assert top.shape == (4, 2, 2) and bottom.shape == (4, 4, 4)
    for phase in model.phases:
        out = model.loss(b, phase)
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        params = list(model.phase_module(phase).parameters())
        grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.reconstruct(b["image"]).shape == (4, 3, 16, 16)
    model.eval()
    x = model.sample(2, temperature=0.9, label=2)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    ev = model.evaluate(b)
    assert all(torch.isfinite(v) for v in ev.values())
    assert {"mse", "psnr", "top_bits_per_code", "bottom_bits_per_code"} <= set(ev)


def test_decoder_uses_both_levels():
    torch.manual_seed(0)
    model = vqvae2.VQVAE2(TINY).eval()
    top, bottom = model.encode(batch()["image"])
    x = model.decode(top, bottom)
    assert not torch.allclose(x, model.decode((top + 1) % 16, bottom))
    assert not torch.allclose(x, model.decode(top, (bottom + 1) % 16))


def test_phase_modules_are_disjoint():
    model = vqvae2.VQVAE2(TINY)
    sets = [{id(p) for p in model.phase_module(ph).parameters()} for ph in model.phases]
    assert all(sets) and sum(map(len, sets)) == len(set().union(*sets))
    assert len(set().union(*sets)) == len(list(model.parameters()))


@pytest.mark.parametrize("phase", vqvae2.VQVAE2.phases)
def test_loss_falls_when_overfitting_one_batch(phase):
    torch.manual_seed(0)
    model = vqvae2.VQVAE2(TINY)
    b = batch(B=8)
    losses = overfit_losses(lambda: model.loss(b, phase)["loss"], model.phase_module(phase).parameters(), 40, 1e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_sampling_is_reproducible_under_seed():
    model = vqvae2.VQVAE2(dataclasses.replace(TINY, num_classes=3)).eval()
    torch.manual_seed(1)
    a = model.sample(2)
    torch.manual_seed(1)
    assert torch.equal(a, model.sample(2))


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 8"):
        vqvae2.VQVAE2(dataclasses.replace(TINY, image_size=20))
    with pytest.raises(ValueError, match="odd"):
        vqvae2.VQVAE2(dataclasses.replace(TINY, bottom_kernel=2))
    with pytest.raises(ValueError, match="top_heads"):
        vqvae2.VQVAE2(dataclasses.replace(TINY, top_heads=3))
    model = vqvae2.VQVAE2(dataclasses.replace(TINY, num_classes=3))
    with pytest.raises(ValueError, match="label"):
        model.sample(1, label=3)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, temperature=-1)


@pytest.mark.parametrize("name", list(vqvae2.PRESETS))
def test_presets_build_on_meta(name):
    with torch.device("meta"):
        model = vqvae2.VQVAE2(vqvae2.PRESETS[name])
    assert all(sum(p.numel() for p in model.phase_module(ph).parameters()) > 0
               for ph in model.phases)


def test_shared_blocks_are_checked_copies():
    """The quantiser, the PixelCNN layer and the autoencoder blocks come from vqvae.py under
    `# Copied from` markers, so tests/test_copies.py keeps them identical."""
    text = open(vqvae2.__file__).read()
    for name in ("VectorQuantizer", "GatedLayer", "ResBlock", "Encoder", "Decoder",
                 "sample_codes"):
        assert f"# Copied from vqvae.{name}\n" in text
