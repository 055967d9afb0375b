"""train.py and sample.py end to end for the phased models vqvae and vqvae2."""
import json

import pytest
import torch

import sample
import train
import vqvae
import vqvae2
from conftest import run_train, error_line

COMMON = ["--image-size", "16", "--hidden", "8", "--res-hidden", "4", "--num-res-blocks", "1",
          "--num-codes", "8", "--code-dim", "4", "--prior-out-hidden", "8", "--batch-size", "8",
          "--data", "shapes:64", "--log-every", "2", "--save-every", "2", "--sample-n", "4"]
SMALL = {
    "vqvae": COMMON + ["--prior-channels", "8", "--prior-layers", "2"],
    "vqvae2": COMMON + ["--top-channels", "8", "--top-layers", "2", "--top-heads", "2",
                        "--bottom-channels", "8", "--bottom-layers", "2",
                        "--bottom-cond-blocks", "1"],
}


def test_vqvae_phase_by_phase_then_sample(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_train("vqvae", *SMALL["vqvae"], "--steps", 2, "--out", run, "--phase", "vqvae") == 0
    assert (run / "ckpt_vqvae.pt").exists() and not (run / "ckpt_prior.pt").exists()
    hp = json.loads((run / "run.json").read_text())["hparams"]
    assert hp["vqvae"]["steps"] == 2 and hp["prior"]["steps"] == train.MODELS["vqvae"].phases["prior"]["steps"]
    assert hp["prior"]["data"] == hp["vqvae"]["data"] == "shapes:64"  # --data is shared by all phases
    assert sample.main([str(run), "-n", "2"]) == 2
    assert "has not finished phase prior" in error_line(capsys)
    assert sample.main([str(run), "-n", "4", "--reconstruct"]) == 0  # the autoencoder alone
    assert run_train("vqvae", "--steps", 2, "--out", run, "--phase", "prior") == 0
    assert (run / "ckpt_prior.pt").exists() and (run / "samples.png").exists()
    model, info = sample.load_model(run)
    assert isinstance(model, vqvae.VQVAE) and info["phases"] == ["vqvae", "prior"]
    assert model.cfg.num_classes == 18  # set from the shapes data
    capsys.readouterr()
    assert sample.main([str(run), "-n", "4", "--temperature", "0.7", "--label", "3"]) == 0
    assert sample.main([str(run), "--eval", "16"]) == 0
    out = capsys.readouterr().out
    assert "prior_bits_per_code" in out and "psnr" in out and "codes_in_use" in out
    assert sample.main([str(run), "-n", "2", "--label", "18"]) == 2
    assert "label must be in [0, 17]" in error_line(capsys)
    assert sample.main([str(run), "-n", "2", "--temperature", "0"]) == 2
    assert "temperature" in error_line(capsys)


def test_vqvae2_all_phases_resume_and_sample(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train("vqvae2", *SMALL["vqvae2"], "--steps", 4, "--out", a) == 0
    for phase in vqvae2.VQVAE2.phases:
        assert (a / f"ckpt_{phase}.pt").exists()
    assert (a / "samples.png").exists()
    # interrupted after the first phase, resumed: the same weights as the uninterrupted run
    assert run_train("vqvae2", *SMALL["vqvae2"], "--steps", 4, "--out", b, "--phase",
                     "vqvae") == 0
    # --batch-size given with --phase applied to that phase only: give it again for the rest
    assert run_train("vqvae2", "--steps", 4, "--batch-size", 8, "--out", b, "--resume") == 0
    for phase in vqvae2.VQVAE2.phases:
        ca = torch.load(a / f"ckpt_{phase}.pt", weights_only=True)
        cb = torch.load(b / f"ckpt_{phase}.pt", weights_only=True)
        for k in ca["ema"]:
            assert torch.equal(ca["ema"][k], cb["ema"][k]), (phase, k)
    capsys.readouterr()
    assert sample.main([str(a), "-n", "4", "--temperature", "0.9", "--label", "0"]) == 0
    assert sample.main([str(a), "--eval", "16"]) == 0
    assert "bottom_bits_per_code" in capsys.readouterr().out
    assert sample.main([str(a), "-n", "4", "--reconstruct"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["vqvae", "--phase", "decoder"], "has phases vqvae, prior"),
    (["vqvae", "--phase", "prior"], "needs phase vqvae first"),
    (["vqvae", "--image-size", "18"], "divisible"),
    (["vqvae2", "--image-size", "20"], "divisible by 8"),
    (["vqvae2", "--top-heads", "5"], "top_heads"),
    (["vqvae", "--prior-kernel", "4"], "odd"),
])
def test_bad_training_input(tmp_path, capsys, argv, message):
    # --steps 1: should the input be accepted after all, the test fails fast instead of training
    assert run_train(*argv, "--steps", 1, "--sample-n", 0, "--out", tmp_path / "new") == 2
    assert message in error_line(capsys)


def test_bf16_autocast_on_cpu(tmp_path):
    """A few bf16 steps of every phase: the quantiser runs in fp32 inside autocast."""
    run = tmp_path / "r"
    assert run_train("vqvae2", *SMALL["vqvae2"], "--steps", 2, "--out", run,
                     "--precision", "bf16") == 0
    assert (run / "samples.png").exists()


def test_two_process_ddp_on_cpu(tmp_path):
    """The quantiser all-reduces its EMA statistics and broadcasts restarts: it must not hang or
    fail under DistributedDataParallel (gloo)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29573", "train.py", "vqvae", *SMALL["vqvae"],
                        "--restart-after", "1", "--steps", "3", "--device", "cpu",
                        "--out", str(run)],
                       cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "ckpt_prior.pt").exists() and (run / "samples.png").exists()
