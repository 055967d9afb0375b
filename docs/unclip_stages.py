"""Where unCLIP loses the shape: the pixel judge (data.caption_accuracy) and the background level
(data.background_level) after each stage, on the first N shapes test captions.

    python docs/unclip_stages.py runs/unclip --n 192

Rows: the test images drawn at the decoder's side, passed through upsampler 1 and then 2 (what the
upsamplers do to perfect inputs); the decoder's own images from the prior's z_i (guidance 3), and
the same after each upsampler. For the decoder's images, also how often each requested size and
shape was judged as each shape.

    python docs/unclip_stages.py runs/unclip --upsampler2 COPY1 COPY2 ...

also passes both upsampler-1 outputs through the second upsampler of each COPY (a run whose
upsampler 2 was retrained, e.g. with another degradation or seed), each from the same noise: a
paired comparison of second upsamplers on the same inputs.

    python docs/unclip_stages.py runs/unclip --n 600 --steps2 1 3 5 10

also passes both upsampler-1 outputs through this run's second upsampler with each number of DDIM
steps, each from the same noise (the first upsampler-2 row uses the run's own number).
"""
import argparse
import sys
from collections import Counter

import torch

sys.path.insert(0, ".")
import data  # noqa: E402
import sample  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("run", help="an unclip run directory (or its ckpt_decoder.pt)")
p.add_argument("--n", type=int, default=192, help="test captions")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--upsampler2", nargs="+", default=[], metavar="RUN",
               help="runs whose second upsampler also upsamples the same upsampler-1 outputs")
p.add_argument("--steps2", nargs="+", type=int, default=[], metavar="K",
               help="also upsample the same upsampler-1 outputs with K DDIM steps of upsampler 2")
a = p.parse_args()
model, info = sample.load_model(a.run)
others = [(f" of {r}", sample.load_model(r)[0].upsampler2) for r in a.upsampler2]
torch.manual_seed(a.seed)
S = model.cfg.decoder.unet.image_size
ds = data.make_dataset("shapes", "test", model.cfg.image_size)
ds.extra_sizes = (S,)  # the same shapes drawn at the decoder's side
items = [ds[i] for i in range(a.n)]
captions = [it["caption"] for it in items]


def report(name, x):
    acc = data.caption_accuracy(x, captions)
    print(f"{name:34s} shape {100 * acc['shape']:5.1f}%  all four {100 * acc['all']:5.1f}%  "
          f"background {data.background_level(x):5.2f}", flush=True)


def upsample2(x, others):
    """x through this run's upsampler 2, each other run's, and this run's with each of --steps2,
    all from the same noise."""
    seed = torch.randint(2 ** 31, ()).item()
    rows = [("", model.upsampler2, None)] + [(name, up, None) for name, up in others]
    rows += [(f", {k} DDIM steps", model.upsampler2, k) for k in a.steps2]
    for name, up, steps in rows:
        torch.manual_seed(seed)
        report(f"  -> upsampler 2{name}", up.sample(x, steps))


with torch.no_grad():
    x = torch.stack([it[f"image_{S}"] for it in items])
    report(f"test images at {S}", x)
    x = model.upsampler1.sample(x)
    report("  -> upsampler 1", x)
    upsample2(x, others)
    z_i = model.sample_prior(captions)
    x = model.decode(z_i, captions, upsample=False)
    report(f"decoder at {S} (prior z_i)", x)
    judged = Counter((f"{data.parse_caption(c)['size']} {data.parse_caption(c)['shape']}",
                      (j or {}).get("shape")) for c, j in zip(captions, data.judge_shapes(x)))
    x = model.upsampler1.sample(x)
    report("  -> upsampler 1", x)
    upsample2(x, others)
print("decoder's images, requested -> judged:", ", ".join(f"{want} -> {got}: {k}"
                                                         for (want, got), k in sorted(judged.items(), key=str)))
