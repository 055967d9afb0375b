"""Sample, reconstruct or evaluate any trained model from its checkpoint alone.

    python sample.py CKPT_OR_RUN_DIR [-n N] [--out FILE.png [--force]] [--seed S] [--no-ema]
                     [--reconstruct] [--eval [N]] [--eval-captions N] [--variations IMAGE]
                     [--interpolate IMAGE IMAGE] [--text-diff IMAGE FROM TO] [model sampling flags]
                     [--fid REF --inception WEIGHTS] [--upsampler FILE] [--bpe-dir DIR]

The model is rebuilt from the config stored in the checkpoint (loaded with weights_only=True), and
the EMA weights are used unless --no-ema. Sampling flags (--steps, --eta, --temperature, --label,
--prompt, ...) are passed to `model.sample` only when given; a flag the model does not take is an
error. A missing, corrupt or unknown checkpoint is a one-line error with exit code 2. A file
given is the file sampled, whatever its name; --out never replaces an existing file unless
--force (and then only a PNG); Ctrl-C exits 130 and leaves no partial image.

The authors' released files load too (a plain state dict of a known layout, no run.json):
guided-diffusion's diffusion models and classifiers, GLIDE's base.pt (with --upsampler
upsample.pt and --bpe-dir), improved-diffusion's CIFAR-10 and ImageNet-64 models; they are sampled
with the diffusion they were trained with and the respacing of the authors' sampling scripts.
--fid REF scores -n samples against an image folder, an .npz of mu and sigma, or `test` (the run's
test split), with the FID Inception weights of --inception (see fid.py).
"""
import argparse
import dataclasses
import inspect
import math
import os
import signal
import sys
import time
from pathlib import Path


