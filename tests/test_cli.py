"""train.py and sample.py end to end: training, exact resume, sampling, and every bad input."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import data
import train
import vae
from conftest import run_train, error_line

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--image-size", "16", "--channels", "8,16", "--latent-dim", "4", "--batch-size", "8",
         "--data", "shapes:64", "--log-every", "2", "--save-every", "2", "--sample-n", "4"]


def test_train_resume_is_exact_and_sample_loads(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train("vae", *SMALL, "--steps", 6, "--out", a) == 0
    # the same run, interrupted (as by Ctrl-C) in its 4th step, then resumed
    calls, real = {"n": 0}, vae.VAE.loss

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(vae.VAE, "loss", interrupted)
    assert run_train("vae", *SMALL, "--steps", 6, "--out", b) == 130
    monkeypatch.setattr(vae.VAE, "loss", real)
    assert torch.load(b / "ckpt.pt", weights_only=True)["step"] == 3
    assert run_train("vae", "--steps", 6, "--out", b, "--resume", "--log-every", 2) == 0
    ca = torch.load(a / "ckpt.pt", weights_only=True)
    cb = torch.load(b / "ckpt.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 6
    for key in ("state_dict", "ema"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)
    assert (a / "samples.png").exists() and len((a / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((a / "run.json").read_text())["config"]["latent_dim"] == 4
    # sample.py rebuilds the model from the checkpoint alone
    model, info = sample.load_model(a)
    assert isinstance(model, vae.VAE) and info["step"] == 6 and model.config.image_size == 16
    ema = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(ema[k], ca["ema"][k]) for k in ca["ema"])
    assert sample.main([str(a), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()
    assert sample.main([str(a / "ckpt.pt"), "-n", "4", "--reconstruct"]) == 0
    assert (a / "recon_s0.png").exists()
    assert sample.main([str(a), "--eval", "16", "--iwae-k", "2"]) == 0
    assert "iwae_bpd" in capsys.readouterr().out


def test_sampling_is_reproducible(tmp_path):
    run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "r")
    for out in ("x.png", "y.png"):
        sample.main([str(tmp_path / "r"), "-n", "4", "--seed", "3", "--out", str(tmp_path / out)])
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "y.png").read_bytes()


@pytest.mark.parametrize("name", ["ae", "dae"])
def test_autoencoders_write_reconstructions(tmp_path, name, capsys):
    assert run_train(name, *SMALL, "--steps", 2, "--out", tmp_path / name) == 0
    assert (tmp_path / name / "reconstructions.png").exists()
    assert sample.main([str(tmp_path / name), "-n", "2"]) == 2
    assert "learns no distribution" in error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["gan"], "invalid choice"),
    (["vae", "--foo", "1"], "unrecognized arguments"),
    (["vae", "--latent-dim", "x"], "takes int"),
    (["vae", "--preset", "huge"], "has presets"),
    (["vae", "--data", "imagenet:/x"], "unknown data set"),
    (["vae", "--data", "folder:/no/such/dir"], "no such folder"),
    (["vae", "--precision", "fp16", "--device", "cpu"], "needs CUDA"),
    (["vae", "--phase", "prior"], "has phases main"),
    (["vae", "--resume"], "no run"),
    (["vae", "--image-size", "20"], "divisible"),
])
def test_bad_training_input(tmp_path, capsys, argv, message):
    assert run_train(*argv, "--out", tmp_path / "new") == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "r"
    run_train("vae", *SMALL, "--steps", 2, "--out", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert run_train("vae", *SMALL, "--steps", 2, "--out", run) == 2
    assert "already holds a run" in error_line(capsys)
    assert run_train("vae", "--resume", "--latent-dim", "8", "--out", run) == 2
    assert "would change the model" in error_line(capsys)
    assert run_train("ae", "--resume", "--out", run) == 2
    assert "holds a vae run" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_bad_sampling_input(tmp_path, capsys):
    assert sample.main([str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert sample.main([str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in error_line(capsys)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert sample.main([str(tmp_path / "bad.pt")]) == 2
    assert "not a readable checkpoint" in error_line(capsys)
    run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "r")
    good = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    torch.save({**good, "model": "gan"}, tmp_path / "unknown.pt")
    capsys.readouterr()
    assert sample.main([str(tmp_path / "unknown.pt")]) == 2
    assert "unknown model 'gan'" in error_line(capsys)
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "r" / "ckpt.pt").read_bytes()[:5000])
    assert sample.main([str(tmp_path / "trunc.pt")]) == 2
    assert "not a readable checkpoint" in error_line(capsys)
    assert sample.main([str(tmp_path / "r"), "--prompt", "a red circle"]) == 2
    assert "--prompt is not an option" in error_line(capsys)
    assert sample.main([str(tmp_path / "r"), "--eval-captions", "4"]) == 2
    assert "takes no --prompt" in error_line(capsys)
    assert sample.main([str(tmp_path / "r"), "--compile"]) == 2
    assert "no U-Net to compile" in error_line(capsys)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = vae.VAE.loss

    def flaky(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        return {**out, "loss": out["loss"] * float("nan")} if calls["n"] > 4 else out

    monkeypatch.setattr(vae.VAE, "loss", flaky)
    assert run_train("vae", *SMALL, "--steps", 10, "--out", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "NaN" in err and "checkpoint of step 4 is kept" in err
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 4


def test_help_lists_config_fields():
    r = subprocess.run([sys.executable, "train.py", "vae", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--latent-dim" in r.stdout and "--resume" in r.stdout


def test_ctrl_c_saves_and_resumes(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "train.py", "vae", *SMALL, "--steps", "100000", "--out", str(run),
           "--save-every", "100000"]
    # SIGINT back to its default in the child: a shell's background job (e.g. the suite run with
    # `&`) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300  # generous: a loaded machine starts torch slowly
    while not (run / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2
    assert train.main(["vae", "--out", str(run), "--resume", "--steps", str(step + 2)]) == 0
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step + 2


def free_port():
    """A TCP port free now, so two suites running at once do not clash on a fixed one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(tmp_path):
    """Two gloo ranks train together; only rank 0 prints and writes. Rank 1 is made to reach the
    run-directory check 2 s late (as on a loaded machine): it must still find no run there, not
    the run.json rank 0 is about to write (which once failed it with "already holds a run")."""
    run = tmp_path / "ddp"
    late = tmp_path / "late_rank1.py"
    late.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "check = train.resolve_run\n"
        "def late(*a, **k):\n"
        "    if os.environ['LOCAL_RANK'] == '1':\n"
        "        time.sleep(2)\n"
        "    return check(*a, **k)\n"
        "train.resolve_run = late\n"
        "sys.exit(train.main())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(late), "vae", *SMALL, "--steps", "4",
                        "--device", "cpu", "--out", str(run)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("step 4/4") == 1  # only rank 0 prints and writes
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and len(ck["rng"]) == 2
    assert (run / "samples.png").exists()


