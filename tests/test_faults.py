"""Faults and bad input (issue 29): every one gets one line on stderr and a non-zero exit, nothing
the user already has is lost, and no file runs code.

Each class of fault runs the command line in a subprocess at least once; its variants run in
process (the same main(), without paying for torch's import each time). After every case the
files that existed before are byte-identical, and a malicious file's payload has not run.
One tiny trained run is shared by the whole module (`run`); a case that must change a run
works on a copy.
"""
import fcntl
import hashlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import sample
import train
from conftest import error_line, run_train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--image-size", "16", "--channels", "8,16", "--latent-dim", "4", "--batch-size", "8",
         "--data", "shapes:64", "--log-every", "2", "--save-every", "2", "--sample-n", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def default_sigint():
    # a shell's background job (the suite run with `&`) starts children with SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*argv, fsize=None, timeout=180):
    """`python ARGV` in a subprocess from the repository root; fsize: a limit on the size of any
    file it writes (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk)."""
    def setup():
        default_sigint()
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=ENV, preexec_fn=setup)


def one_line(r, code):
    """The exit status is `code` and stderr one or two lines without a traceback: the message."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and 1 <= len(lines) <= 2 and "Traceback" not in r.stderr, \
        (r.returncode, r.stderr[-3000:])
    return lines[-1]


def snapshot(*dirs):
    """{path: SHA-256} of every file under `dirs`."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def unchanged(before):
    """Every file of the snapshot is still there, byte-identical."""
    for p, h in before.items():
        assert p.exists() and hashlib.sha256(p.read_bytes()).hexdigest() == h, p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A vae run of 2 steps (checkpoint, run.json, log, samples) that no case may change."""
    r = tmp_path_factory.mktemp("faults") / "run"
    assert run_train("vae", *SMALL, "--steps", 2, "--out", r) == 0
    return r


@pytest.fixture
def scratch(run, tmp_path):
    """A copy of the shared run that a case may continue or damage."""
    return Path(shutil.copytree(run, tmp_path / "scratch"))


class Payload:
    """Unpickled, calls os.system: makes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- 1. no file the project reads runs code ---

def test_cifar10_batch_that_runs_code_is_refused(tmp_path):
    cifar, marker = tmp_path / "cifar", tmp_path / "ran"
    cifar.mkdir()
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, f)
    before = snapshot(cifar)
    r = cli("train.py", "vae", *SMALL, "--steps", 2, "--data", f"cifar10:{cifar}",
            "--out", tmp_path / "new")
    assert "asks to call posix.system" in one_line(r, 2)
    assert not marker.exists() and not (tmp_path / "new").exists()
    unchanged(before)


@pytest.mark.parametrize("script", ["sample", "resume"])
def test_checkpoint_that_runs_code_is_refused(scratch, tmp_path, script):
    marker = tmp_path / "ran"
    good = torch.load(scratch / "ckpt.pt", weights_only=True)
    torch.save({**good, "step": Payload(marker)}, scratch / "ckpt.pt")
    before = snapshot(scratch)
    r = cli(*(["sample.py", scratch, "-n", 1] if script == "sample" else
              ["train.py", "vae", "--out", scratch, "--resume", "--steps", 4]))
    assert "asks to call posix.system, which was refused" in one_line(r, 2)
    assert not marker.exists()
    unchanged(before)


# --- 2. an image never replaces a file ---

def test_sample_out_never_overwrites(run, tmp_path, capsys):
    before = snapshot(run)
    r = cli("sample.py", run, "-n", 1, "--out", run / "ckpt.pt")
    assert "writes PNG images" in one_line(r, 2)
    for out, message in [(run / "samples.png", "already exists; choose another name, or add --force"),
                         (run / "ckpt.pt", "writes PNG images"), (run / "run.json", "writes PNG images"),
                         (tmp_path / "no" / "such" / "dir.png", "there is no directory"),
                         (run, "writes PNG images")]:
        for force in ([], ["--force"]) if out.suffix != ".png" else ([],):
            assert sample.main([str(run), "-n", "1", "--out", str(out), *force]) == 2
            assert message in error_line(capsys)
    (tmp_path / "d.png").mkdir()
    assert sample.main([str(run), "-n", "1", "--out", str(tmp_path / "d.png"), "--force"]) == 2
    assert "is a directory" in error_line(capsys)
    unchanged(before)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"not yet an image")
    assert sample.main([str(run), "-n", "1", "--out", str(mine), "--force"]) == 0
    assert mine.read_bytes().startswith(b"\x89PNG")