def interrupted_at_start(signum, frame):
    print("interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line and exit 130, no traceback
    signal.signal(signal.SIGINT, interrupted_at_start)

import numpy as np  # noqa: E402 (after the handler above)
import torch  # noqa: E402

import data  # noqa: E402
import ddpm  # noqa: E402
import fid  # noqa: E402
import guided  # noqa: E402
import train  # noqa: E402
from data import UsageError  # noqa: E402

# flag -> (keyword of model.sample / model.evaluate, type, help). Models take what they need.
SAMPLE_FLAGS = {
    "temperature": ("temperature", float, "sampling temperature (VAE, autoregressive priors)"),
    "steps": ("steps", int, "diffusion sampling steps (respaced); default: all"),
    "eta": ("eta", float, "DDIM eta; given, DDIM sampling replaces ancestral sampling"),
    "label": ("label", int, "class label for class-conditional models"),
    "prompt": ("prompt", str, "caption for text-conditional models"),
    "guidance-scale": ("guidance_scale", float, "classifier-free guidance scale"),
    "top-k": ("top_k", int, "autoregressive priors: sample from the k most likely tokens"),
    "top-p": ("top_p", float, "autoregressive priors: nucleus sampling, the smallest set holding p"),
    "candidates": ("candidates", int, "DALL-E: draw N images per caption, keep the best (--rerank)"),
    "rerank": ("rerank", str, "DALL-E: a CLIP run or checkpoint that scores the --candidates"),
    "classifier": ("classifier", str, "checkpoint or run of a noisy classifier for classifier guidance"),
    "classifier-scale": ("classifier_scale", float, "classifier guidance scale"),
    "prior-guidance-scale": ("prior_guidance_scale", float, "unCLIP: the diffusion prior's guidance scale"),
    "prior-steps": ("prior_steps", int, "unCLIP: the diffusion prior's sampling steps"),
    "upsample-steps": ("upsample_steps", int, "unCLIP: DDIM steps of each upsampler"),
}
# image-editing modes of text-to-image models: flag -> (method, number of images it takes)
EDIT_MODES = {"variations": ("variations", 1), "interpolate": ("interpolate", 2), "text_diff": ("text_diff", 1)}
EVAL_FLAGS = {
    "iwae-k": ("iwae_k", int, "VAE: importance samples of the IWAE bound in --eval"),
}
# flag -> (lowest, highest, lowest excluded) of its value, checked where it is parsed; a flag not
# listed takes any finite number
FLAG_RANGES = {
    "n": (1, None, False), "seed": (0, 2**32 - 1, False), "batch-size": (1, None, False),
    "eval": (1, None, False), "eval-captions": (1, None, False),
    "temperature": (0, None, True), "steps": (1, None, False), "eta": (0, 1, False),
    "label": (0, None, False), "top-k": (1, None, False), "top-p": (0, 1, True),
    "candidates": (1, None, False), "prior-steps": (1, None, False),
    "upsample-steps": (1, None, False), "iwae-k": (1, None, False),
}


def number(t, flag):
    """train.number with the range of FLAG_RANGES[flag]."""
    lo, hi, above = FLAG_RANGES.get(flag, (None, None, False))
    return train.number(t, flag, lo, hi, above)


def build_parser():
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a checkpoint file or a run directory")
    p.add_argument("-n", type=number(int, "n"), default=64, help="number of images")
    p.add_argument("--out", default=None, help="output PNG (default: a new file in the run dir)")
    p.add_argument("--force", action="store_true", help="let --out replace an existing PNG file")
    p.add_argument("--seed", type=number(int, "seed"), default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--batch-size", type=number(int, "batch-size"), default=256,
                   help="images per forward in --eval")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the diffusion networks (U-Nets) for the sampling loop; "
                        "on CUDA each step replays as a CUDA graph")
    p.add_argument("--channels-last", action="store_true",
                   help="convolution weights in channels_last memory format (faster with bf16 on CUDA)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reconstruct", action="store_true",
                      help="autoencoders: test images beside their reconstructions")
    mode.add_argument("--eval", nargs="?", const=-1, type=number(int, "eval"), default=None,
                      metavar="N",
                      help="evaluate on N test images (default: the whole test split)")
    mode.add_argument("--eval-captions", type=number(int, "eval-captions"), default=None,
                      metavar="N",
                      help="text-to-image models: sample N shapes test captions and report how "
                           "often the image shows each attribute, judged from the pixels")
    mode.add_argument("--variations", metavar="IMAGE", default=None,
                      help="unCLIP: -n variations of an image (section 3.1)")
    mode.add_argument("--interpolate", nargs=2, metavar="IMAGE", default=None,
                      help="unCLIP: -n images interpolating between two images (section 3.2)")
    mode.add_argument("--text-diff", nargs=3, metavar=("IMAGE", "FROM", "TO"), default=None,
                      help="unCLIP: -n edits of an image from caption FROM toward caption TO (section 3.3)")
    mode.add_argument("--fid", metavar="REF", default=None,
                      help="FID of -n samples against REF: an image folder, an .npz with mu and sigma, "
                           "or 'test' (the run's test split; test:N its first N images); needs --inception")
    p.add_argument("--inception", metavar="FILE", default=None,
                   help=f"--fid: the FID Inception weights, pytorch-fid's {fid.WEIGHTS_FILE}")
    p.add_argument("--upsampler", metavar="FILE", default=None,
                   help="GLIDE's released upsample.pt, run on the samples of its base.pt")
    p.add_argument("--bpe-dir", metavar="DIR", default=None,
                   help="GLIDE's released models: the folder of GPT-2's encoder.json and vocab.bpe (or .gz)")
    g = p.add_argument_group("model options (passed only when given)")
    for flag, (_, t, h) in {**SAMPLE_FLAGS, **EVAL_FLAGS}.items():
        g.add_argument("--" + flag, type=number(t, flag) if t in (int, float) else t, default=None,
                       help=h)
    return p


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def load_model(path, device="cpu", ema=True):
    """Checkpoint file or run directory -> (model, info). A run directory: every phase found in
    it. A file: that file (whatever its name) for its phase, and the checkpoints of the model's
    other phases beside it (ckpt_PHASE.pt)."""
    path = Path(path)
    key = "ema" if ema else "state_dict"
    if path.is_dir():
        files = sorted(path.glob("ckpt*.pt"))
        others = sorted(p.name for p in path.glob("*.pt"))
        if not files and others:
            raise UsageError(f"{path}: no checkpoint named ckpt*.pt in this directory, but it holds "
                             f"{', '.join(others)}: to sample from one, give the file itself "
                             f"(python sample.py {path / others[0]})")
        if not files:
            raise UsageError(f"{path}: no checkpoint (ckpt*.pt) in this directory; "
                             f"train one with python train.py MODEL --out {path}")
        first, given = files[0], None
    elif path.exists():
        first = given = path
    else:
        raise UsageError(f"{path}: no such checkpoint or run directory")
    ck = _load(first, device, key, released_ok=given is not None)
    if "model" not in ck:  # a plain state dict: one of the authors' released files
        return load_released(first, ck, device)
    name = ck.get("model")
    if name not in train.MODELS:
        raise UsageError(f"{first} holds a checkpoint of unknown model {name!r}; "
                         f"known: {', '.join(train.MODELS)}")
    cls = train.model_class(name)
    config_cls = type(train.presets(name)["tiny"])
    try:
        model = cls(train.config_from_dict(config_cls, ck["config"]))
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{first}: its config does not build a {name} model ({e})")
    run = first.parent
    phases = train.phases_of(cls)
    given_phase = ck.get("phase", phases[0]) if given else None
    if given and given_phase not in phases:
        raise UsageError(f"{given} holds phase {given_phase!r}; a {name} model has phases "
                         f"{', '.join(phases)}")
    loaded = []
    for phase in phases:
        if phase == given_phase:
            f, c = given, ck
        else:
            f = run / train.ckpt_name(cls, phase)
            if not f.exists():
                continue
            c = ck if f == first else _load(f, device, key)
            if c["model"] != name:
                raise UsageError(f"{f} is a checkpoint of a {c['model']} run, not of the {name} "
                                 f"run of {first}")
        train.load_weights(train.phase_module(model, phase), c[key], f, key)
        loaded.append(phase)
    model.to(device).eval()
    info = {"model": name, "run": run, "phases": loaded, "file": given,
            "missing": [ph for ph in phases if ph not in loaded],
            "config": ck["config"], "data": ck.get("hparams", {}).get("data", "shapes"),
            "step": ck.get("step")}
    return model, info


