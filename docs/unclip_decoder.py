"""The unCLIP decoder's own images (at its side, before the upsamplers), judged by the pixel judge
(data.caption_accuracy) and averaged over several draws of noise: a comparison of decoders or of
sampling settings with less noise than one draw.

    python docs/unclip_decoder.py runs/unclip COPY ... --n 192 --draws 2 --guidance 1 3 5

For each run and guidance scale: the shape accuracy of each draw and their mean, the squares
judged square, all four attributes and the background level (data.background_level). Every run
decodes the same z_i (the first run's prior, on the first N test captions) from the same noise
per draw, so runs that share CLIP and the prior (copies whose decoder was retrained) are compared
on the same inputs.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
import data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("runs", nargs="+", help="unclip run directories (or their ckpt_decoder.pt)")
p.add_argument("--n", type=int, default=192, help="test captions")
p.add_argument("--draws", type=int, default=2, help="draws of noise per setting")
p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="guidance scales")
p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--no-ema", action="store_true",
               help="the decoders' live weights, not their EMA (CLIP and the prior keep theirs)")
a = p.parse_args()


def load(run):
    model = sample.load_model(run)[0]
    if a.no_ema:  # only the decoder's weights change: the prior's z_i stay those of its EMA
        path = Path(run) if Path(run).is_file() else Path(run) / "ckpt_decoder.pt"
        ck = train.load_checkpoint(path, need=("model", "config", "state_dict"))
        train.load_weights(model.decoder, ck["state_dict"], path, "state_dict")
    return model.eval()


models = [load(r) for r in a.runs]
ds = data.make_dataset("shapes", "test", models[0].cfg.image_size)
captions = [ds[i]["caption"] for i in range(a.n)]
squares = [data.parse_caption(c)["shape"] == "square" for c in captions]
torch.manual_seed(a.seed)
with torch.no_grad():
    z_i = models[0].sample_prior(captions)  # (n, D)

for run, model in zip(a.runs, models):
    for g in a.guidance:
        shape, right_squares, all4, bg = [], 0, 0.0, 0.0
        for d in range(a.draws):
            torch.manual_seed(a.seed + 1 + d)
            with torch.no_grad():
                x = model.decode(z_i, captions, steps=a.steps, guidance_scale=g, upsample=False)
            acc = data.caption_accuracy(x, captions)
            shape.append(100 * acc["shape"])
            all4 += 100 * acc["all"] / a.draws
            bg += data.background_level(x) / a.draws
            judged = data.judge_shapes(x)
            right_squares += sum(1 for s, j in zip(squares, judged) if s and (j or {}).get("shape") == "square")
        draws = " ".join(f"{s:.1f}" for s in shape)
        print(f"{run} guidance {g:g}: shape {sum(shape) / a.draws:5.1f}% (draws {draws}), squares "
              f"{right_squares}/{sum(squares) * a.draws}, all four {all4:5.1f}%, background {bg:4.2f}",
              flush=True)
