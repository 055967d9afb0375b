"""Train any model of the project.

    python train.py MODEL [--preset NAME] [--data SPEC] [--steps N] [--batch-size N] [--lr X]
                          [--out DIR] [--device auto|cpu|cuda] [--precision fp32|bf16|fp16]
                          [--seed N] [--resume] [--phase NAME] [--CONFIG-FIELD VALUE ...]

Every field of the model's config dataclass is a flag (`--latent-dim 16`, `--channels 32,64`).
`python train.py MODEL --help` lists them. Several GPUs: `torchrun --nproc_per_node N train.py ...`.

The loop is generic: it calls `model.loss(batch)` (STYLE.md rule 8) and, at the end,
`model.sample(n)`; models that train in phases (an autoencoder, then its prior) declare `phases`
and get one checkpoint per phase in the run directory. INTERFACE.md gives the whole contract. The
data sets, the pixel judge and the PNG writer live in data.py.

Faults end in one line and a non-zero exit, losing nothing (tests/test_faults.py): numeric flags
are checked where they are parsed; checkpoints are written whole (fsync, then a rename), carry a
SHA-256 of their tensors, and are read by one function (`load_checkpoint`, also sample.py's); a
running train.py holds RUN/.lock; Ctrl-C anywhere exits 130.

On a CPU, phases that need nothing of each other (a model's `parallel_phases`: unCLIP's upsamplers
beside its CLIP) train at once in two processes, each with half of the threads (`Beside`).
"""
import argparse
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import signal
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None


def interrupted_at_start(signum, frame):
    print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line and exit 130, no traceback
    signal.signal(signal.SIGINT, interrupted_at_start)

import torch  # noqa: E402 (after the handler above)
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from data import (StepBatches, UsageError, make_dataset, save_grid, to_device,  # noqa: F401, E402
                  write_atomic)

FORMAT_VERSION = 1


# --- the model registry ---

@dataclass(frozen=True)
class Spec:
    module: str  # the model file
    cls: str  # the model class in it
    about: str  # one line for --help
    # per phase (in the model's order): default steps, batch_size, lr of a CPU-sized run
    phases: dict = field(default_factory=dict)
    presets: str = "PRESETS"  # the presets dict in the model file (one file may hold several models)
    # config -> keywords of model.sample for the samples.png written after training: a quick
    # look, so that the default run is not dominated by a full-length sampler (sample.py uses the
    # model's own defaults)
    preview: typing.Callable[[object], dict] = lambda config: {}
    sample_n: int = 64  # images in samples.png (--sample-n overrides)
    # text-to-image: samples.png draws the first test captions (listed in samples.txt), not the
    # empty caption
    prompted: bool = False


MODELS = {
    "ae": Spec("vae", "AE", "autoencoder (Hinton & Salakhutdinov 2006)",
               {"main": dict(steps=1500, batch_size=64, lr=2e-3)}),
    "dae": Spec("vae", "DAE", "denoising autoencoder (Vincent et al. 2008)",
                {"main": dict(steps=1500, batch_size=64, lr=2e-3)}),
    "vae": Spec("vae", "VAE", "variational autoencoder (Kingma & Welling 2013)",
                {"main": dict(steps=2000, batch_size=64, lr=1e-3)}),
    "ddpm": Spec("ddpm", "DDPM", "DDPM and Improved DDPM (Ho et al. 2020; Nichol & Dhariwal 2021)",
                 {"main": dict(steps=800, batch_size=32, lr=1e-3)}, preview=lambda c: dict(steps=min(100, c.T))),
    "vqvae": Spec("vqvae", "VQVAE", "VQ-VAE + Gated PixelCNN prior (van den Oord et al. 2017)",
                  {"vqvae": dict(steps=1600, batch_size=32, lr=2e-3),
                   "prior": dict(steps=1600, batch_size=32, lr=2e-3)}),
    "vqvae2": Spec("vqvae2", "VQVAE2", "VQ-VAE-2, two levels + PixelCNN priors (Razavi et al. 2019)",
                   {"vqvae": dict(steps=1000, batch_size=32, lr=2e-3),
                    "prior_top": dict(steps=1000, batch_size=32, lr=2e-3),
                    "prior_bottom": dict(steps=1000, batch_size=32, lr=2e-3)}),
    "clip": Spec("clip", "CLIP", "contrastive image-text embeddings, no samples (Radford et al. 2021)",
                 {"main": dict(steps=1000, batch_size=128, lr=1e-3)}),
    "dalle": Spec("dalle", "DALLE", "discrete VAE, then a Transformer over text and image tokens "
                  "(Ramesh et al. 2021)",
                  {"dvae": dict(steps=850, batch_size=32, lr=2e-3),
                   "transformer": dict(steps=600, batch_size=32, lr=1e-3)}),
    "adm": Spec("guided", "ADM", "class-conditional ADM with classifier-free guidance "
                "(Dhariwal & Nichol 2021; Ho & Salimans 2021)",
                {"main": dict(steps=1300, batch_size=16, lr=1e-3)}),
    "classifier": Spec("guided", "NoisyClassifier", "noisy classifier for classifier guidance "
                       "(Dhariwal & Nichol 2021)",
                       {"main": dict(steps=1500, batch_size=32, lr=1e-3)}, "CLASSIFIER_PRESETS"),
    "glide": Spec("guided", "GLIDE", "text-to-image base model and upsampler (Nichol et al. 2021)",
                  {"base": dict(steps=800, batch_size=32, lr=1e-3),
                   "upsample": dict(steps=300, batch_size=16, lr=1e-3)}, "GLIDE_PRESETS"),
    "unclip": Spec("unclip", "UnCLIP", "unCLIP / DALL-E 2: CLIP, prior, decoder, upsamplers "
                   "(Ramesh et al. 2022); --prior diffusion|ar",
                   {"clip": dict(steps=1200, batch_size=128, lr=1e-3),
                    "prior": dict(steps=400, batch_size=32, lr=1e-3),
                    "decoder": dict(steps=5400, batch_size=12, lr=2e-3, lr_schedule="cosine"),
                    "upsampler1": dict(steps=1200, batch_size=32, lr=1e-3),
                    "upsampler2": dict(steps=1050, batch_size=32, lr=1e-3)}, sample_n=25, prompted=True),
}