def missing_phase(model, info):
    """The UsageError for a model whose phases were not all found: say which file is missing and,
    when the run directory holds checkpoints under other names (renamed, copied), which."""
    run, name, missing = info["run"], info["model"], info["missing"][0]
    want = train.ckpt_name(model, missing)
    if info["file"]:
        return UsageError(f"{info['file']} holds phase {info['phases'][0]} of a {name} run; "
                          f"sampling also needs phase {missing}, whose checkpoint {want} is not "
                          f"beside it in {run}")
    names = {train.ckpt_name(model, ph) for ph in train.phases_of(model)}
    others = sorted(p.name for p in run.glob("*.pt") if p.name not in names)
    if others:
        return UsageError(f"{run} has no {want} (the checkpoint of phase {missing}), but holds "
                          f"{', '.join(others)}: to sample from one, give the file itself "
                          f"(python sample.py {run / others[0]})")
    return UsageError(f"{run} has not finished phase {missing}; train it with "
                      f"python train.py {name} --out {run} --resume")


def _load(f, device, key="ema", released_ok=False):
    """train.load_checkpoint: the same checks and messages as train.py --resume. released_ok: a
    plain state dict (perhaps an authors' released file) is returned as it is, for load_released
    to check its layout."""
    return train.load_checkpoint(f, device, need=("model", "config", key), plain_ok=released_ok)


