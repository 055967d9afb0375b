"""Draw the README's gallery from the default runs: one PNG per model in docs/images/.

    python train.py MODEL                  # for each model below (runs/MODEL)
    python docs/gallery.py [--runs runs] [--out docs/images] [--only ddpm,unclip] [--seed 0]

Every picture comes from a run's checkpoint through `sample.load_model`, so it shows what the code
draws as it is. Samples of the generative models (one column per class for the class-conditional
ones, one row per caption for the text-to-image ones) and test images beside their reconstructions
for the autoencoders, each image shown at 64x64. A model whose run directory is missing is skipped with a line. CLIP and the
noisy classifier draw nothing and have no picture.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

# The captions of the text-to-image pictures (a row each, in this order; the README's alt text
# lists them): every colour, shape, size and position appears at least once.
CAPTIONS = ("a large red circle at the top left", "a small blue triangle at the bottom right",
            "a large yellow square at the center", "a small green circle at the right",
            "a large magenta triangle at the top", "a small cyan square at the bottom left")
PER_ROW = 6  # samples per caption or class


def to_side(x, side):
    """(N, C, S, S) -> (N, C, side, side): smaller images enlarged by nearest neighbour (32-pixel
    images stay crisp), larger ones (unCLIP's 128) averaged down, so a picture stays small."""
    mode = "nearest" if x.shape[-1] < side else "area"
    return F.interpolate(x.float(), size=(side, side), mode=mode) if x.shape[-1] != side else x.float()


def save_small(images, path, nrow):
    """The grid as a PNG with an adaptive 256-colour palette: a fraction of the bytes of RGB for
    pictures of a few pure colours (the speckle of diffusion samples is what costs bytes)."""
    grid = data.grid_image(images, nrow, pad_value=96)  # grey lines between black images
    small = grid.quantize(colors=256)
    data.write_atomic(path, lambda f: small.save(f, format="PNG", optimize=True))


def reconstructions(model, info, n=16):
    batch = next(sample.test_batches(info, info["config"], n, n, "cpu"))
    x_hat = model.reconstruct(batch["image"]).float()
    return train.interleave(batch["image"], x_hat), 8  # original, reconstruction, ... 4 pairs a row


def class_grid(model, num_classes, **kw):
    """One column per class, PER_ROW // 2 rows: (rows * K, C, S, S) in raster order."""
    rows = [torch.cat([model.sample(1, label=k, **kw) for k in range(num_classes)]) for _ in range(3)]
    return torch.cat(rows), num_classes


def caption_rows(model, **kw):
    return torch.cat([model.sample(PER_ROW, prompt=c, **kw).float() for c in CAPTIONS]), PER_ROW


def draw(name, model, info):
    """The picture of one model: (images, images per row)."""
    if name in ("ae", "dae"):
        return reconstructions(model, info)
    if name == "vae":
        return model.sample(32, temperature=0.8), 8
    if name == "ddpm":
        return model.sample(32, steps=100), 8
    if name in ("vqvae", "vqvae2"):
        return class_grid(model, info["config"]["num_classes"])
    if name == "adm":
        return class_grid(model, info["config"]["num_classes"], guidance_scale=3.0)
    if name in ("glide", "dalle", "unclip"):
        return caption_rows(model)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder of the run directories")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    p.add_argument("--only", default=None, help="comma-separated model names")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(train.MODELS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run = Path(a.runs) / name
        if not (run / "run.json").exists():
            print(f"{name}: no run in {run}; train it with python train.py {name}")
            continue
        t0 = time.time()
        model, info = sample.load_model(run)
        torch.manual_seed(a.seed)
        with torch.inference_mode():
            picture = draw(name, model, info)
        if picture is None:
            print(f"{name}: draws nothing, no picture")
            continue
        images, nrow = picture
        images = to_side(images.cpu(), 64)
        path = out / f"{name}.png"
        save_small(images, path, nrow)
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB, {time.time() - t0:.0f} s, "
              f"step {info['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
