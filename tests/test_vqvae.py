"""Tests for vqvae.py: quantiser identities and pitfalls, Gated PixelCNN causality, training."""

import dataclasses
import math

import pytest
import torch

import vqvae
from conftest import overfit_losses

TINY = dataclasses.replace(
    vqvae.PRESETS["tiny"], image_size=16, hidden=16, res_hidden=8, num_res_blocks=1,
    num_codes=16, code_dim=4, restart_after=0, num_classes=0, prior_channels=8, prior_layers=3,
    prior_out_hidden=16,
)


def batch(B=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth images (4x4 noise, upsampled) so that a few steps can fit them
    low = torch.rand(B, 3, 4, 4, generator=g) * 2 - 1
    return {"image": torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear"),
            "label": torch.randint(0, 3, (B,), generator=g), "caption": [""] * B}


# --- quantiser ---


@pytest.mark.parametrize("ema", [True, False])
def test_quantizer_output_is_nearest_code(ema):
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=32, D=8, ema=ema).eval()
    q.e.data.normal_()
    z_e = torch.randn(2, 8, 5, 5)
    out = q(z_e)
    z = z_e.permute(0, 2, 3, 1).reshape(-1, 8).double()
    expect = torch.cdist(z, q.e.double()).argmin(1).view(2, 5, 5)
    assert torch.equal(out["codes"], expect)
    assert torch.allclose(out["z_q"], q.e[expect].permute(0, 3, 1, 2), atol=1e-6)


def test_straight_through_gradient_reaches_z_e():
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=16, D=4, ema=False).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    (q(z_e)["z_q"] * w).sum().backward()
    assert torch.allclose(z_e.grad, w)  # d z_q / d z_e is the identity


def test_codebook_loss_moves_codes_commitment_moves_encoder():
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=16, D=4, beta=0.25, ema=False).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z_e)
    out["loss"].backward()
    e_k = q.e[out["codes"]].permute(0, 3, 1, 2).detach()
    n = z_e.numel()
    assert torch.allclose(z_e.grad, 0.25 * 2 * (z_e - e_k).detach() / n, atol=1e-6)
    assert q.e.grad is not None and q.e.grad.abs().sum() > 0


def test_ema_update_matches_appendix_formulas():
    torch.manual_seed(0)
    K, D, gamma, eps = 8, 3, 0.9, 1e-5
    q = vqvae.VectorQuantizer(K, D, ema=True, gamma=gamma, eps=eps).train()
    q.e.normal_()
    q.m.copy_(q.e)
    z_e = torch.randn(2, D, 4, 4)
    z = z_e.permute(0, 2, 3, 1).reshape(-1, D)
    codes = torch.cdist(z, q.e).argmin(1)
    n_i = torch.bincount(codes, minlength=K).float()
    sums = torch.zeros(K, D).index_add_(0, codes, z)
    N = gamma * torch.ones(K) + (1 - gamma) * n_i
    m = gamma * q.e + (1 - gamma) * sums
    N_s = (N + eps) / (N.sum() + K * eps) * N.sum()
    q(z_e)
    assert torch.allclose(q.N, N) and torch.allclose(q.m, m, atol=1e-6)
    assert torch.allclose(q.e, m / N_s[:, None], atol=1e-5)


def test_ema_unused_codes_keep_their_norm():
    """The pitfall: cluster sizes starting at 0 make e_i = m_i / ~eps for every unused code."""
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=64, D=8, ema=True).train()
    norms = q.e.norm(dim=1).clone()
    z_e = q.e[:2].clone().view(1, 2, 8).permute(0, 2, 1).reshape(1, 8, 1, 2)  # uses codes 0, 1
    out = q(z_e.repeat(4, 1, 1, 1))
    unused = torch.ones(64, dtype=torch.bool)
    unused[out["codes"].unique()] = False
    assert unused.sum() >= 60
    assert torch.isfinite(q.e).all()
    ratio = q.e.norm(dim=1)[unused] / norms[unused]
    assert ratio.max() < 1.01 and ratio.min() > 0.99