# --- the authors' released checkpoints (issue 23) ---

# sampling settings of the authors' READMEs and notebooks, used where the flag is not given
RELEASED_DEFAULTS = {
    "adm": {"steps": 250},  # guided-diffusion README: --timestep_respacing 250
    "glide": {"steps": 100, "guidance_scale": 3.0, "upsample_steps": guided.glide_fast27(),
              "upsample_eta": 0.0, "upsample_temp": 0.997},  # glide-text2im's text2im notebook
}


def load_released(f, state_dict, device):
    """An authors' state dict (read by _load) -> (model, info): guided.load_openai or
    ddpm.load_openai by its layout; neither: a one-line error listing the known layouts."""
    for loader, name in ((guided.load_openai, None), (ddpm.load_openai, "ddpm")):
        try:
            model = loader(state_dict)
            break
        except ValueError as e:
            if "not a known layout" not in str(e):
                raise UsageError(f"{f}: {e}")
    else:
        known = [k.split()[0] for k in guided.OPENAI_FILES] + list(ddpm.OPENAI_FILES)
        raise UsageError(f"{f} is neither a checkpoint of this project nor a released file of a known "
                         f"layout; known: {', '.join(known)}")
    if name is None:
        name = "classifier" if isinstance(model, guided.NoisyClassifier) else (
            "glide" if model.config.xf_width else "adm")
    model.to(device).eval()
    info = {"model": name, "run": f.parent, "phases": [], "missing": [], "released": True,
            "config": dataclasses.asdict(model.config), "data": "", "step": None}
    return model, info


def released_glide(base, base_info, args, device):
    """GLIDE's base.pt [+ --upsampler upsample.pt] with --bpe-dir -> the model to sample, info."""
    if not args.bpe_dir:
        raise UsageError("GLIDE's released models read captions as GPT-2 BPE: pass --bpe-dir DIR, the folder "
                         "of encoder.json and vocab.bpe (glide-text2im ships them in glide_text2im/tokenizer)")
    try:
        guided.get_bpe(args.bpe_dir)
    except FileNotFoundError as e:
        raise UsageError(str(e))
    base.config.bpe_dir = args.bpe_dir
    if base.config.low_res_size:
        raise UsageError(f"{args.path} is GLIDE's upsampler; give base.pt first and upsample.pt with --upsampler")
    if not args.upsampler:
        return base, base_info
    up, info = load_model(args.upsampler, device)
    if not (info.get("released") and info["model"] == "glide" and up.config.low_res_size == base.config.image_size):
        raise UsageError(f"--upsampler {args.upsampler}: not GLIDE's released upsample.pt")
    up.config.bpe_dir = args.bpe_dir
    with torch.device("meta"):  # the pair; its own (empty) models are replaced by the loaded ones
        pair = guided.GLIDE(guided.GLIDEConfig(image_size=up.config.image_size, base=base.config,
                                               upsample=up.config))
    pair.base, pair.upsample = base, up
    return pair.eval(), {**base_info, "config": dataclasses.asdict(pair.config)}


def run_fid(args, model, info, kw, ac, device, t0):
    """--fid REF: FID between -n samples and REF (Heusel et al. 2017; fid.py)."""
    inception = fid.load_inception(args.inception, device)
    if args.fid == "test" or args.fid.startswith("test:"):
        if not info["data"]:
            raise UsageError("--fid test needs a run of this project (its test split); give an image folder "
                             "or an .npz for a released model")
        n_ref = int(args.fid[5:]) if args.fid[5:].isdigit() else -1
        ref = fid.statistics(fid.features_of(inception, (b["image"].float() * 0.5 + 0.5 for b in test_batches(
            info, info["config"], n_ref, args.batch_size, device))))
    else:
        ref = fid.reference_statistics(args.fid, inception, args.batch_size)
    feats = []
    with no_grad_mode(kw), ac:
        for i in range(0, args.n, args.batch_size):
            x = model.sample(min(args.batch_size, args.n - i), **kw).float()
            feats.append(fid.features_of(inception, x * 0.5 + 0.5))
    mu, sigma = fid.statistics(np.concatenate(feats))
    d = fid.frechet_distance(mu, sigma, *ref)
    print(f"FID {d:.2f}: {args.n} samples of {info['model']} against {args.fid} in {time.time() - t0:.1f}s")
    return 0