def model_class(name):
    spec = MODELS[name]
    return getattr(importlib.import_module(spec.module), spec.cls)


def presets(name):
    return getattr(importlib.import_module(MODELS[name].module), MODELS[name].presets)


def phases_of(model_or_cls):
    return tuple(getattr(model_or_cls, "phases", ("main",)))


def phase_module(model, phase):
    return model if phase == "main" else model.phase_module(phase)


def ckpt_name(model_or_cls, phase):
    return "ckpt.pt" if len(phases_of(model_or_cls)) == 1 else f"ckpt_{phase}.pt"


def config_from_dict(cls, d, prefix=""):
    """Rebuild a (possibly nested) config dataclass from asdict() output; lists become tuples.
    A field of the wrong type (from a damaged checkpoint or run.json) is a ValueError naming it."""
    if not isinstance(d, dict):
        raise ValueError(f"config{' field ' + prefix[:-1] if prefix else ''} is a "
                         f"{type(d).__name__}, not a mapping of fields")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = config_from_dict(t, v, prefix + f.name + ".")
        else:
            if isinstance(v, list):
                v = tuple(v)
            if not _has_type(v, t):
                raise ValueError(f"config field {prefix + f.name} is {v!r}, not "
                                 f"{getattr(t, '__name__', str(t))}")
        kwargs[f.name] = v
    return cls(**kwargs)


def _has_type(v, t):
    """Whether v is a value of the config field type t (int, float, bool, str, tuple[int, ...])."""
    if typing.get_origin(t) is tuple:
        inner = (typing.get_args(t) or (int,))[0]
        return isinstance(v, tuple) and all(_has_type(x, inner) for x in v)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t) if isinstance(t, type) else True


# --- command line ---