def test_distances_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    K, D = 64, 16
    q = vqvae.VectorQuantizer(K, D, ema=False).eval()
    # codes close together away from the origin: ||z||^2 and ||e||^2 are ~256 while the
    # distances differ by ~0.1, below bf16's resolution (~1) at that magnitude
    centre = torch.full((D,), 4.0)
    q.e.data.copy_(centre + 0.05 * torch.randn(K, D))
    z = centre + 0.05 * torch.randn(256, D)
    z_e = z.view(16, 16, D).permute(2, 0, 1).unsqueeze(0)  # (1, D, 16, 16)
    expect = torch.cdist(z.double(), q.e.double()).argmin(1)
    # the naive computation under autocast does pick wrong codes on this data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = ((z * z).sum(1, keepdim=True) - 2 * z @ q.e.t() + (q.e * q.e).sum(1)).argmin(1)
        codes = q(z_e)["codes"].flatten()
        d = q.distances(z)
    assert (naive != expect).float().mean() > 0.5
    assert d.dtype == torch.float32
    assert (codes == expect).float().mean() > 0.99


def test_ema_update_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    a = vqvae.VectorQuantizer(K=16, D=8, ema=True).train()
    b = vqvae.VectorQuantizer(K=16, D=8, ema=True).train()
    b.load_state_dict(a.state_dict())
    z_e = 3 + torch.randn(4, 8, 4, 4)
    out_a = a(z_e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_b = b(z_e)
    assert out_b["z_q"].dtype == torch.float32
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(out_a["z_q"], out_b["z_q"])


@pytest.mark.parametrize("ema", [True, False])
def test_dead_codes_restart_onto_encoder_outputs(ema):
    torch.manual_seed(0)
    q = vqvae.VectorQuantizer(K=8, D=2, ema=ema, restart_after=3).train()
    assert q.unused_steps.eq(3).all()  # every code restarts on the first step: data init
    q.unused_steps.zero_()
    q.e.data.copy_(torch.randn(8, 2))
    q.e.data[7] = 1000.0  # never the nearest code
    if ema:
        q.m.copy_(q.e)
    z_e = torch.randn(4, 2, 4, 4)
    z = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for _ in range(3):
        q(z_e)
    assert q.e[7].abs().max() > 100  # not yet: restarted at the start of the 4th step
    q(z_e)
    assert q.e[7].abs().max() < 100
    assert torch.isclose(torch.cdist(q.e[7:8], z).min(), torch.tensor(0.0), atol=1e-5) or ema


def test_perplexity_and_usage():
    q = vqvae.VectorQuantizer(K=4, D=2, ema=False).eval()
    q.e.data.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    z_e = torch.tensor([[0.0, 0], [10, 0], [0.1, 0], [10, 0.1]]).t().reshape(1, 2, 2, 2)
    out = q(z_e)
    assert math.isclose(out["usage"].item(), 0.5)
    assert math.isclose(out["perplexity"].item(), 2.0, rel_tol=1e-4)


# --- Gated PixelCNN ---


def assert_causal(logits_fn, x, H, W):
    """Gradient of the output at raster position i w.r.t. the input at positions >= i is exactly
    zero, and (no blind spot) nonzero w.r.t. every position before i."""
    for i in range(H * W):
        r, c = divmod(i, W)
        (g,) = torch.autograd.grad(logits_fn(x)[:, :, r, c].sum(), x)
        dep = g.abs().sum((0, 1)).flatten()  # (H*W,)
        assert dep[i:].eq(0).all(), f"position {(r, c)} sees its own or a later input"
        assert dep[:i].gt(0).all(), f"position {(r, c)} has a blind spot"


def test_gated_pixelcnn_is_causal_without_blind_spot():
    torch.manual_seed(0)
    H = W = 5
    prior = vqvae.GatedPixelCNN(K=10, channels=6, layers=4, kernel=3, out_hidden=8, num_classes=3)
    x = torch.randn(2, 6, H, W, requires_grad=True)
    assert_causal(lambda x: prior.forward_embedded(x, torch.tensor([0, 2])), x, H, W)


def test_gated_pixelcnn_depends_on_label():
    torch.manual_seed(0)
    prior = vqvae.GatedPixelCNN(K=10, channels=6, layers=2, kernel=3, out_hidden=8, num_classes=3)
    codes = torch.randint(0, 10, (1, 4, 4))
    assert not torch.allclose(prior(codes, torch.tensor([0])), prior(codes, torch.tensor([1])))


# --- the model ---


def test_shapes_and_finite_losses():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, num_classes=3)
    model = vqvae.VQVAE(cfg)
    b = batch()
    for phase in model.phases:
        out = model.loss(b, phase)
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        params = list(model.phase_module(phase).parameters())
        grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert model.reconstruct(b["image"]).shape == (4, 3, 16, 16)
    model.eval()
    x = model.sample(2, temperature=0.8, label=1)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    ev = model.evaluate(b)
    assert set(ev) == {"mse", "psnr", "perplexity", "codes_in_use", "prior_bits_per_code"}
    assert all(torch.isfinite(v) for v in ev.values())