def model_kwargs(method, args, table, what):
    """The given flags of `table` as keyword arguments of `method`; unknown ones are errors."""
    params = inspect.signature(method).parameters
    out = {}
    for flag, (kw, _, _) in table.items():
        v = getattr(args, flag.replace("-", "_"))
        if v is None:
            continue
        if kw not in params:
            raise UsageError(f"--{flag} is not an option of this model's {what}")
        out[kw] = v
    return out


def compile_for_sampling(model, device):
    """torch.compile every U-Net of `model` in place (nn.Module.compile), for a sampling loop.

    A loop calls the network with the same shapes at every step, so the graphs are specialised
    (dynamic=False); on CUDA, mode 'reduce-overhead' records each as a CUDA graph and replays it,
    which removes the per-kernel launch cost of a step. Returns the number of networks compiled.
    """
    nets = [m for m in model.modules() if type(m).__name__ == "UNet"]
    for net in nets:
        net.compile(mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    return len(nets)


def no_grad_mode(kw):
    """torch.inference_mode for sampling, which also skips autograd's version counters; plain
    no_grad when classifier guidance needs a gradient inside the loop (torch.enable_grad)."""
    return torch.no_grad() if kw.get("classifier") is not None else torch.inference_mode()


def clip_scorer(path, device):
    """A CLIP checkpoint -> rerank(images, captions) -> cosine similarity of each pair (B,)."""
    clip_model, info = load_model(path, device)
    if not (hasattr(clip_model, "encode_image") and hasattr(clip_model, "encode_text")):
        raise UsageError(f"--rerank {path}: a {info['model']} run cannot score images against "
                         "captions; give a CLIP run")
    size = info["config"]["image_size"]

    def rerank(images, captions):
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images.float(), size=(size, size),
                                                     mode="bilinear", antialias=True)
        z_i = torch.nn.functional.normalize(clip_model.encode_image(images).float(), dim=-1)
        z_t = torch.nn.functional.normalize(clip_model.encode_text(list(captions)).float(), dim=-1)
        return (z_i * z_t).sum(-1)  # (B,)
    return rerank


def free_path(run, stem):
    """run/stem.png, or run/stem-1.png, ... : the first that does not exist yet."""
    p, k = run / f"{stem}.png", 1
    while p.exists():
        p, k = run / f"{stem}-{k}.png", k + 1
    return p


def test_batches(info, config, n, batch_size, device):
    ds = data.make_dataset(info["data"], "test", config.get("image_size", 32))
    n = len(ds) if n is None or n < 0 else min(n, len(ds))
    in_ch = config.get("in_channels", 3)
    for i in range(0, n, batch_size):
        items = [ds[j] for j in range(i, min(n, i + batch_size))]
        yield data.to_device(torch.utils.data.default_collate(items), device, in_ch)


def checked_out(args):
    """--out as a Path, checked before anything is loaded or sampled: a PNG name (an image is
    never written over a checkpoint or any other kind of file), in an existing directory, and new
    unless --force. None without --out (a new name in the run directory, free_path)."""
    if args.out is None:
        return None
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: sample.py writes PNG images; give a file name ending in .png")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name ending in .png")
    if out.exists() and not args.force:
        raise UsageError(f"--out {out} already exists; choose another name, or add --force to "
                         "replace it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: there is no directory {out.parent}")
    return out


