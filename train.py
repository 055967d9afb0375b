"""Train any model of the project.

    python train.py MODEL [--preset NAME] [--data SPEC] [--steps N] [--batch-size N] [--lr X]
                          [--out DIR] [--device auto|cpu|cuda] [--precision fp32|bf16|fp16]
                          [--seed N] [--resume] [--phase NAME] [--CONFIG-FIELD VALUE ...]

Every field of the model's config dataclass is a flag (`--latent-dim 16`, `--channels 32,64`).
`python train.py MODEL --help` lists them. Several GPUs: `torchrun --nproc_per_node N train.py ...`.

The loop is generic: it calls `model.loss(batch)` (STYLE.md rule 8) and, at the end,
`model.sample(n)`; models that train in phases (an autoencoder, then its prior) declare `phases`
and get one checkpoint per phase in the run directory. INTERFACE.md gives the whole contract.

This file also holds the data sets every model shares: the built-in captioned `shapes`, a folder of
images, MNIST and CIFAR-10; and the pixel-based judge of shapes images used by `sample.py`.
"""
import argparse
import copy
import dataclasses
import gzip
import importlib
import json
import math
import os
import pickle
import random
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw

FORMAT_VERSION = 1


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2."""


# --- data: the built-in shapes ---

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SIZES = {"small": (0.08, 0.13), "large": (0.19, 0.27)}  # half-extent / image side; disjoint ranges
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # the 3x3 grid cells in raster order


def shape_caption(shape, color, size, position):
    return f"a {size} {color} {shape} at the {position}"


def draw_shape(image_size, shape, color, half, cx, cy):
    """A black square image with one filled shape, in pure RGB (no anti-aliasing, so every pixel
    is black or exactly the named colour). Returns a PIL image."""
    img = Image.new("RGB", (image_size, image_size))
    d = ImageDraw.Draw(img)
    fill = COLORS[color]
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:  # an upward triangle filling the bounding box
        d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


class ShapesDataset(torch.utils.data.Dataset):
    """The built-in captioned data set: one filled shape on black, drawn with Pillow.

    Item i is a pure function of (seed, split, i), so the set has any size, needs no files, and
    train and test splits never share a stream. Each item is a dict: `image` (3, S, S) in [-1, 1],
    `caption` ("a large red circle at the top left") and `label` (shape x color, 18 classes), and
    `image_{s}` (3, s, s) for each side s in `extra_sizes`: the same shape drawn at side s.
    """
    num_classes = len(SHAPES) * len(COLORS)

    def __init__(self, n, image_size=32, seed=0, split="train", extra_sizes=()):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.n, self.image_size, self.seed, self.split = n, image_size, seed, split
        self.extra_sizes = tuple(extra_sizes)

    def __len__(self):
        return self.n

    def attributes(self, i):
        """The generating factors of item i: shape, color, size, position and the exact geometry."""
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{i}")  # str seeds hash stably
        S = self.image_size
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size, cell = rng.choice(list(SIZES)), rng.randrange(9)
        lo, hi = SIZES[size]
        half = rng.uniform(lo, hi) * S
        row, col = divmod(cell, 3)

        def centre(k):  # uniform in cell k, keeping the shape inside the image and off the edges
            a, b = max(k * S / 3 + 0.5, half), min((k + 1) * S / 3 - 0.5, S - 1 - half)
            return rng.uniform(a, max(a, b))

        cx, cy = centre(col), centre(row)
        return dict(shape=shape, color=color, size=size, position=POSITIONS[cell],
                    half=half, cx=cx, cy=cy)

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        a = self.attributes(i)
        img = draw_shape(self.image_size, a["shape"], a["color"], a["half"], a["cx"], a["cy"])
        label = SHAPES.index(a["shape"]) * len(COLORS) + list(COLORS).index(a["color"])
        item = {"image": pil_to_tensor(img),
                "caption": shape_caption(a["shape"], a["color"], a["size"], a["position"]),
                "label": label}
        for s in self.extra_sizes:  # the same shape drawn natively at side s: hard edges, not a shrunk copy
            r = s / self.image_size
            item[f"image_{s}"] = pil_to_tensor(draw_shape(s, a["shape"], a["color"], a["half"] * r,
                                                          a["cx"] * r, a["cy"] * r))
        return item


def pil_to_tensor(img):
    """PIL RGB -> (3, H, W) float in [-1, 1], contiguous (one float copy, scaled in place: the
    shapes data make 128 of these a CLIP step, and this is half the cost of the old three copies)."""
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, H, W)
    return torch.from_numpy(x).div_(127.5).sub_(1)


def parse_caption(caption):
    """'a large red circle at the top left' -> dict(size=, color=, shape=, position=), or None."""
    words = caption.strip().split()
    if len(words) < 6 or words[0] != "a" or words[4:6] != ["at", "the"]:
        return None
    size, color, shape, position = words[1], words[2], words[3], " ".join(words[6:])
    if size in SIZES and color in COLORS and shape in SHAPES and position in POSITIONS:
        return dict(size=size, color=color, shape=shape, position=position)
    return None


def judge_shapes(images):
    """Read the shape, color, size and position of each image from its pixels alone.

    images: (B, 3, S, S) in [-1, 1]. Foreground = pixels whose brightest channel is above mid-grey;
    of those, the largest 4-connected blob is the shape (stray pixels of a generated image are
    ignored). Its colour is the nearest pure colour to its mean; its fill ratio of the bounding box
    tells triangle (1/2) from circle (pi/4) from square (1); the box's side tells small from large;
    the box's centre gives the grid cell. Returns a list of dicts (None for an empty image).
    """
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy()  # (B, 3, S, S)
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    out = []
    for img in imgs:
        S = img.shape[-1]
        mask = img.max(0) > 127.5
        blob = _largest_component(mask)
        if blob is None:
            out.append(None)
            continue
        ys, xs = blob
        mean_rgb = img[:, ys, xs].mean(1)
        color = list(COLORS)[int(((palette - mean_rgb) ** 2).sum(1).argmin())]
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(ys) / (h * w)
        shape = "triangle" if fill < 0.66 else ("circle" if fill < 0.9 else "square")
        side = max(h, w) / S
        size = "small" if side < (SIZES["small"][1] + SIZES["large"][0]) else "large"
        cy, cx = (ys.max() + ys.min() + 1) / 2, (xs.max() + xs.min() + 1) / 2
        row, col = min(int(cy * 3 / S), 2), min(int(cx * 3 / S), 2)
        out.append(dict(shape=shape, color=color, size=size, position=POSITIONS[row * 3 + col]))
    return out


def _largest_component(mask):
    """Largest 4-connected True region of a 2-D bool array as (ys, xs) arrays, or None."""
    seen = np.zeros_like(mask)
    best = None
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if best is None or len(comp) > len(best):
            best = comp
    if best is None:
        return None
    arr = np.array(best)
    return arr[:, 0], arr[:, 1]


def caption_accuracy(images, captions):
    """Fraction of images whose judged color, shape, size, position (and all four) match."""
    keys = ("color", "shape", "size", "position")
    hits = {k: 0 for k in keys + ("all",)}
    for judged, cap in zip(judge_shapes(images), captions):
        want = parse_caption(cap)
        if want is None:
            raise ValueError(f"not a shapes caption: {cap!r}")
        ok = {k: judged is not None and judged[k] == want[k] for k in keys}
        for k in keys:
            hits[k] += ok[k]
        hits["all"] += all(ok.values())
    return {k: v / len(captions) for k, v in hits.items()}


# --- data: folders, MNIST, CIFAR-10 ---

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def center_crop_resize(img, size):
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC) if s != size else img


class FolderDataset(torch.utils.data.Dataset):
    """Images under a folder (recursively), each with an optional caption in `stem.txt` beside it.

    Unreadable files are skipped and counted in one warning. Every 20th file (in sorted order) is
    the test split when there are at least 20 images; smaller folders use all images for both.
    """
    num_classes = 0

    def __init__(self, root, image_size, split="train", extra_sizes=()):
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"--data folder:{root}: no such folder; give a folder of images")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        good, bad = [], 0
        for p in files:
            try:
                with Image.open(p) as im:
                    im.verify()
                good.append(p)
            except Exception:
                bad += 1
        if bad:
            warnings.warn(f"{root}: skipped {bad} unreadable image file(s) of {len(files)}")
        if not good:
            raise UsageError(f"--data folder:{root}: no readable images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
        if len(good) >= 20:
            good = [p for i, p in enumerate(good) if (i % 20 == 19) == (split == "test")]
        self.files, self.image_size, self.extra_sizes = good, image_size, tuple(extra_sizes)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for j in range(len(self.files)):  # a file that breaks after the check: take the next one
            p = self.files[(i + j) % len(self.files)]
            try:
                with Image.open(p) as im:
                    img = center_crop_resize(im, self.image_size)
                    extra = {f"image_{s}": pil_to_tensor(center_crop_resize(im, s)) for s in self.extra_sizes}
                break
            except Exception:
                if j == 0:
                    warnings.warn(f"{p}: unreadable, using the next image")
        else:
            raise RuntimeError("no image in the folder can be read any more")
        txt = p.with_suffix(".txt")
        caption = txt.read_text(errors="replace").strip() if txt.exists() else ""
        return {"image": pil_to_tensor(img), "caption": caption, "label": -1, **extra}


def _read_idx(path):
    """MNIST's IDX format: magic (0, 0, dtype, ndim), big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, 4).astype(int)
    return np.frombuffer(data, np.uint8, int(np.prod(dims)), 4 + 4 * ndim).reshape(dims)


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images (N, H, W, C) with integer labels and a caption template, resized on the fly."""

    def __init__(self, images, labels, image_size, caption_fn, num_classes, extra_sizes=()):
        self.images, self.labels = images, labels
        self.image_size, self.caption_fn, self.num_classes = image_size, caption_fn, num_classes
        self.extra_sizes = tuple(extra_sizes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        a = self.images[i]
        src = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")

        def at(s):
            return pil_to_tensor(src if src.size == (s, s) else src.resize((s, s), Image.BICUBIC))

        y = int(self.labels[i])
        return {"image": at(self.image_size), "caption": self.caption_fn(y), "label": y,
                **{f"image_{s}": at(s) for s in self.extra_sizes}}


def mnist_dataset(root, image_size, split):
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"

    def find(kind):
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte", ):
            for cand in (root / name, root / (name + ".gz"), root / name.replace("-idx", ".idx")):
                if cand.exists():
                    return cand
        raise UsageError(f"--data mnist:{root}: no {prefix}-{kind} IDX file there; "
                         "download MNIST's four files (gzipped or not) into that folder")

    images, labels = _read_idx(find("images")), _read_idx(find("labels"))
    return ArrayDataset(images[..., None], labels, image_size, lambda y: f"the digit {y}", 10)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def cifar10_dataset(root, image_size, split):
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise UsageError(f"--data cifar10:{root}: missing {', '.join(missing)}; give the folder of "
                         "CIFAR-10's python batches (cifar-10-batches-py)")
    xs, ys = [], []
    for n in names:
        with open(root / n, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(d[b"labels"])

    def caption(y):
        name = CIFAR10_CLASSES[y]
        return f"a photo of an {name}" if name[0] in "aeiou" else f"a photo of a {name}"

    return ArrayDataset(np.concatenate(xs), np.array(ys), image_size, caption, 10)


SHAPES_TRAIN, SHAPES_TEST = 50_000, 2_000


def make_dataset(spec, split, image_size, seed=0):
    """Data spec -> data set. Specs: shapes[:N] (the default), folder:PATH, mnist:PATH, cifar10:PATH.
    Every data set has `extra_sizes` (default none; train_phase sets it per phase): the sides at
    which each item also holds `image_{s}`, made from the source (shapes: drawn at that side)."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        n = SHAPES_TEST if split == "test" else SHAPES_TRAIN
        if arg:
            try:
                n = int(arg) if split == "train" else min(SHAPES_TEST, int(arg))
            except ValueError:
                raise UsageError(f"--data {spec}: shapes takes a number of images, e.g. shapes:10000")
        return ShapesDataset(n, image_size, seed=seed, split=split)
    if not arg and kind in ("folder", "mnist", "cifar10"):
        raise UsageError(f"--data {spec}: give a path, e.g. --data {kind}:/path/to/data")
    if kind == "folder":
        return FolderDataset(arg, image_size, split)
    if kind == "mnist":
        return mnist_dataset(arg, image_size, split)
    if kind == "cifar10":
        return cifar10_dataset(arg, image_size, split)
    raise UsageError(f"--data {spec}: unknown data set; use shapes, folder:PATH, mnist:PATH "
                     "or cifar10:PATH")


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps start..total-1: epoch e is a permutation seeded by (seed, e), split
    across ranks, so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, n, batch_size, seed, start, total, rank=0, world=1):
        self.per_rank = n // world
        self.per_epoch = self.per_rank // batch_size
        if self.per_epoch == 0:
            raise UsageError(f"the data set has {n} images, fewer than one batch of "
                             f"{batch_size * world}; lower --batch-size")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world

    def __len__(self):
        return max(0, self.total - self.start)

    def __iter__(self):
        step = self.start
        epoch, k = divmod(step, self.per_epoch)
        while step < self.total:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shard = torch.randperm(self.n, generator=g)[self.rank::self.world][:self.per_rank]
            for k in range(k, self.per_epoch):
                if step >= self.total:
                    return
                yield shard[k * self.bs:(k + 1) * self.bs].tolist()
                step += 1
            epoch, k = epoch + 1, 0