def _config_fields(cls, prefix=""):
    """(flag name, dotted path, type, default) for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _config_fields(t, prefix + f.name + ".")
        else:
            yield (prefix + f.name).replace("_", "-"), prefix + f.name, t


def _parse_value(t, text):
    origin = typing.get_origin(t)
    if origin is tuple:
        inner = typing.get_args(t)[0] if typing.get_args(t) else int
        return tuple(inner(v) for v in text.split(",") if v.strip())
    return t(text)


def _typed(t, flag, lo=None, hi=None):
    """argparse type of a config field: t, with every number finite and within [lo, hi]."""
    def conv(text):
        try:
            v = _parse_value(t, text)
        except ValueError:
            kind = getattr(t, "__name__", str(t))
            raise argparse.ArgumentTypeError(f"--{flag} takes {kind}, got {text!r}")
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not _within(x, lo, hi):
                raise argparse.ArgumentTypeError(f"--{flag} takes {_kind(type(x), lo, hi)}"
                                                 f"{' each' if isinstance(v, tuple) else ''}, "
                                                 f"got {text!r}")
        return v
    return conv


def number(t, flag, lo=None, hi=None, above=False):
    """argparse type of a numeric flag: t (int or float), finite, within [lo, hi] (lo excluded
    when `above`). Bad values are refused where they are parsed, not found later as a hang
    (--batch-size -3), a traceback (--log-every 0) or nonsense accepted (--ema-decay 2)."""
    def conv(text):
        try:
            v = t(text)
        except ValueError:
            v = None
        if v is None or not _within(v, lo, hi) or (above and v == lo):
            raise argparse.ArgumentTypeError(f"{'-' * (1 + (len(flag) > 1))}{flag} takes "
                                             f"{_kind(t, lo, hi, above)}, got {text!r}")
        return v
    return conv


def _within(v, lo, hi):
    return math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _kind(t, lo, hi, above=False):
    what = "an integer" if t is int else "a number"
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}"
    if t is int and lo == 1:
        return "a positive integer"
    if lo is not None:
        return f"{what} {'>' if above else '>='} {lo}"
    return f"{what} <= {hi}" if hi is not None else f"a finite {'integer' if t is int else 'number'}"


FRACTIONS = ("drop", "p_uncond", "gamma")  # config fields that are probabilities or decays: [0, 1]


def _field_bounds(name, path, t):
    """Generic limits of a config field given as a flag: counts and sizes (int) at least 1; other
    numbers (float) not negative, and fractions (dropout, p_uncond, an EMA's gamma) at most 1.
    Where a preset of the model uses a lower value (0 for "none", -1 for "automatic"), that value
    is the limit instead. The model's own checks (ValueError) come on top."""
    inner = (typing.get_args(t) or (int,))[0] if typing.get_origin(t) is tuple else t
    if inner not in (int, float):
        return None, None
    values = []
    for preset in presets(name).values():
        v = preset
        for part in path.split("."):
            v = getattr(v, part)
        values.extend(v if isinstance(v, tuple) else (v,))
    lo = min([1 if inner is int else 0, *values])
    leaf = path.rpartition(".")[2]
    return lo, (1 if inner is float and any(f in leaf for f in FRACTIONS) else None)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser(name=None):
    p = Parser(prog="train.py", description="Train a model of the project. "
               "Models: " + "; ".join(f"{k}: {s.about}" for k, s in MODELS.items()),
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", choices=list(MODELS), help="which model to train")
    g = p.add_argument_group("training")
    g.add_argument("--preset", default=None, help="config preset of the model file (default: tiny)")
    g.add_argument("--data", default=None, help="shapes[:N] | folder:PATH | mnist:PATH | cifar10:PATH")
    g.add_argument("--steps", type=number(int, "steps", 1),
                   default=None, help="optimizer steps per phase")
    g.add_argument("--batch-size", type=number(int, "batch-size", 1),
                   default=None, help="global batch size")
    g.add_argument("--lr", type=number(float, "lr", 0, above=True),
                   default=None, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=number(float, "weight-decay", 0),
                   default=None, help="AdamW weight decay (0.0)")
    g.add_argument("--warmup", type=number(int, "warmup", 0),
                   default=None, help="linear lr warm-up steps (100)")
    g.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="after warm-up: constant lr, or cosine decay to 0 (CLIP; default per model)")
    g.add_argument("--grad-clip", type=number(float, "grad-clip", 0),
                   default=None, help="gradient norm clip (1.0)")
    g.add_argument("--ema-decay", type=number(float, "ema-decay", 0, 1),
                   default=None, help="EMA decay of the weights (0.999)")
    g.add_argument("--out", default=None, help="run directory (default runs/MODEL)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision; weights and optimizer stay fp32")
    g.add_argument("--seed", type=number(int, "seed", 0, 2**32 - 1),
                   default=None, help="seed of data order and noise (0)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--phase", "--part", default=None, help="train only this phase (part)")
    g.add_argument("--log-every", type=number(int, "log-every", 1),
                   default=50, help="steps between progress lines")
    g.add_argument("--save-every", type=number(int, "save-every", 1),
                   default=500, help="steps between checkpoints")
    g.add_argument("--sample-n", type=number(int, "sample-n", 0), default=None,
                   help="images in samples.png at the end (default 64; 25 for unclip)")
    g.add_argument("--workers", type=number(int, "workers", 0),
                   default=None, help="data loader workers (0 CPU, 4 CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--channels-last", action="store_true",
                   help="convolution weights in channels_last memory format, so convolutions run "
                        "channels-last (faster with bf16 on CUDA); data and noise stay NCHW")
    if name in MODELS:
        cls = type(presets(name)["tiny"])
        c = p.add_argument_group(f"{cls.__name__} fields (default: the preset's value)")
        taken = {a.dest for a in p._actions}
        for flag, path, t in _config_fields(cls):
            dest = "cfg:" + path
            if flag.replace("-", "_") in taken:
                raise RuntimeError(f"config field {path} of {name} clashes with a train.py flag")
            if t is bool:
                c.add_argument("--" + flag, dest=dest, default=None,
                               action=argparse.BooleanOptionalAction)
            else:
                c.add_argument("--" + flag, dest=dest, default=None,
                               type=_typed(t, flag, *_field_bounds(name, path, t)),
                               metavar=getattr(t, "__name__", "VALUE").upper())
    return p


def parse_args(argv):
    """-> (args namespace, {dotted config path: value} of the config flags given)."""
    argv = list(argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(name if name in MODELS else None).parse_args(argv)
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return args, overrides


TRAIN_DEFAULTS = dict(data="shapes", weight_decay=0.0, warmup=100, lr_schedule="constant", grad_clip=1.0,
                      ema_decay=0.999, seed=0)
# what train_phase reads from each phase's entry of run.json (lr_schedule came later: optional)
HPARAMS = {"steps", "batch_size", "lr", "data", "weight_decay", "warmup", "grad_clip", "ema_decay", "seed"}


def apply_overrides(config, overrides):
    """dataclasses.replace for dotted paths ('prior.depth')."""
    for path, v in overrides.items():
        head, _, rest = path.partition(".")
        if rest:
            config = dataclasses.replace(config, **{head: apply_overrides(getattr(config, head), {rest: v})})
        else:
            config = dataclasses.replace(config, **{head: v})
    return config


# --- training loop ---

def learning_rate(hp, step):
    """Linear warm-up over hp['warmup'] steps, then constant or, with lr_schedule 'cosine', a cosine
    decay to 0 at hp['steps'] (the CLIP paper's schedule, section 2.5)."""
    warm = max(1, hp["warmup"])
    if step < warm or hp.get("lr_schedule", "constant") == "constant":
        return hp["lr"] * min(1.0, (step + 1) / warm)
    progress = (step - warm) / max(1, hp["steps"] - warm)
    return hp["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def adamw(params, lr, weight_decay, device):
    """AdamW (Loshchilov & Hutter 2019) with torch's fused kernel where it has one for the device:
    on CUDA, and on the CPU from torch 2.4. One kernel updates every parameter, where the default
    launches a dozen small ops per tensor: on 2 CPU cores the unCLIP decoder's 231 tensors take
    about 4 ms a step instead of 13."""
    fused = device.type == "cuda" or (device.type == "cpu" and torch.torch_version.TorchVersion(
        torch.__version__) >= (2, 4))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


class EMA:
    """Exponential moving average of a module's weights; buffers are copied as they are.
    decay ramps up as min(decay, (1 + step) / (10 + step)) so short runs are not dominated by init.

    A module with `keep_live_weights = True` keeps its live weights (decay 0): its buffers are
    learned state fitted to the live weights (the EMA codebook of vqvae.py and vqvae2.py follows
    the live encoder), so averaged weights would not match them. On the VQ-VAE's default run the
    live pairing gave test MSE 0.0048, EMA weights with the live codebook 0.0049, and EMA weights
    with an EMA of the codebook buffers too 0.0050 (docs/mutation_notes.md)."""

    def __init__(self, module, decay):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = 0.0 if getattr(module, "keep_live_weights", False) else decay

    @torch.no_grad()
    def update(self, module, step):
        d = min(self.decay, (1 + step) / (10 + step))
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1 - d)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)


class Objective(nn.Module):
    """What DDP wraps: forward(batch) = model.loss(batch[, phase])."""

    def __init__(self, model, phase):
        super().__init__()
        self.model, self.phase = model, phase

    def forward(self, batch):
        if self.phase == "main":
            return self.model.loss(batch)
        return self.model.loss(batch, self.phase)



# --- checkpoints: written whole or not at all, read by one function, checked ---

def save_atomic(obj, path):
    """torch.save into a temporary file, fsync'd, then renamed over `path` (data.write_atomic).
    A failed write (a full disk) raises the OSError itself; torch.save reports it as a
    RuntimeError of its own ("unexpected pos ...")."""
    def write(tmp):
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
    write_atomic(path, write)


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def checksum(ck):
    """SHA-256 over the tensors of a checkpoint (weights, EMA, optimizer moments, RNG states):
    each one's place, dtype, shape and bytes, walked in order (dicts keep their order through
    torch.save and torch.load). The plain values beside them (step, config, ...) are left out:
    damage there fails unpickling or the type checks, and they may be edited on purpose. About
    0.15 s per 100 MB on one CPU core."""
    h = hashlib.sha256()

    def walk(x, where):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"{where} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}/{k!r}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}/{i}")

    walk({k: v for k, v in ck.items() if k != "sha256"}, "")
    return h.hexdigest()


