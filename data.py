"""The data every model of the project trains on, and the pictures it writes.

    from data import ShapesDataset, judge_shapes, make_dataset
    ds = ShapesDataset(1000, image_size=32)          # item: image (3, 32, 32) in [-1, 1], caption, label
    judge_shapes(images)                             # shape, colour, size, position read from pixels

- the built-in captioned `shapes` data set: one filled shape (circle, square, triangle) in a pure
  colour, small or large, in one cell of a 3x3 grid, on black, drawn with Pillow from a seed;
- `judge_shapes` and `caption_accuracy`: the pixel judge that reads those attributes back from an
  image, used by `sample.py --eval-captions` to score what a model drew;
- the readers of a folder of images, MNIST's IDX files and CIFAR-10's python batches, and
  `make_dataset`, which turns a `--data` spec into a data set;
- the batch helpers of the training loop (`StepBatches`, `to_device`) and `save_grid`, which
  writes a batch of images as one PNG.

train.py and sample.py import from here; the model files never do (STYLE.md rule 1).
"""
import gzip
import importlib
import math
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw



class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2."""


def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which is flushed to the disk (fsync) and
    then replaces `path` in one rename: an interrupted or failed write (Ctrl-C, a full disk, a
    power cut) never leaves a half-written file, nor loses the old one; the temporary file is
    removed when the write fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file itself
            e.filename = str(path)
        raise
    try:  # the rename itself reaches the disk with the directory
        _fsync(path.parent)
    except OSError:  # some file systems cannot fsync a directory; the data is safe already
        pass


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def background_level(images):
    """Mean absolute value, on the 0-255 scale, of the background of shapes images: every pixel
    outside the largest blob that `judge_shapes` takes for the shape. The data's backgrounds are
    pure black (0); speckle and tints of generated images raise it. images: (B, 3, S, S) in
    [-1, 1] -> a float (the mean over images)."""
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy()  # (B, 3, S, S)
    levels = []
    for img in imgs:
        outside = np.ones(img.shape[1:], bool)
        blob = _largest_component(img.max(0) > 127.5)
        if blob is not None:
            outside[blob] = False
        levels.append(float(img[:, outside].mean()) if outside.any() else 0.0)
    return float(np.mean(levels))


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
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip: BadGzipFile, or a gzip stream cut short
        raise UsageError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); "
                         "download MNIST's files again")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise UsageError(f"{path} is truncated: it ends inside its header; download it again")
    dims = np.frombuffer(data, ">u4", ndim, 4).astype(int)
    size = int(np.prod(dims))
    if len(data) - 4 - 4 * ndim < size:
        raise UsageError(f"{path} is truncated: its header promises {' x '.join(map(str, dims))} = {size} "
                         f"bytes but it holds {len(data) - 4 - 4 * ndim}; download it again")
    return np.frombuffer(data, np.uint8, size, 4 + 4 * ndim).reshape(dims)


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
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UsageError(f"--data mnist:{root}: the {prefix} files hold images of shape "
                         f"{images.shape} and labels of shape {labels.shape}; expected N images "
                         "(N, H, W) and N labels")
    return ArrayDataset(images[..., None], labels, image_size, lambda y: f"the digit {y}", 10)


def _numpy_global(name, *modules):
    """numpy's own function `name` from the first of `modules` that has it (numpy 2 renamed
    numpy.core to numpy._core; pickles name either)."""
    for m in modules:
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            pass
    raise pickle.UnpicklingError(f"numpy has no {name}")


def _plain_dtype(*args):
    """numpy.dtype for the integer dtypes of CIFAR-10's arrays only: an object dtype would let
    the pickle put any object in an array."""
    dt = np.dtype(*args)
    if dt.kind not in "uib":
        raise pickle.UnpicklingError(f"it holds an array of dtype {dt}, not of integers")
    return dt


def _reconstruct(cls, *args):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("it rebuilds an array of a class other than numpy.ndarray")
    return _numpy_global("_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray")(cls, *args)


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode, which Python 3 writes into protocol-2 pickles to rebuild bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it encodes text as {encoding}")
    return text.encode("latin1")


# every global a CIFAR-10 python batch may name: the files (pickled by Python 2) rebuild their
# numpy arrays with _reconstruct, ndarray and dtype; re-pickled copies may also use numpy's
# _frombuffer (protocol 5) or _codecs.encode (protocol 2 from Python 3)
_CIFAR10_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global(
        "_frombuffer", "numpy._core.numeric", "numpy.core.numeric"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global(
        "_frombuffer", "numpy._core.numeric", "numpy.core.numeric"),
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _Cifar10Unpickler(pickle.Unpickler):
    """pickle.Unpickler that calls nothing but numpy's array rebuilders. A pickle is a program:
    any function it names (os.system, ...) pickle.load calls, so a data file could run code.
    This one refuses every global CIFAR-10's batches do not use, before anything is called."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR10_GLOBALS:
            raise pickle.UnpicklingError(f"it asks to call {module}.{name}, which CIFAR-10's "
                                         "batches never do")
        return _CIFAR10_GLOBALS[module, name]()


def _read_cifar10_batch(path):
    """One of CIFAR-10's python batches -> (uint8 array (N, 3072), list of N labels in 0..9).
    Refuses, as a UsageError, a file that is not one, without running anything from it."""
    try:
        with open(path, "rb") as f:
            d = _Cifar10Unpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path} is not a CIFAR-10 python batch: {e}; nothing in it was run")
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})")
    except Exception as e:  # truncated (EOFError), garbage (ValueError, KeyError, ...)
        raise UsageError(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}); "
                         "it may be truncated: download CIFAR-10 again")
    x = d.get(b"data") if isinstance(d, dict) else None
    y = d.get(b"labels") if isinstance(d, dict) else None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise UsageError(f"{path} is not a CIFAR-10 python batch: no uint8 'data' array of "
                         "3072 values (32x32 RGB) per image")
    if not (isinstance(y, list) and len(y) == len(x)
            and all(isinstance(v, int) and 0 <= v < 10 for v in y)):
        raise UsageError(f"{path} is not a CIFAR-10 python batch: its 'labels' are not "
                         f"{len(x)} class numbers 0..9")
    return x, y


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
        x, y = _read_cifar10_batch(root / n)
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(y)

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
                n = int(arg)
            except ValueError:
                n = 0
            if n < 1:
                raise UsageError(f"--data {spec}: shapes takes a positive number of images, "
                                 "e.g. shapes:10000")
            n = n if split == "train" else min(SHAPES_TEST, n)
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


def grid_image(images, nrow=None, pad=2, pad_value=0):
    """(N, C, H, W) in [-1, 1] -> one RGB PIL image of the images in a grid, `pad` pixels of grey
    level `pad_value` (0-255) between them."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    N, C, H, W = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(N)))
    rows = math.ceil(N / nrow)
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value,
                      dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H,
             pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(images, path, nrow=None, pad=2, pad_value=0):
    """(N, C, H, W) in [-1, 1] -> one PNG grid (`grid_image`), written atomically."""
    image = grid_image(images, nrow, pad, pad_value)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
