"""The VQ autoencoders' EMA codebook and train.py's EMA of the weights (issue 26): the codebook
buffers are fitted to the live encoder, so the end of a VQ phase must keep the live weights
with them, not averaged weights beside a live codebook."""
import dataclasses

import pytest
import torch

import train
import vqvae
import vqvae2
from conftest import run_train


class Live(torch.nn.Linear):
    keep_live_weights = True


def test_ema_keeps_live_weights_only_when_the_module_asks():
    torch.manual_seed(0)
    for cls, averaged in ((torch.nn.Linear, True), (Live, False)):
        m = cls(3, 2)
        ema = train.EMA(m, 0.999)
        for step in range(5):
            with torch.no_grad():
                m.weight.add_(1.0)
            ema.update(m, step)
        same = torch.equal(ema.module.weight, m.weight)
        assert same != averaged, cls


@pytest.mark.parametrize("module", ["vqvae", "vqvae2"])
def test_vq_autoencoders_ask_for_live_weights_with_an_ema_codebook(module):
    mod = {"vqvae": vqvae, "vqvae2": vqvae2}[module]
    cfg = mod.PRESETS["tiny"]
    model = (mod.VQVAE if module == "vqvae" else mod.VQVAE2)(cfg)
    assert model.phase_module("vqvae").keep_live_weights is True
    # a codebook learned by gradient is a parameter, averaged with the encoder: EMA weights fit
    model = (mod.VQVAE if module == "vqvae" else mod.VQVAE2)(dataclasses.replace(cfg, ema=False))
    assert model.phase_module("vqvae").keep_live_weights is False


def test_vq_phase_checkpoint_pairs_the_codebook_with_the_weights_it_was_fitted_to(tmp_path):
    run = tmp_path / "r"
    args = ["--image-size", "16", "--hidden", "8", "--res-hidden", "4", "--num-res-blocks", "1",
            "--num-codes", "8", "--code-dim", "4", "--prior-channels", "8", "--prior-layers", "2",
            "--prior-out-hidden", "8", "--batch-size", "8", "--data", "shapes:64",
            "--log-every", "3", "--save-every", "3", "--steps", "3", "--phase", "vqvae"]
    assert run_train("vqvae", *args, "--out", run) == 0
    ck = torch.load(run / "ckpt_vqvae.pt", weights_only=True)
    for k, v in ck["state_dict"].items():
        assert torch.equal(ck["ema"][k], v), k