# entry -> (what it must be, test): checked when present; load_checkpoint's `need` lists the
# entries that must be there
CHECKPOINT_ENTRIES = {
    "model": ("a model name", lambda v: isinstance(v, str)),
    "config": ("a mapping of config fields", lambda v: isinstance(v, dict)),
    "phase": ("a phase name", lambda v: isinstance(v, str)),
    "state_dict": ("a mapping of names to tensors", lambda v: _is_weights(v)),
    "ema": ("a mapping of names to tensors", lambda v: _is_weights(v)),
    "optimizer": ("an optimizer state (a mapping)", lambda v: isinstance(v, dict)),
    "step": ("a step count (an integer >= 0)",
             lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "rng": ("a list of random number generator states", lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(s, dict) and torch.is_tensor(s.get("torch")) for s in v) and len(v) > 0),
    "hparams": ("a mapping", lambda v: isinstance(v, dict)),
    "sha256": ("a SHA-256 hex digest", lambda v: isinstance(v, str)),
}


def _is_weights(v):
    return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def load_checkpoint(path, device="cpu", need=("model", "config"), plain_ok=False):
    """The one reader of checkpoints, for train.py (--resume, the phases before --phase) and
    sample.py alike. torch.load with weights_only=True, so a file cannot run code; then every
    entry is checked for its type and the stored checksum verified (checkpoints written before
    there was one load without). Anything wrong is a UsageError, one line naming the file and what
    is wrong with it. plain_ok: a dict without a 'model' entry (a plain state dict, such as the
    authors' released files sample.py reads) is returned unchecked, still loaded weights-only."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: not one line
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip is an OSError (a seek past its end), garbage not
        called = re.search(r"GLOBAL (\S+)", str(e))  # weights_only refused a function to call
        if called:
            raise UsageError(f"{path} is not a checkpoint of this project: it asks to call "
                             f"{called.group(1)}, which was refused; nothing in it was run")
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                         "it may be truncated: use another checkpoint")
    if plain_ok and isinstance(ck, dict) and "model" not in ck:
        return ck
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise UsageError(f"{path} is not a checkpoint of this project (no model/config entries)")
    for key in need:
        if key not in ck:
            raise UsageError(f"{path} has no {key!r} entry; it is not a complete checkpoint")
    for key, (what, ok) in CHECKPOINT_ENTRIES.items():
        if key in ck and not ok(ck[key]):
            raise UsageError(f"{path}: its {key!r} entry is not {what} (a {type(ck[key]).__name__})")
    if ck["model"] in MODELS:  # the config's fields of the right types (a damaged file says which)
        try:
            config_from_dict(type(presets(ck["model"])["tiny"]), ck["config"])
        except (TypeError, ValueError) as e:
            raise UsageError(f"{path}: {e}; the checkpoint is damaged")
    if "sha256" in ck and checksum(ck) != ck["sha256"]:
        raise UsageError(f"{path} is corrupt: its contents do not match the checksum stored in it; "
                         "use another checkpoint")
    return ck


def log(msg, rank=0):
    if rank == 0:
        print(msg, flush=True)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self):
        return self.world > 1


def setup_dist(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    if cuda:  # every step has the same shapes: let cuDNN time its algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    if world == 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return d, torch.device(f"cuda:{d.local_rank}" if cuda else "cpu")


def rng_state(device):
    s = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s, device):
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def autocast(device, precision):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_phase(model, name, phase, run, cfg, hp, datasets, device, d, args):
    """Train one phase to hp['steps'] steps, resuming from its checkpoint when there is one."""
    path = run / ckpt_name(model, phase)
    module = phase_module(model, phase)
    tag = name if phase == "main" else f"{name}/{phase}"
    model.requires_grad_(False).eval()
    module.requires_grad_(True).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = adamw(params, hp["lr"], hp["weight_decay"], device)
    ema = EMA(module, hp["ema_decay"])
    step = saved = 0
    if path.exists():
        ck = load_resume_checkpoint(path, device, name, phase, module, ema, opt)
        step = saved = ck["step"]
        states = ck["rng"]
        set_rng_state(states[d.rank] if d.rank < len(states) else states[0], device)
        log(f"[{tag}] resumed at step {step}", d.rank)
    if step >= hp["steps"]:
        log(f"[{tag}] done ({step} steps)", d.rank)
        ema.module.requires_grad_(False)
        module.load_state_dict(ema.module.state_dict())  # later phases and sampling use EMA weights
        return
    per_rank = hp["batch_size"] // d.world
    train_set = datasets["train"]
    extra = getattr(model, "extra_image_sizes", lambda c, p: ())(cfg, phase)
    if extra:  # this phase also wants each image made at these sides (batch keys image_{S})
        train_set = copy.copy(train_set)
        train_set.extra_sizes = tuple(extra)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)

    def loader(start, total):
        return torch.utils.data.DataLoader(
            train_set, batch_sampler=StepBatches(len(train_set), per_rank, hp["seed"], start, total,
                                                 d.rank, d.world),
            num_workers=workers, pin_memory=device.type == "cuda",
            # its own generator: creating a loader must not draw from the global RNG, or a
            # resumed run's noise would drift from the uninterrupted run's
            generator=torch.Generator().manual_seed(hp["seed"] + start))

    in_ch = getattr(cfg, "in_channels", 3)
    if step == 0 and hasattr(model, "prepare"):
        n_prep = max(1, min(len(train_set) // per_rank, 50))
        model.prepare(phase, (to_device(b, device, in_ch) for b in loader(0, n_prep)))
        ema = EMA(module, hp["ema_decay"])  # prepare() may have set buffers
    objective = Objective(model, phase)
    step_fn = objective
    if d.on:
        step_fn = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        step_fn = torch.compile(step_fn)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    total = hp["steps"]

    def checkpoint(step):
        states = [rng_state(device)]
        if d.on:
            states = [None] * d.world
            dist.all_gather_object(states, rng_state(device))
        if d.rank == 0:
            ck = {"format": FORMAT_VERSION, "model": name, "preset": args.preset,
                  "config": dataclasses.asdict(cfg), "phase": phase,
                  "state_dict": module.state_dict(), "ema": ema.module.state_dict(),
                  "optimizer": opt.state_dict(), "step": step, "rng": states,
                  "args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items() if not k.startswith("cfg:")},
                  "hparams": hp}
            ck["sha256"] = checksum(ck)
            try:
                save_atomic(ck, path)
            except OSError as e:
                raise not_saved(e, path, step)
        return step

    def not_saved(e, what, step):
        """A write failed (a full disk): what was lost, and how to go on, in one line."""
        kept = (f"{path} of step {saved} is kept" if path.exists() else "no checkpoint was written")
        return TrainingStopped(f"error: cannot write {what} ({e.strerror or e}): stopped at step "
                               f"{step} of phase {phase}; {kept}, so {step - saved} steps were not "
                               f"saved. Free some space, then continue with: python train.py "
                               f"{name} --out {run} --resume", 1)

    sums, nonfinite = {}, torch.zeros((), dtype=torch.bool, device=device)
    t0, t_last, last_step, first_step, last_good = time.time(), time.time(), step, step, None
    log(f"[{tag}] training {sum(p.numel() for p in params):,} parameters for {total} steps, "
        f"batch {hp['batch_size']}, lr {hp['lr']}, {args.precision} on {device}"
        + (f" x {d.world}" if d.on else ""), d.rank)
    try:
        for batch in loader(step, total):
            batch = to_device(batch, device, in_ch)
            if hasattr(model, "set_progress"):
                model.set_progress(step, total, phase)
            lr = learning_rate(hp, step)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, args.precision):
                out = step_fn(batch)
            loss = out["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if hp["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(params, hp["grad_clip"])
            scaler.step(opt)
            scaler.update()
            ema.update(module, step)
            step += 1
            nonfinite |= ~torch.isfinite(loss.detach())
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0) + v.detach().float()
            if step % args.log_every == 0 or step == total:
                if bool(nonfinite):  # the one host sync per log interval
                    raise FloatingPointError
                n = step - last_step
                vals = {k: (v / n).item() for k, v in sums.items()}
                now = time.time()
                ips = n * hp["batch_size"] / max(now - t_last, 1e-9)
                eta = (now - t0) / max(1, step - first_step) * (total - step)
                parts = " ".join(f"{k} {v:.4g}" for k, v in vals.items() if k != "loss")
                log(f"[{tag}] step {step}/{total} loss {vals['loss']:.4f} {parts} | "
                    f"{ips:.0f} img/s | eta {fmt_time(eta)}", d.rank)
                if d.rank == 0:
                    try:
                        with open(run / "log.jsonl", "a") as f:
                            f.write(json.dumps({"phase": phase, "step": step, **vals,
                                                "images_per_s": ips, "time": now}) + "\n")
                    except OSError as e:
                        raise not_saved(e, run / "log.jsonl", step)
                sums, t_last, last_step = {}, now, step
            if step % args.save_every == 0 or step == total:
                if bool(nonfinite):
                    raise FloatingPointError
                saved = last_good = checkpoint(step)
    except (RuntimeError, IndexError, ValueError) as e:
        if step > first_step or args.compile:  # a fault in a run that was training (or in the
            raise  # compiler): a bug, keep its traceback
        # the first step: the config does not fit the data or the device (channels, classes,
        # memory); nothing was trained, nothing is lost
        raise UsageError(f"{name} cannot train phase {phase} with this config on --data "
                         f"{hp['data']}: {' '.join(str(e).split())[:200]}")
    except FloatingPointError:
        kept = f"the checkpoint of step {last_good} is kept" if last_good else (
            "the last checkpoint is kept" if path.exists() else "no checkpoint was written")
        raise TrainingStopped(f"error: the loss became NaN or infinite before step {step} of "
                              f"phase {phase}; stopped and {kept}. Lower --lr, or use fp32.", 1)
    except KeyboardInterrupt:
        if not bool(nonfinite):
            checkpoint(step)
            raise TrainingStopped(f"interrupted at step {step}: checkpoint saved to {path}; "
                                  f"continue with: python train.py {name} --out {run} --resume", 130)
        raise TrainingStopped(f"interrupted at step {step}; the loss was not finite, so no "
                              "checkpoint was written", 130)
    module.load_state_dict(ema.module.state_dict())  # later phases and sampling use EMA weights
    log(f"[{tag}] finished {total} steps in {fmt_time(time.time() - t0)}", d.rank)


class TrainingStopped(Exception):
    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


# --- phases side by side (CPU) ---

def thread_shares(model, device, d):
    """{phase: threads} for the phases of `model.parallel_phases`, or {} where they train one after
    the other (CUDA, several processes, one thread).

    `parallel_phases` maps a phase to later phases that read nothing of it or of the phases between
    (unCLIP: its upsamplers see only images). On a CPU those train in a second process while the
    first trains, each with half of the threads: on 2 cores two one-thread processes get through
    more work than one two-thread process, whose small convolutions and matmuls keep both threads
    busy only part of the time. The share is a property of the phase, so a phase trained alone
    (`--phase`, `--resume`) computes what it computes beside the other."""
    side = getattr(model, "parallel_phases", {})
    n = torch.get_num_threads()
    if not side or device.type != "cpu" or d.on or n < 2:
        return {}
    return {**{p: n - n // 2 for p in side}, **{p: n // 2 for ps in side.values() for p in ps}}


def phase_seed(hp, rank, i):
    """The seed of the i-th phase's training noise: its own, whatever trained before it."""
    return hp["seed"] * 1000 + rank + 17 * i