def run(args):
    args.out = checked_out(args)
    d, device = train.setup_dist(args.device)
    model, info = load_model(args.path, device, ema=not args.no_ema)
    if args.fid is not None and not args.inception:  # before any sampling: say where the weights are
        fid.load_inception(None)
    if info.get("released") and info["model"] == "glide":
        model, info = released_glide(model, info, args, device)
    elif args.upsampler or args.bpe_dir:
        raise UsageError("--upsampler and --bpe-dir are for GLIDE's released base.pt")
    if info.get("released"):  # the authors' sampling settings where no flag is given
        for k, v in RELEASED_DEFAULTS.get(info["model"], {}).items():
            if not k.startswith("upsample_") and getattr(args, k) is None:
                setattr(args, k, v)
    torch.manual_seed(args.seed)
    run_dir = info["run"]
    ac = train.autocast(device, args.precision)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile and not compile_for_sampling(model, device):
        raise UsageError(f"--compile speeds up diffusion sampling; {info['model']} has no U-Net "
                         "to compile: leave the flag out")
    t0 = time.time()
    if args.eval is not None:
        if not hasattr(model, "evaluate"):
            raise UsageError(f"{info['model']} has no evaluation figures")
        kw = model_kwargs(model.evaluate, args, EVAL_FLAGS, "evaluation")
        sums, count = {}, 0
        with torch.inference_mode(), ac:
            for batch in test_batches(info, info["config"], args.eval, args.batch_size, device):
                out = model.evaluate(batch, **kw)
                b = len(batch["caption"])
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b
                count += b
        print(f"{info['model']} on {count} test images ({info['data']}):")
        for k, v in sums.items():
            print(f"  {k}: {v / count:.4f}")
        print(f"  time: {time.time() - t0:.1f}s")
        return 0
    if args.reconstruct:
        if not hasattr(model, "reconstruct"):
            raise UsageError(f"{info['model']} is not an autoencoder; --reconstruct needs one")
        batch = next(test_batches(info, info["config"], args.n, args.n, device))
        with torch.inference_mode(), ac:
            x_hat = model.reconstruct(batch["image"]).float()
        out = Path(args.out) if args.out else free_path(run_dir, f"recon_s{args.seed}")
        data.save_grid(train.interleave(batch["image"], x_hat), out,
                        nrow=2 * max(1, math.ceil(math.sqrt(args.n / 2))))
        print(f"wrote {out}: {len(x_hat)} test images beside their reconstructions")
        return 0
    if not hasattr(model, "sample"):
        raise UsageError(f"{info['model']} is not a generative model; it has no samples")
    if info["missing"]:
        raise missing_phase(model, info)
    for mode, (method_name, n_images) in EDIT_MODES.items():
        value = getattr(args, mode)
        if value is not None:
            return run_edit(args, model, info, mode, method_name, n_images, value, ac, t0)
    kw = model_kwargs(model.sample, args, SAMPLE_FLAGS, "sampling")
    if info.get("released") and info["model"] == "glide" and hasattr(model, "upsample"):
        kw.update({k: v for k, v in RELEASED_DEFAULTS["glide"].items() if k.startswith("upsample_")
                   and k not in kw})
    if "rerank" in kw:
        kw["rerank"] = clip_scorer(kw["rerank"], device)
    if "classifier" in kw:  # a second checkpoint: the classifier that guides sampling
        kw["classifier"], _ = load_model(kw["classifier"], device, ema=not args.no_ema)
    if args.fid is not None:
        return run_fid(args, model, info, kw, ac, device, t0)
    if args.eval_captions is not None:
        if "prompt" not in inspect.signature(model.sample).parameters:
            raise UsageError(f"--eval-captions needs a text-to-image model; {info['model']} "
                             "takes no --prompt")
        if not info["data"].startswith("shapes"):
            raise UsageError("--eval-captions judges shapes images; this model was trained on "
                             f"{info['data']}")
        ds = data.make_dataset("shapes", "test", info["config"].get("image_size", 32))
        captions = [ds[i]["caption"] for i in range(min(args.eval_captions, len(ds)))]
        images = []
        with no_grad_mode(kw), ac:
            for i in range(0, len(captions), args.batch_size):
                chunk = captions[i:i + args.batch_size]
                images.append(model.sample(len(chunk), **{**kw, "prompt": chunk}).float().cpu())
        images = torch.cat(images)
        acc = data.caption_accuracy(images, captions)
        print(f"{info['model']}: {len(captions)} shapes test captions, judged from the pixels:")
        for k, v in acc.items():
            print(f"  {k}: {100 * v:.1f}%")
        ref = data.background_level(first_images(ds, len(captions)))
        print(f"  background: {data.background_level(images):.2f} (mean |pixel| outside the shape, "
              f"0-255; the test images: {ref:.2f})")
        out = Path(args.out) if args.out else free_path(run_dir, f"eval_captions_s{args.seed}")
        data.save_grid(images[:64], out)
        print(f"  time: {time.time() - t0:.1f}s; first 64 images in {out}")
        return 0
    try:
        with no_grad_mode(kw), ac:
            images = model.sample(args.n, **kw)
    except NotImplementedError as e:
        raise UsageError(str(e))
    except ValueError as e:
        raise UsageError(str(e))
    out = Path(args.out) if args.out else free_path(run_dir, f"sample_s{args.seed}")
    data.save_grid(images, out)
    print(f"wrote {out}: {args.n} samples in {time.time() - t0:.1f}s")
    return 0


