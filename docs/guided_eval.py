"""How often guided samples show the requested shapes class: judged by the trained noisy classifier
at t = 0 and by data.judge_shapes (shape and colour read from the pixels)."""
import argparse, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, ".")
import data, sample

p = argparse.ArgumentParser()
p.add_argument("adm"); p.add_argument("classifier")
p.add_argument("--n", type=int, default=72); p.add_argument("--steps", type=int, default=50)
p.add_argument("--settings", default="cfg0,cfg1,cfg3,clf0,clf1,clf10")
p.add_argument("--no-ema", action="store_true")
a = p.parse_args()
model, info = sample.load_model(a.adm, ema=not a.no_ema)
clf, cinfo = sample.load_model(a.classifier)
print(f"adm step {info['step']}, classifier step {cinfo['step']}", flush=True)
K = model.config.num_classes
out_dir = Path(a.adm) if Path(a.adm).is_dir() else Path(a.adm).parent  # the grids go beside the adm run
labels = torch.arange(a.n) % K
colors = list(data.COLORS)
results = {}
for s in a.settings.split(","):
    # cfgS: classifier-free scale S; clfS: classifier guidance of the unconditional model (null
    # label) toward `labels`; cfgS+clfC: both
    kw = dict(label=labels, steps=a.steps, progress=False, guidance_scale=0.0)
    for part in s.split("+"):
        if part.startswith("cfg"):
            kw["guidance_scale"] = float(part[3:])
        else:
            kw.update(classifier=clf, classifier_scale=float(part[3:]))
    torch.manual_seed(0)
    t0 = time.time()
    with torch.no_grad():
        x = model.sample(a.n, **kw)
        pred = clf(x, torch.zeros(a.n, dtype=torch.long)).argmax(-1)
    judged = data.judge_shapes(x)
    want = [(data.SHAPES[int(y) // len(colors)], colors[int(y) % len(colors)]) for y in labels]
    col = sum(j is not None and j["color"] == w[1] for j, w in zip(judged, want)) / a.n
    shp = sum(j is not None and j["shape"] == w[0] for j, w in zip(judged, want)) / a.n
    both = sum(j is not None and (j["shape"], j["color"]) == w for j, w in zip(judged, want)) / a.n
    r = dict(classifier_t0=(pred == labels).float().mean().item(), judge_class=both, judge_color=col,
             judge_shape=shp, seconds=round(time.time() - t0))
    results[s] = r
    print(s, json.dumps(r), flush=True)
    data.save_grid(x, out_dir / f"guided_eval_{s}.png", nrow=K)