# --- 3. numbers are checked where they are parsed ---

def test_negative_batch_size_is_refused_not_a_hang(tmp_path):
    r = cli("train.py", "ddpm", "--batch-size", -3, "--out", tmp_path / "new", timeout=120)
    assert "--batch-size takes a positive integer, got '-3'" in one_line(r, 2)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv", [
    ["ddpm", "--steps", "0"], ["ddpm", "--ema-decay", "2"], ["ddpm", "--sample-n", "-2"],
    ["ddpm", "--batch-size", "0"], ["ddpm", "--save-every", "0"], ["ddpm", "--log-every", "0"],
    ["ddpm", "--ch", "0"], ["ddpm", "--lr", "0"], ["ddpm", "--lr", "nan"],
    ["ddpm", "--weight-decay", "inf"], ["ddpm", "--grad-clip", "-1"], ["ddpm", "--warmup", "-1"],
    ["ddpm", "--seed", "-1"], ["ddpm", "--workers", "-1"], ["ddpm", "--dropout", "1.5"],
    ["ddpm", "--ch-mult", "1,0"], ["ddpm", "--T", "-5"], ["vae", "--latent-dim", "0"],
    ["vae", "--kl-warmup", "nan"], ["adm", "--p-uncond", "2"], ["vqvae", "--gamma", "1.5"],
    ["unclip", "--decoder.unet.model-channels", "0"],
])
def test_bad_numbers_in_train_flags(tmp_path, capsys, argv):
    assert run_train(*argv, "--out", tmp_path / "new") == 2
    line = error_line(capsys)
    assert f"{argv[-2]} takes " in line and repr(argv[-1]) in line, line
    assert not (tmp_path / "new").exists()


def test_numbers_that_mean_none_or_automatic_are_taken():
    args, over = train.parse_args(["adm", "--sample-n", "0", "--warmup", "0", "--grad-clip", "0",
                                   "--ema-decay", "0", "--num-classes", "0", "--dropout", "0",
                                   "--num-head-channels", "-1", "--lr", "1e-4"])
    assert args.sample_n == 0 and over["num_classes"] == 0 and over["num_head_channels"] == -1


def test_bad_numbers_in_sample_flags(run, capsys):
    r = cli("sample.py", run, "-n", -3)
    assert "-n takes a positive integer, got '-3'" in one_line(r, 2)
    before = snapshot(run)
    for flags in (["-n", "0"], ["--eta", "nan"], ["--eta", "2"], ["--steps", "0"],
                  ["--temperature", "0"], ["--top-p", "0"], ["--top-k", "0"], ["--seed", "-1"],
                  ["--batch-size", "0"], ["--eval", "0"], ["--guidance-scale", "inf"],
                  ["--label", "-1"], ["--iwae-k", "0"]):
        assert sample.main([str(run), *flags]) == 2
        line = error_line(capsys)
        assert f"{flags[0]} takes " in line and repr(flags[1]) in line, line
    unchanged(before)


# --- 4. a path to a file means that file ---