def first_images(ds, n):
    """The first n images of a data set, (n, C, S, S)."""
    return torch.stack([ds[i]["image"] for i in range(n)])


def load_image(path, size):
    """An image file -> (3, size, size) in [-1, 1], centre-cropped and resized."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return data.pil_to_tensor(data.center_crop_resize(im, size))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read this image ({type(e).__name__}); give a PNG or JPEG file")


def run_edit(args, model, info, mode, method_name, n_images, value, ac, t0):
    """--variations / --interpolate / --text-diff: the inputs first, then the -n results."""
    flag = "--" + mode.replace("_", "-")
    method = getattr(model, method_name, None)
    if method is None:
        raise UsageError(f"{flag}: {info['model']} has no {method_name}; it needs a text-to-image model "
                         "(unclip)")
    value = [value] if isinstance(value, str) else list(value)
    size = info["config"].get("image_size", 32)
    images = [load_image(v, size).to(model_device(model)) for v in value[:n_images]]
    kw = model_kwargs(method, args, SAMPLE_FLAGS, method_name)
    with torch.inference_mode(), ac:
        out = method(*images, *value[n_images:], args.n, **kw).float()
    grid = torch.cat([torch.stack(images).cpu(), out.cpu()])
    path = Path(args.out) if args.out else free_path(info["run"], f"{method_name}_s{args.seed}")
    data.save_grid(grid, path, nrow=len(grid) if len(grid) <= 12 else None)
    print(f"wrote {path}: the input image(s), then {args.n} results, in {time.time() - t0:.1f}s")
    return 0


def model_device(model):
    return next(model.parameters()).device


def main(argv=None):
    parser = build_parser()
    parser.__class__ = Parser
    try:
        if signal.getsignal(signal.SIGINT) is interrupted_at_start:  # torch is loaded: Ctrl-C is
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt again
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        return run(args)
    except (UsageError, ValueError) as e:  # the model files raise ValueError for bad input or config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # images are written whole or not at all (data.write_atomic)
        print("interrupted (Ctrl-C); no image was written", file=sys.stderr)
        return 130
    except OSError as e:  # an output that cannot be written, an input that cannot be read
        print(f"error: {train.one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