def to_device(batch, device, in_channels=3):
    """Collated batch -> device; grayscale models get the channel mean (of every image_* too)."""
    def image(x):
        x = x.to(device, non_blocking=True)
        return x.mean(1, keepdim=True) if in_channels == 1 and x.shape[1] == 3 else x

    return {"label": batch["label"].to(device, non_blocking=True), "caption": list(batch["caption"]),
            **{k: image(v) for k, v in batch.items() if k == "image" or k.startswith("image_")}}


def save_grid(images, path, nrow=None, pad=2):
    """(N, C, H, W) in [-1, 1] -> one PNG grid, written atomically."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    N, C, H, W = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(N)))
    rows = math.ceil(N / nrow)
    grid = torch.zeros(C, rows * (H + pad) + pad, nrow * (W + pad) + pad, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H,
             pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    write_atomic(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))


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
                    "decoder": dict(steps=1500, batch_size=16, lr=2e-3, lr_schedule="cosine"),
                    "upsampler1": dict(steps=400, batch_size=32, lr=1e-3),
                    "upsampler2": dict(steps=300, batch_size=32, lr=1e-3)}, sample_n=25, prompted=True),
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


def config_from_dict(cls, d):
    """Rebuild a (possibly nested) config dataclass from asdict() output; lists become tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = config_from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


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