def test_a_checkpoint_file_is_the_one_sampled(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert run_train("vae", *SMALL, "--steps", 4, "--out", other) == 0
    mixed = Path(shutil.copytree(run, tmp_path / "mixed"))
    shutil.copy(other / "ckpt.pt", mixed / "backup.pt")
    before = snapshot(mixed)
    r = cli("sample.py", mixed / "backup.pt", "-n", 1, "--out", tmp_path / "b.png")
    assert r.returncode == 0, r.stderr
    model, info = sample.load_model(mixed / "backup.pt")
    want = torch.load(other / "ckpt.pt", weights_only=True)["ema"]
    assert info["step"] == 4 and all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    unchanged(before)
    # renamed: the directory has no ckpt.pt (was: "has not finished phase main")
    (mixed / "ckpt.pt").rename(mixed / "ckpt_old.pt")
    assert sample.main([str(mixed), "-n", "1"]) == 2
    assert "has no ckpt.pt (the checkpoint of phase main), but holds backup.pt, ckpt_old.pt" \
        in error_line(capsys)
    (mixed / "ckpt_old.pt").unlink()
    assert sample.main([str(mixed), "-n", "1"]) == 2
    assert "no checkpoint named ckpt*.pt in this directory, but it holds backup.pt" in error_line(capsys)


# --- 5. --resume and sample.py: one loader, the same one-line messages ---

def _damage(ck_path, how, tmp_path):
    raw = ck_path.read_bytes()
    good = torch.load(ck_path, weights_only=True)
    if how == "truncated":
        ck_path.write_bytes(raw[:len(raw) // 2])
    elif how == "empty":
        ck_path.write_bytes(b"")
    elif how == "directory":
        ck_path.unlink()
        ck_path.mkdir()
        (ck_path / "x").write_text("x")
    elif how == "not a dict":
        torch.save([1, 2], ck_path)
    elif how == "weights not a mapping":
        torch.save({**good, "state_dict": [1], "ema": [1]}, ck_path)
    elif how == "step not an int":
        torch.save({**good, "step": "2"}, ck_path)
    elif how == "config field of the wrong type":
        torch.save({**good, "config": {**good["config"], "latent_dim": "4"}}, ck_path)
    elif how == "weights of another shape":
        bad = {k: v[..., :1] if v.ndim else v for k, v in good["ema"].items()}
        torch.save({**{k: v for k, v in good.items() if k != "sha256"}, "ema": bad,
                    "state_dict": bad}, ck_path)
    elif how == "another model's":
        torch.save({**good, "model": "ae"}, ck_path)


BAD_CHECKPOINTS = {  # damage -> a part of the one line both scripts print
    "truncated": "not a readable checkpoint", "empty": "not a readable checkpoint",
    "directory": "is a directory", "not a dict": "not a checkpoint of this project",
    "weights not a mapping": "'state_dict' entry is not a mapping of names to tensors",
    "step not an int": "'step' entry is not a step count",
    "config field of the wrong type": "config field latent_dim is '4', not int",
    "weights of another shape": "weights do not fit",
    "another model's": "",
}


@pytest.mark.parametrize("how", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_same_line_from_both_scripts(scratch, tmp_path, capsys, how):
    _damage(scratch / "ckpt.pt", how, tmp_path)
    before = snapshot(scratch)
    assert run_train("vae", "--out", scratch, "--resume", "--steps", 4) == 2
    resumed = error_line(capsys)
    assert sample.main([str(scratch), "-n", "1"]) == 2
    sampled = error_line(capsys)
    if how == "another model's":  # a vae run whose checkpoint says it is an ae's
        assert "of a ae run, not phase main of vae" in resumed
        assert "weights do not fit" in sampled
    else:
        assert BAD_CHECKPOINTS[how] in resumed and BAD_CHECKPOINTS[how] in sampled, (resumed, sampled)
        assert str(scratch / "ckpt.pt") in resumed
    unchanged(before)


def test_damaged_run_json_is_one_line(scratch, capsys):
    for text in ("{", "[]", '{"model": "vae", "preset": "tiny", "config": {"latent_dim": "x"}, '
                            '"hparams": {"main": {}}}', '{"model": "vae"}'):
        (scratch / "run.json").write_text(text)
        before = snapshot(scratch)
        assert run_train("vae", "--out", scratch, "--resume") == 2
        assert "run.json" in error_line(capsys)
        unchanged(before)


# --- 6. a checksum of the tensors, verified on load ---

def _flip_a_weight_byte(path):
    """Flip one byte inside the largest tensor's record of a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2],
                                          "little") for k in (26, 28))
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def test_flipped_weight_bytes_are_refused(scratch, capsys):
    _flip_a_weight_byte(scratch / "ckpt.pt")
    torch.load(scratch / "ckpt.pt", weights_only=True)  # torch itself does not notice
    before = snapshot(scratch)
    r = cli("sample.py", scratch, "-n", 1)
    assert "is corrupt: its contents do not match the checksum" in one_line(r, 2)
    assert str(scratch / "ckpt.pt") in r.stderr
    assert run_train("vae", "--out", scratch, "--resume", "--steps", 4) == 2
    assert "is corrupt" in error_line(capsys)
    unchanged(before)


def test_checkpoints_without_a_checksum_still_load(scratch, tmp_path):
    ck = torch.load(scratch / "ckpt.pt", weights_only=True)
    assert ck["sha256"] == train.checksum(ck)
    del ck["sha256"]
    torch.save(ck, scratch / "ckpt.pt")  # as written before checksums
    assert sample.main([str(scratch), "-n", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert run_train("vae", "--out", scratch, "--resume", "--steps", 4) == 0
    assert torch.load(scratch / "ckpt.pt", weights_only=True)["step"] == 4


# --- 7. a full disk, a directory that cannot be written ---

def test_full_disk_during_a_save_keeps_the_last_checkpoint(scratch):
    before = snapshot(scratch)
    size = (scratch / "ckpt.pt").stat().st_size
    r = cli("train.py", "vae", "--out", scratch, "--resume", "--steps", 6, "--save-every", 2,
            fsize=size // 2)
    line = one_line(r, 1)
    assert "cannot write" in line and "File too large" in line and "of step 2 is kept" in line
    assert "2 steps were not saved" in line and "--resume" in line
    assert before[scratch / "ckpt.pt"] == snapshot(scratch)[scratch / "ckpt.pt"]
    assert not list(scratch.glob("*.tmp"))
    assert run_train("vae", "--out", scratch, "--resume", "--steps", 6) == 0  # space again: it goes on
    assert torch.load(scratch / "ckpt.pt", weights_only=True)["step"] == 6


def test_a_full_disk_at_start_leaves_an_empty_directory_empty(tmp_path, capsys, monkeypatch):
    def full(path, write):
        raise OSError(28, "No space left on device")

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(train, "write_atomic", full)
    assert run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "empty") == 2
    assert "cannot write there (No space left on device)" in error_line(capsys)
    assert not list((tmp_path / "empty").iterdir())  # no .lock making it look like a run
    monkeypatch.undo()
    assert run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "empty") == 0


def test_unwritable_run_directory_is_refused_before_training(run, tmp_path, capsys):
    r = cli("train.py", "vae", *SMALL, "--steps", 2, "--out", tmp_path / "new", fsize=0)
    assert "cannot write there (File too large)" in one_line(r, 2)
    assert not (tmp_path / "new").exists()  # no half-made run left behind
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert run_train("vae", *SMALL, "--steps", 2, "--out", out) == 2
        assert "--out" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        (tmp_path / "ro").mkdir(mode=0o500)
        assert run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "ro" / "r") == 2
        assert "cannot write there" in error_line(capsys)
    elif Path("/sys/kernel").is_dir():  # but not into sysfs
        assert run_train("vae", *SMALL, "--steps", 2, "--out", "/sys/kernel/no_run_here") == 2
        assert "cannot write there" in error_line(capsys)
    before = snapshot(run)
    r = cli("sample.py", run, "-n", 1, fsize=0)  # the image cannot be written
    assert "File too large" in one_line(r, 1)
    unchanged(before)


# --- 8. one train.py per run directory ---

def test_a_running_run_locks_its_directory(scratch, capsys):
    first = subprocess.Popen([sys.executable, "train.py", "vae", "--out", str(scratch), "--resume",
                              "--steps", "100000", "--save-every", "100000"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=default_sigint)
    try:
        for line in first.stdout:  # holds the lock from before this line on
            if "resumed at step" in line:
                break
        r = cli("train.py", "vae", "--out", scratch, "--resume", "--steps", 4)
        assert "is in use by another train.py" in one_line(r, 2)
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "checkpoint saved" in err and "Traceback" not in err
    # in process too, with the lock held here
    with open(scratch / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(scratch)
        assert run_train("vae", "--out", scratch, "--resume", "--steps", 10**6) == 2
        assert "in use" in error_line(capsys)
        unchanged(before)


# --- 9. Ctrl-C anywhere: exit 130, one line, no partial image ---

def test_ctrl_c_at_start_up(ddpm_run, tmp_path):
    """SIGINT 1 s after the start, while torch loads; on a machine that loads it faster, the
    signal lands later, in a long run or a long sampling, which must end the same way."""
    before = snapshot(ddpm_run)
    for argv in (["train.py", "vae", *SMALL, "--steps", 10**6, "--out", tmp_path / "new"],
                 ["sample.py", ddpm_run, "-n", 64, "--out", tmp_path / "s.png"]):
        p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err
        if "while starting" in err:
            assert not (tmp_path / "new").exists()
    assert not (tmp_path / "s.png").exists() and not list(tmp_path.glob("*.tmp"))
    unchanged(before)


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A ddpm run of 1 step, no samples: its sampler is slow enough to be interrupted."""
    r = tmp_path_factory.mktemp("faults_ddpm") / "run"
    assert run_train("ddpm", "--steps", 1, "--batch-size", 4, "--data", "shapes:64",
                     "--sample-n", 0, "--out", r) == 0
    return r


def _interrupt_when(argv, started, tmp_path):
    p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        if started in line or not line:
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, err


def test_ctrl_c_during_the_final_sampling(ddpm_run, tmp_path):
    run = Path(shutil.copytree(ddpm_run, tmp_path / "r"))
    code, err = _interrupt_when(["train.py", "ddpm", "--out", run, "--resume", "--steps", 2,
                                 "--sample-n", 64], "finished 2 steps", tmp_path)
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1 and "interrupted while drawing the samples" in err, err
    assert not list(run.glob("samples*")) and not list(run.glob("*.tmp"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2


def test_ctrl_c_while_sample_py_samples(ddpm_run, tmp_path):
    before = snapshot(ddpm_run)
    p = subprocess.Popen([sys.executable, "sample.py", str(ddpm_run), "-n", "64", "--out",
                          str(tmp_path / "s.png")], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    time.sleep(6)  # in the sampler by now (1000 steps of 64 images take minutes)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1 and "interrupted" in err, err
    assert not list(tmp_path.iterdir())  # no image, no temporary file
    unchanged(before)


# --- 10. messages that say what is wrong with what the user gave ---

def test_bad_data_files_say_what_is_wrong(tmp_path, capsys):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for name, dims in (("train-images-idx3-ubyte", (5, 28, 28)), ("train-labels-idx1-ubyte", (5,)),
                       ("t10k-images-idx3-ubyte", (5, 28, 28)), ("t10k-labels-idx1-ubyte", (5,))):
        head = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        (mnist / name).write_bytes(head + bytes(100))  # far fewer bytes than the header says
    before = snapshot(mnist)
    r = cli("train.py", "vae", *SMALL, "--data", f"mnist:{mnist}", "--out", tmp_path / "new")
    assert "is truncated: its header promises 5 x 28 x 28" in one_line(r, 2)
    assert run_train("vae", *SMALL, "--data", "shapes:-5", "--out", tmp_path / "new") == 2
    assert "shapes takes a positive number of images" in error_line(capsys)
    assert not (tmp_path / "new").exists()
    unchanged(before)


def test_a_config_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    """Found beyond the issue: a config that builds but cannot take the data fails at the first
    step (a traceback before). One line; the run, which never trained, leaves the --out usable."""
    for argv, message in ((["vae", *SMALL, "--in-channels", "2"], "to have 2 channels"),
                          (["adm", "--image-size", "16", "--model-channels", "32", "--batch-size", "2",
                            "--data", "shapes:8", "--num-classes", "3"], "index out of range")):
        out = tmp_path / argv[0]
        assert run_train(*argv, "--steps", 2, "--sample-n", 0, "--out", out) == 2
        line = error_line(capsys)
        assert f"{argv[0]} cannot train phase main with this config" in line and message in line
        assert not (out / "run.json").exists()
    assert run_train("vae", *SMALL, "--steps", 2, "--out", tmp_path / "vae") == 0