def build_model(name, config, seed, device, args):
    """The model of a run, initialised from `seed` (the same weights in every process)."""
    torch.manual_seed(seed)
    try:
        model = model_class(name)(config)
    except Exception as e:  # the config came from the user's flags: any failure is theirs to fix
        raise UsageError(f"invalid {name} config: {e}")
    model.to(device)
    if args.channels_last:  # 4-d weights only: each convolution then computes and returns
        model.to(memory_format=torch.channels_last)  # channels_last; the data and noise stay NCHW
    return model


class Beside:
    """A second process that trains `phases` of the run while this one trains another phase.

    It writes only its phases' checkpoints and log lines; this process holds the run's lock. Ctrl-C
    reaches this process, which stops the other with SIGTERM: it saves its checkpoint as Ctrl-C
    would and reports back. It stops by itself when this process dies."""

    def __init__(self, phases, name, run, config, hparams, args, threads):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")  # a fork would copy this process's thread pools
        self.phases, self.running = tuple(phases), True
        self.resume = f"python train.py {name} --out {run} --resume"
        self.reply, end = ctx.Pipe(duplex=False)
        # not a daemon process: it may start data loader workers of its own (--workers)
        self.process = ctx.Process(target=train_beside, args=(
            self.phases, name, str(run), config, hparams, args, threads, os.getpid(), end))
        self.process.start()
        end.close()
        log(f"[{name}] {' and '.join(self.phases)}: in a second process ({self.process.pid}), "
            f"{threads} thread(s) each")

    def result(self):
        """Wait for it; returns (exit code, its one-line message)."""
        try:
            code, msg = self.reply.recv()
        except EOFError:  # it died without a word (kill -9, out of memory)
            self.process.join()
            code = 1
            msg = (f"error: the process training {', '.join(self.phases)} ended (exit code "
                   f"{self.process.exitcode}); "
                   f"the checkpoints it wrote are kept; continue with: {self.resume}")
        self.process.join()
        self.running = False
        return code, msg

    def wait(self):
        code, msg = self.result()
        if code:
            raise TrainingStopped(msg, code)

    def stop(self):
        """Ask it to stop (it saves its checkpoint first); returns its message."""
        self.process.terminate()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would leave it
        try:  # writing into the run without this process's lock
            return self.result()[1]
        finally:
            signal.signal(signal.SIGINT, handler)


