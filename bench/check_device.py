"""Forward and backward of every registered model, every phase, under bf16 autocast, then a few
samples: the CUDA check of bench/gpu.sh (it runs on a CPU too: `--device cpu`).

On CUDA it also runs one whole training step as train.py does (bf16 loss, backward, gradient
clipping, fused AdamW, EMA) under torch.cuda.set_sync_debug_mode and lists every host-device
synchronisation the step makes, by file and line: train.py syncs only at log intervals, so any
line listed here is a stall in every step.

    python bench/check_device.py --device cuda [--models ddpm,vae]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402


def host_syncs(fn):
    """Run fn with CUDA's sync debug mode on -> ['file:line', ...] of each synchronising call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()  # outside the debug mode: not counted
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def training_step(model, phase, module, batch, device):
    """One step as train.py takes it, as a closure."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = train.adamw(params, 1e-4, 0.0, device)
    ema = train.EMA(module, 0.999)
    objective = train.Objective(model, phase)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(module, 1)
    return step


def check(name, device, n=4):
    torch.manual_seed(0)
    cfg = train.presets(name)["tiny"]
    model = train.model_class(name)(cfg).to(device)
    S, C = getattr(cfg, "image_size", 32), getattr(cfg, "in_channels", 3)
    ds = data.ShapesDataset(n, S)
    batch = data.to_device(torch.utils.data.default_collate([ds[i] for i in range(n)]), device, C)
    if getattr(cfg, "num_classes", 0) == 0:
        batch["label"] = torch.full_like(batch["label"], -1)
    report = []
    for phase in train.phases_of(model):
        module = train.phase_module(model, phase)
        model.requires_grad_(False).eval()
        module.requires_grad_(True).train()
        if hasattr(model, "prepare"):
            model.prepare(phase, [batch])
        if hasattr(model, "set_progress"):
            model.set_progress(0, 10, phase)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = train.Objective(model, phase)(batch)
        out["loss"].backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        ok = torch.isfinite(out["loss"]).item() and all(
            g is None or torch.isfinite(g).all().item() for g in grads)
        n_grad = sum(g is not None for g in grads)
        line = (f"{phase}: loss {out['loss'].item():.4f} {'finite' if ok else 'NOT FINITE'}, "
                f"{n_grad}/{len(grads)} grads, {1000 * (time.perf_counter() - t0):.0f} ms")
        if not ok:
            raise SystemExit(f"{name}/{phase}: non-finite loss or gradient under bf16")
        if device.type == "cuda":
            step = training_step(model, phase, module, batch, device)
            step()  # first call: lazy initialisation (cuBLAS handles, optimizer state) is not a step
            syncs = host_syncs(step)
            line += f", host syncs per step: {len(syncs)}" + (f" ({', '.join(sorted(set(syncs)))})" if syncs else "")
        report.append(line)
    model.eval()
    if hasattr(model, "sample"):
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                kw = {"steps": 5} if "steps" in __import__("inspect").signature(model.sample).parameters else {}
                x = model.sample(2, **kw)
            report.append(f"sample: {tuple(x.shape)} finite={torch.isfinite(x).all().item()} "
                          f"{1000 * (time.perf_counter() - t0):.0f} ms")
        except NotImplementedError:
            report.append("sample: none (not generative)")
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(train.MODELS))
    args = p.parse_args()
    device = torch.device(args.device)
    failed = []
    for name in args.models.split(","):
        try:
            for line in check(name, device):
                print(f"{name:8} {line}", flush=True)
        except Exception as e:  # report every model, then fail
            failed.append(name)
            print(f"{name:8} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
    print(f"{len(args.models.split(',')) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