def _typed(t, flag):
    def conv(text):
        try:
            return _parse_value(t, text)
        except ValueError:
            kind = getattr(t, "__name__", str(t))
            raise argparse.ArgumentTypeError(f"--{flag} takes {kind}, got {text!r}")
    return conv


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
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per phase")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (0.0)")
    g.add_argument("--warmup", type=int, default=None, help="linear lr warm-up steps (100)")
    g.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="after warm-up: constant lr, or cosine decay to 0 (CLIP; default per model)")
    g.add_argument("--grad-clip", type=float, default=None, help="gradient norm clip (1.0)")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights (0.999)")
    g.add_argument("--out", default=None, help="run directory (default runs/MODEL)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision; weights and optimizer stay fp32")
    g.add_argument("--seed", type=int, default=None, help="seed of data order and noise (0)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--phase", "--part", default=None, help="train only this phase (part)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--sample-n", type=int, default=None,
                   help="images in samples.png at the end (default 64; 25 for unclip)")
    g.add_argument("--workers", type=int, default=None, help="data loader workers (0 CPU, 4 CUDA)")
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
                c.add_argument("--" + flag, dest=dest, default=None, type=_typed(t, flag),
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
    with an EMA of the codebook buffers too 0.0050 (issue 26; docs/mutation_notes.md)."""

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


def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename:
    an interrupted write never leaves a half-written file or loses the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


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
    step = 0
    if path.exists():
        ck = torch.load(path, map_location=device, weights_only=True)
        module.load_state_dict(ck["state_dict"])
        ema.module.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
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
            save_atomic({"format": FORMAT_VERSION, "model": name, "preset": args.preset,
                         "config": dataclasses.asdict(cfg), "phase": phase,
                         "state_dict": module.state_dict(), "ema": ema.module.state_dict(),
                         "optimizer": opt.state_dict(), "step": step, "rng": states,
                         "args": {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items() if not k.startswith("cfg:")},
                         "hparams": hp}, path)

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
                    with open(run / "log.jsonl", "a") as f:
                        f.write(json.dumps({"phase": phase, "step": step, **vals,
                                            "images_per_s": ips, "time": now}) + "\n")
                sums, t_last, last_step = {}, now, step
            if step % args.save_every == 0 or step == total:
                if bool(nonfinite):
                    raise FloatingPointError
                checkpoint(step)
                last_good = step
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


# --- runs ---

def load_phase_weights(model, run, phase, ema=True, device="cpu"):
    """Load one phase's checkpoint from a run directory into the model; returns the checkpoint."""
    path = Path(run) / ckpt_name(model, phase)
    ck = torch.load(path, map_location=device, weights_only=True)
    phase_module(model, phase).load_state_dict(ck["ema" if ema else "state_dict"])
    return ck


def resolve_run(name, args, overrides):
    """Work out the run directory, config and per-phase hyperparameters; refuse to overwrite."""
    spec, cls = MODELS[name], model_class(name)
    run = Path(args.out or f"runs/{name}")
    info_path = run / "run.json"
    existing = info_path.exists()
    phases = phases_of(cls)
    if args.phase is not None and args.phase not in phases:
        raise UsageError(f"--phase {args.phase}: {name} has phases {', '.join(phases)}")
    if args.resume and not existing:
        raise UsageError(f"--resume: there is no run in {run} to continue (no run.json); "
                         "drop --resume to start one")
    if not args.resume and run.exists() and any(run.iterdir()):
        new_phase = (args.phase and existing and not (run / ckpt_name(cls, args.phase)).exists())
        if not new_phase:
            raise UsageError(f"{run} already holds a run; continue it with --resume, "
                             "or choose a new directory with --out")
    explicit = {k: getattr(args, k) for k in ("data", "steps", "batch_size", "lr", "weight_decay",
                                               "warmup", "lr_schedule", "grad_clip", "ema_decay", "seed")
                if getattr(args, k) is not None}
    if existing:
        info = json.loads(info_path.read_text())
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
        config = config_from_dict(type(presets(name)["tiny"]), info["config"])
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


def run_training(args, overrides):
    name = args.model
    d, device = setup_dist(args.device)
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
        torch.manual_seed(next(iter(hparams.values()))["seed"])  # the same init on every rank
        try:
            model = model_class(name)(config)
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid {name} config: {e}")
        model.to(device)
        if args.channels_last:  # 4-d weights only: each convolution then computes and returns
            model.to(memory_format=torch.channels_last)  # channels_last; the data and noise stay NCHW
        phases = phases_of(model)
        if args.phase:  # the phases before it must be done: check before anything is written
            for ph in phases[:phases.index(args.phase)]:
                if not (run / ckpt_name(model, ph)).exists():
                    raise UsageError(f"--phase {args.phase} needs phase {ph} first: "
                                     f"python train.py {name} --out {run} --phase {ph}")
        if d.on:  # every rank has checked the run directory before rank 0 writes into it: a slower
            dist.barrier()  # rank would otherwise find the new run.json and refuse ("already holds a run")
        if d.rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            if not existing:
                info = {"format": FORMAT_VERSION, "model": name, "preset": args.preset,
                        "config": dataclasses.asdict(config), "hparams": hparams}
                write_atomic(run / "run.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
        if d.on:
            dist.barrier()
        todo = [args.phase] if args.phase else list(phases)
        for i, phase in enumerate(phases):
            if phase not in todo:
                if phases.index(phase) < phases.index(todo[0]):
                    load_phase_weights(model, run, phase, device=device)
                continue
            hp = hparams[phase]
            torch.manual_seed(hp["seed"] * 1000 + d.rank + 17 * i)
            train_phase(model, name, phase, run, config, hp, datasets, device, d, args)
        finished = all((run / ckpt_name(model, ph)).exists() for ph in phases)
        spec = MODELS[name]
        n = spec.sample_n if args.sample_n is None else args.sample_n
        if d.rank == 0 and finished and n > 0:
            write_samples(model, run, datasets["test"], device, args, config, spec.preview(config), n,
                          spec.prompted)
        return 0
    finally:
        if d.on:
            dist.destroy_process_group()


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
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        return run_training(args, overrides)
    except (UsageError, ValueError) as e:  # the model files raise ValueError for bad input or config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