def train_beside(phases, name, run, config, hparams, args, threads, parent, reply):
    """What the process of `Beside` runs: sends back (exit code, one-line message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the first process's to handle

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    def watch():  # the first process gone (kill -9): save and stop, as on Ctrl-C
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    import threading
    threading.Thread(target=watch, daemon=True).start()
    torch.set_num_threads(threads)
    code, msg = 0, ""
    try:
        device, first = torch.device("cpu"), next(iter(hparams.values()))
        datasets = {"train": make_dataset(first["data"], "train", getattr(config, "image_size", 32))}
        model = build_model(name, config, first["seed"], device, args)
        for phase in phases:
            torch.manual_seed(phase_seed(hparams[phase], 0, phases_of(model).index(phase)))
            train_phase(model, name, phase, Path(run), config, hparams[phase], datasets, device,
                        Dist(), args)
    except TrainingStopped as e:
        code, msg = e.code, str(e)
    except KeyboardInterrupt:
        code, msg = 130, f"interrupted before training {', '.join(phases)}"
    except (UsageError, ValueError) as e:
        code, msg = 2, f"error: {e}"
    except OSError as e:
        code, msg = 1, f"error: {one_line(e)}"
    except BaseException as e:  # a bug: its traceback, then the line
        import traceback
        traceback.print_exc()
        code, msg = 1, f"error: training {', '.join(phases)} failed: {one_line(e)}"
    try:
        reply.send((code, msg))
    except OSError:  # the first process is gone
        pass


# --- runs ---

def load_phase_weights(model, run, phase, ema=True, device="cpu"):
    """Load one phase's checkpoint from a run directory into the model; returns the checkpoint."""
    path = Path(run) / ckpt_name(model, phase)
    key = "ema" if ema else "state_dict"
    ck = load_checkpoint(path, device, need=("model", "config", key))
    load_weights(phase_module(model, phase), ck[key], path, key)
    return ck