def test_learning_rate_warmup_then_constant_or_cosine():
    hp = dict(lr=2.0, warmup=10, steps=110, lr_schedule="cosine")
    assert train.learning_rate(hp, 0) == pytest.approx(0.2)  # linear warm-up
    assert train.learning_rate(hp, 9) == pytest.approx(2.0)
    assert train.learning_rate(hp, 60) == pytest.approx(1.0)  # half way through the decay
    assert train.learning_rate(hp, 109) < 1e-3  # cosine decay reaches 0 at the last step
    assert train.learning_rate({**hp, "lr_schedule": "constant"}, 109) == pytest.approx(2.0)
    assert train.learning_rate({k: v for k, v in hp.items() if k != "lr_schedule"}, 60) == pytest.approx(2.0)


@pytest.mark.parametrize("name,phase", [("clip", "main"), ("glide", "base"), ("dalle", "transformer"),
                                        ("unclip", "prior"), ("unclip", "decoder"), ("unclip", "upsampler2")])
def test_compiled_training_step_is_not_recompiled_for_each_batch_of_captions(name, phase):
    """`train.py --compile` compiles the training step with the batch's captions among its inputs.
    The models turn captions into tensors in functions torch.compile does not trace; were it to
    trace them it would specialise on the strings and compile again for every batch (so would it
    on the host-drawn random choices of unCLIP's second upsampler's degradation). Only a
    changing shape may recompile (CLIP's count of distinct captions and token width: at most once
    each, after which those sizes are symbolic). Dynamo's eager backend: tracing and guards are
    what is tested, without building kernels."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    cfg = copy.deepcopy(train.presets(name)["tiny"])
    if phase == "upsampler2":
        cfg.upsampler2.degradation = "bsr"  # the paper's: its draws are the ones that could recompile
    model = train.model_class(name)(cfg)
    shapes = data.ShapesDataset(36, cfg.image_size, seed=1)
    step = torch.compile(train.Objective(model, phase), backend="eager")
    torch._dynamo.reset()
    counters.clear()
    frames = []
    for i in range(6):
        batch = torch.utils.data.default_collate([shapes[j] for j in range(6 * i, 6 * i + 6)])
        step(batch)["loss"].backward()
        frames.append(counters["frames"]["total"])
    assert len({tuple(shapes[j]["caption"] for j in range(6 * i, 6 * i + 6)) for i in range(6)}) == 6
    assert frames[-1] - frames[0] <= 2, frames