def test_phase_modules_are_disjoint():
    model = vqvae.VQVAE(TINY)
    a = {id(p) for p in model.phase_module("vqvae").parameters()}
    b = {id(p) for p in model.phase_module("prior").parameters()}
    assert a and b and not a & b
    assert len(a | b) == len(list(model.parameters()))


def test_prior_phase_leaves_codebook_alone():
    torch.manual_seed(0)
    model = vqvae.VQVAE(dataclasses.replace(TINY, restart_after=1)).train()
    before = {k: v.clone() for k, v in model.vqvae.quantizer.state_dict().items()}
    for _ in range(3):
        model.loss(batch(), "prior")
    for k, v in model.vqvae.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("phase", ["vqvae", "prior"])
def test_loss_falls_when_overfitting_one_batch(phase):
    torch.manual_seed(0)
    model = vqvae.VQVAE(TINY)
    b = batch(B=8)
    losses = overfit_losses(lambda: model.loss(b, phase)["loss"], model.phase_module(phase).parameters(), 40, 1e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_sampling_is_reproducible_under_seed():
    model = vqvae.VQVAE(dataclasses.replace(TINY, num_classes=3)).eval()
    torch.manual_seed(1)
    a = model.sample(3)
    torch.manual_seed(1)
    b = model.sample(3)
    assert torch.equal(a, b)


def test_sampling_temperature():
    """Near temperature 0 sampling is greedy (the same for every seed); at 1 it is random."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(TINY).eval()
    torch.manual_seed(3)
    a = model.sample(2, temperature=1e-4)
    torch.manual_seed(4)
    b = model.sample(2, temperature=1e-4)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    torch.manual_seed(3)
    c = model.sample(2, temperature=1.0)
    assert not torch.equal(c[0], c[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        vqvae.VQVAE(dataclasses.replace(TINY, image_size=18))
    with pytest.raises(ValueError, match="odd"):
        vqvae.VQVAE(dataclasses.replace(TINY, prior_kernel=4))
    model = vqvae.VQVAE(dataclasses.replace(TINY, num_classes=3))
    with pytest.raises(ValueError, match="label"):
        model.sample(1, label=7)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, temperature=0)
    with pytest.raises(ValueError, match="class-conditional"):
        vqvae.VQVAE(TINY).sample(1, label=0)
    with pytest.raises(ValueError, match="phase"):
        model.loss(batch(), "decoder")


def count(cfg):
    with torch.device("meta"):
        model = vqvae.VQVAE(cfg)
    return (sum(p.numel() for p in model.vqvae.parameters()),
            sum(p.numel() for p in model.prior.parameters()))


@pytest.mark.parametrize("name", list(vqvae.PRESETS))
def test_presets_build_on_meta(name):
    ae, prior = count(vqvae.PRESETS[name])
    assert ae > 0 and prior > 0