def load_weights(module, state, path, key):
    """module.load_state_dict, with weights that do not fit the model as one line naming the file."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: its {key!r} weights do not fit the model "
                         f"({' '.join(str(e).split())[:160]})")


def load_resume_checkpoint(path, device, name, phase, module, ema, opt):
    """The checkpoint that --resume continues from, loaded into the module, its EMA and the
    optimizer; a file that belongs to another model or phase (a renamed file) is refused."""
    ck = load_checkpoint(path, device, need=("model", "config", "state_dict", "ema", "optimizer",
                                             "step", "rng"))
    if ck["model"] != name or ck.get("phase", phase) != phase:
        raise UsageError(f"{path} holds phase {ck.get('phase', 'main')} of a {ck['model']} run, "
                         f"not phase {phase} of {name}; was it renamed? Put it back, or start a "
                         "new run with --out")
    load_weights(module, ck["state_dict"], path, "state_dict")
    load_weights(ema.module, ck["ema"], path, "ema")
    load_weights(opt, ck["optimizer"], path, "optimizer")
    return ck


def resolve_run(name, args, overrides):
    """Work out the run directory, config and per-phase hyperparameters; refuse to overwrite."""
    spec, cls = MODELS[name], model_class(name)
    run = Path(args.out or f"runs/{name}")
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {run} is a file, not a run directory; choose another --out")
    info_path = run / "run.json"
    existing = info_path.exists()
    phases = phases_of(cls)
    if args.phase is not None and args.phase not in phases:
        raise UsageError(f"--phase {args.phase}: {name} has phases {', '.join(phases)}")
    if args.resume and not existing:
        raise UsageError(f"--resume: there is no run in {run} to continue (no run.json); "
                         "drop --resume to start one")
    if not args.resume and run.exists() and any(p.name != ".lock" for p in run.iterdir()):
        new_phase = (args.phase and existing and not (run / ckpt_name(cls, args.phase)).exists())
        if not new_phase:
            raise UsageError(f"{run} already holds a run; continue it with --resume, "
                             "or choose a new directory with --out")
    explicit = {k: getattr(args, k) for k in ("data", "steps", "batch_size", "lr", "weight_decay",
                                               "warmup", "lr_schedule", "grad_clip", "ema_decay", "seed")
                if getattr(args, k) is not None}
    if existing:
        info = read_run_info(info_path, name)
        if info.get("model") != name:
            raise UsageError(f"{run} holds a {info.get('model')} run, not {name}; "
                             "choose another --out")
        if overrides:
            flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
            raise UsageError(f"{flags} would change the model of the run in {run}; "
                             "start a new run with --out")
        if args.preset and args.preset != info["preset"]:
            raise UsageError(f"--preset {args.preset}: the run in {run} uses preset "
                             f"{info['preset']}; start a new run with --out")
        preset = info["preset"]
        try:
            config = config_from_dict(type(presets(name)["tiny"]), info["config"])
        except (TypeError, ValueError) as e:
            raise UsageError(f"{info_path}: {e}; it is damaged: start a new run with --out")
        hparams = info["hparams"]
        for phase in phases:  # explicit flags win; --steps applies to the phase(s) being run
            if args.phase in (None, phase):
                hparams[phase].update(explicit)
    else:
        preset = args.preset or "tiny"
        if preset not in presets(name):
            raise UsageError(f"--preset {preset}: {name} has presets {', '.join(presets(name))}")
        config = apply_overrides(copy.deepcopy(presets(name)[preset]), overrides)
        # --steps, --lr ... apply to the phase being run (all without --phase); --data, --seed to all
        shared = {k: v for k, v in explicit.items() if k in ("data", "seed")}
        hparams = {ph: {**TRAIN_DEFAULTS, **spec.phases[ph], **(explicit if args.phase in (None, ph) else shared)}
                   for ph in phases}
    args.preset = preset
    return run, config, hparams, existing


def read_run_info(path, name):
    """run.json of an existing run, its entries checked (one line naming a damaged one)."""
    try:
        info = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})")
    except ValueError as e:  # not JSON, or not UTF-8
        raise UsageError(f"{path} is damaged (not JSON: {e}); start a new run with --out")
    if not isinstance(info, dict):
        raise UsageError(f"{path} is damaged (not a mapping); start a new run with --out")
    phases = phases_of(model_class(name)) if info.get("model") == name else ()
    for key, ok in (("model", lambda v: isinstance(v, str)), ("preset", lambda v: isinstance(v, str)),
                    ("config", lambda v: isinstance(v, dict)),
                    ("hparams", lambda v: isinstance(v, dict) and all(
                        isinstance(v.get(ph), dict) and HPARAMS <= set(v[ph]) for ph in phases))):
        if key not in info or not ok(info[key]):
            raise UsageError(f"{path} is damaged (its {key!r} entry is missing or of the wrong "
                             "type); start a new run with --out")
    return info


def run_training(args, overrides):
    name = args.model
    d, device = setup_dist(args.device)
    lock = info = beside = None
    try:
        if args.precision == "fp16" and device.type != "cuda":
            raise UsageError("--precision fp16 needs CUDA; on a CPU use bf16 or fp32")
        run, config, hparams, existing = resolve_run(name, args, overrides)
        for ph, hp in hparams.items():
            if hp["batch_size"] % d.world:
                raise UsageError(f"--batch-size {hp['batch_size']} must be divisible by the "
                                 f"{d.world} processes")
        data_spec = next(iter(hparams.values()))["data"]
        image_size = getattr(config, "image_size", 32)
        datasets = {s: make_dataset(data_spec, s, image_size) for s in ("train", "test")}
        if not existing and getattr(config, "num_classes", 0) and "num_classes" not in overrides:
            n_cls = getattr(datasets["train"], "num_classes", 0)
            if n_cls == 0:
                raise UsageError(f"{name} is class-conditional but --data {data_spec} has no "
                                 "labels; pass --num-classes 0")
            config = dataclasses.replace(config, num_classes=n_cls)
        model = build_model(name, config, next(iter(hparams.values()))["seed"], device, args)
        phases = phases_of(model)
        if args.phase:  # the phases before it must be done: check before anything is written
            for ph in phases[:phases.index(args.phase)]:
                if not (run / ckpt_name(model, ph)).exists():
                    raise UsageError(f"--phase {args.phase} needs phase {ph} first: "
                                     f"python train.py {name} --out {run} --phase {ph}")
        if d.on:  # every rank has checked the run directory before rank 0 writes into it: a slower
            dist.barrier()  # rank would otherwise find the new run.json and refuse ("already holds a run")
        error = None
        if d.rank == 0:
            info = None if existing else {"format": FORMAT_VERSION, "model": name, "preset": args.preset,
                                          "config": dataclasses.asdict(config), "hparams": hparams}
            try:
                lock = claim_run(run, info)
            except UsageError as e:
                error = str(e)
        agree(d, error)  # every rank stops when rank 0 cannot have the directory (also a barrier)
        todo = [args.phase] if args.phase else list(phases)
        threads, shares = torch.get_num_threads(), thread_shares(model, device, d)
        for i, phase in enumerate(phases):
            trained_beside = beside is not None and phase in beside.phases
            if phase not in todo or trained_beside:
                if trained_beside or phases.index(phase) < phases.index(todo[0]):
                    load_phase_weights(model, run, phase, device=device)
                continue
            side = model.parallel_phases.get(phase, ()) if shares else ()  # shares: it has them
            if side and not args.phase:
                beside = Beside(side, name, run, config, hparams, args, shares[side[0]])
            torch.set_num_threads(shares.get(phase, threads))
            torch.manual_seed(phase_seed(hparams[phase], d.rank, i))
            try:
                train_phase(model, name, phase, run, config, hparams[phase], datasets, device, d, args)
            finally:
                torch.set_num_threads(threads)
            if beside and beside.running:
                beside.wait()  # its phases are then loaded where the loop reaches them
        finished = all((run / ckpt_name(model, ph)).exists() for ph in phases)
        spec = MODELS[name]
        n = spec.sample_n if args.sample_n is None else args.sample_n
        if d.rank == 0 and finished and n > 0:
            try:
                write_samples(model, run, datasets["test"], device, args, config, spec.preview(config),
                              n, spec.prompted)
            except KeyboardInterrupt:
                raise TrainingStopped(f"interrupted while drawing the samples; the checkpoints in {run} "
                                      f"are complete: sample with python sample.py {run}", 130)
            except OSError as e:
                raise TrainingStopped(f"error: cannot write the samples into {run} ({e.strerror or e}); "
                                      f"the checkpoints are complete: sample with python sample.py {run}", 1)
        return 0
    except UsageError:
        if beside and beside.running:
            beside.stop()
        if info is not None and lock is not None and not any(run.glob("ckpt*.pt")):
            (run / "run.json").unlink(missing_ok=True)  # a new run that never saved a step (its
        raise  # config did not fit the data): the same --out can be used again
    except BaseException as e:  # stopped (Ctrl-C, a full disk, a bug): the process beside it saves
        if not (beside and beside.running):  # its checkpoint and stops too, before the lock goes
            raise
        said = beside.stop()
        if isinstance(e, (TrainingStopped, KeyboardInterrupt)):  # one line: both, then what to do
            first = str(e) if isinstance(e, TrainingStopped) else "interrupted (Ctrl-C)"
            first, then = (first.split("; continue with", 1) + [""])[:2]
            said, then2 = (said.split("; continue with", 1) + [""])[:2]
            then = then or then2
            raise TrainingStopped(f"{first} (beside it, {said})" + (f"; continue with{then}" if then else ""),
                                  getattr(e, "code", 130)) from None
        raise
    finally:
        if lock is not None:
            lock.close()  # releases the run directory
        if d.on:
            dist.destroy_process_group()


def claim_run(run, info=None):
    """Rank 0, before the first step: create the run directory, lock it for the life of this
    process, check that it can be written, and write run.json (`info`) for a new run. Returns the
    open lock file; closing it (or the process ending, even by kill -9) releases the lock.

    The lock keeps a second train.py out while this one lives (two --resume runs would otherwise
    write one temporary file and interleave log.jsonl); a directory that cannot be written (read-
    only, a full disk) is refused here, not at the first checkpoint. A failure leaves a new
    directory as it was: absent."""
    created, lock, lock_created, owned = not run.exists(), None, False, False
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock_created = not (run / ".lock").exists()
        lock = open(run / ".lock", "a")
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{run} is in use by another train.py (which holds {run / '.lock'}); "
                                 "wait until it ends, or stop it first")
        owned = True  # from here on, only this process changes the directory
        if info is not None and (run / "run.json").exists():  # a new run started there meanwhile
            raise UsageError(f"{run} already holds a run; continue it with --resume, "
                             "or choose a new directory with --out")
        probe = run / ".write_test"
        try:
            write_atomic(probe, lambda tmp: tmp.write_bytes(bytes(4096)))
        finally:
            probe.unlink(missing_ok=True)
        if info is not None:
            write_atomic(run / "run.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
        return lock
    except BaseException as e:
        if owned and info is not None:  # a new run that never started: leave no trace of it
            try:
                if lock_created:
                    (run / ".lock").unlink()
                if created:
                    run.rmdir()
            except OSError:
                pass
        if lock is not None:
            lock.close()
        if isinstance(e, OSError):
            raise UsageError(f"--out {run}: cannot write there ({e.strerror or e}); free some space, "
                             "or choose another --out")
        raise


def agree(d, error):
    """Rank 0's error (or None) raised on every rank, so that all stop together; a barrier too."""
    if d.on:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UsageError(error)


@torch.no_grad()
def write_samples(model, run, test_set, device, args, config, preview, n, prompted=False):
    """samples.png for generative models (model.sample(n, **preview)); reconstructions.png for
    autoencoders that cannot sample. `prompted`: draw the first n test captions (when the data has
    captions) and list them, in grid order, in samples.txt."""
    model.eval()
    torch.manual_seed(0)
    t0 = time.time()
    if hasattr(model, "sample"):
        captions = [test_set[i]["caption"] for i in range(min(n, len(test_set)))] if prompted else []
        if captions and all(captions):
            preview = {**preview, "prompt": (captions * n)[:n]}
        try:
            with autocast(device, args.precision):
                images = model.sample(n, **preview)
            save_grid(images, run / "samples.png")
            if "prompt" in preview:
                text = "".join(c + "\n" for c in preview["prompt"])
                write_atomic(run / "samples.txt", lambda tmp: tmp.write_text(text))
            how = "".join(f", {k} {v}" for k, v in preview.items() if k != "prompt")
            how += ", the first test captions (samples.txt)" if "prompt" in preview else ""
            log(f"wrote {run / 'samples.png'} ({n} samples{how} in {time.time() - t0:.1f}s)")
            return
        except NotImplementedError:
            pass
    if hasattr(model, "reconstruct"):
        batch = torch.utils.data.default_collate([test_set[i] for i in range(min(32, len(test_set)))])
        x = to_device(batch, device, getattr(config, "in_channels", 3))["image"]
        with autocast(device, args.precision):
            x_hat = model.reconstruct(x).float()
        save_grid(interleave(x, x_hat), run / "reconstructions.png", nrow=16)
        log(f"wrote {run / 'reconstructions.png'} (test images beside their reconstructions)")


def interleave(a, b):
    """(N, ...), (N, ...) -> (2N, ...) as a0, b0, a1, b1, ... (image beside reconstruction)."""
    return torch.stack([a, b.to(a.dtype)], 1).flatten(0, 1)


def main(argv=None):
    try:
        if signal.getsignal(signal.SIGINT) is interrupted_at_start:  # torch is loaded: Ctrl-C is
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt again
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        return run_training(args, overrides)
    except (UsageError, ValueError) as e:  # the model files raise ValueError for bad input or config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # outside the training loop, which saves a checkpoint itself
        print("interrupted (Ctrl-C); every checkpoint already written is kept", file=sys.stderr)
        return 130
    except OSError as e:  # a file that cannot be read or written, found outside the checks above
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e):
    """An OSError as 'FILE: reason'."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
