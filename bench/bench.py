"""Speed and memory of the project's models, beside diffusers' UNet2DModel, on the current device.

    python bench/bench.py                   # the default set for the device (CUDA if visible)
    python bench/bench.py --device cpu      # the CPU set: small batches, few steps
    python bench/bench.py --only ddpm-cifar10 --precisions bf16 --modes eager,compile
    python bench/bench.py --device cpu --only clip/tiny,unclip/tiny/decoder --precisions fp32

Prints one table row per case: training throughput (images/s, optimizer step included) and peak
memory at a batch size, in fp32 and bf16, eager and under torch.compile; then the latency of
25-step DDIM sampling (eta = 0). diffusers' UNet2DModel is built at the ddpm-cifar10
configuration (the same 35,746,307 parameters) and timed in the same process with the same loss,
optimizer and step count, when diffusers is installed (it is an optional dependency of this script
only). On CUDA it also measures the bf16 matmul throughput of the GPU and the model FLOP
utilisation (MFU) of the adm-imagenet64 training step, with FLOPs counted by
torch.utils.flop_counter. The models that read captions (CLIP, GLIDE, DALL-E, unCLIP's parts) are
timed too, on the shapes data's images and captions, through train.py's training objective (so
`compile` is what `train.py --compile` does), without a diffusers counterpart.

Each case runs in its own subprocess, so peak memory and compile caches do not leak between cases.
On CUDA the cases run in order of the issue's targets first (the ddpm-cifar10 bf16 pairs, then the
adm-imagenet64 MFU), so that `--budget` (seconds after which no new case starts) cuts the least
important rows. `ours-cl` is our model in channels_last memory format (`--channels-last`).
`--profile-dir` appends torch.profiler tables of our bf16 cases' training steps and DDIM loops.
Nothing in the project imports this folder.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DIFFUSERS_DDPM_CIFAR10 = dict(  # google/ddpm-cifar10-32, Ho et al.'s CIFAR-10 model in diffusers
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1,
    attention_head_dim=None)

# case -> (train.py model name, preset, phase, batch on CUDA, batch on CPU). The diffusion
# presets are compared with diffusers; the models that read captions train on the shapes data's
# images and captions (their own presets: CLIP ViT-B/32 and GLIDE's base on a GPU, the CPU-sized
# DALL-E and unCLIP parts, whose paper sizes do not fit one device with AdamW).
CASES = {
    "ddpm-cifar10": ("ddpm", "ddpm-cifar10", "main", 128, 8),
    "iddpm-cifar10": ("ddpm", "iddpm-cifar10", "main", 128, 8),
    "adm-imagenet64": ("adm", "adm-imagenet64", "main", 32, 2),
    "clip/vit-b-32": ("clip", "vit-b-32", "main", 256, 4),
    "glide/base": ("glide", "glide", "base", 32, 2),
    "clip/tiny": ("clip", "tiny", "main", 128, 128),
    "dalle/tiny/transformer": ("dalle", "tiny", "transformer", 32, 32),
    "unclip/tiny/prior": ("unclip", "tiny", "prior", 32, 32),
    "unclip/tiny/decoder": ("unclip", "tiny", "decoder", 16, 16),
}
DIFFUSION = ("ddpm-cifar10", "iddpm-cifar10", "adm-imagenet64")  # the cases with a DDIM sampler


def have_diffusers():
    try:
        import diffusers  # noqa: F401
        return True
    except ImportError:
        return False


# --- building the two implementations ---

class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel behind the same eps-prediction loss as ddpm.DDPM's L_simple."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel
        import ddpm
        self.net = UNet2DModel(**DIFFUSERS_DDPM_CIFAR10)
        self.register_buffer("alpha_bar", ddpm.GaussianDiffusion(
            ddpm.make_beta_schedule("linear", 1000)).alpha_bar.float(), persistent=False)
        self.image_size = 32

    def loss(self, batch):
        x_0 = batch["image"]
        t = torch.randint(0, 1000, (x_0.shape[0],), device=x_0.device)
        eps = torch.randn_like(x_0)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x_0 + (1 - ab).sqrt() * eps
        return {"loss": F.mse_loss(self.net(x_t, t).sample.float(), eps)}


def build(impl, case_key):
    """(model, image side, loss function of a batch) for one implementation of a case."""
    import train
    if impl == "diffusers":
        model = DiffusersEps()
        return model, 32, model.loss
    name, preset, phase = CASES[case_key][:3]
    cfg = train.presets(name)[preset]
    model = train.model_class(name)(cfg)
    if phase != "main":  # as train.py: only this phase's part trains
        model.requires_grad_(False)
        model.phase_module(phase).requires_grad_(True)
    return model, cfg.image_size, train.Objective(model, phase)


def make_batch(model, case_key, B, S, device, fmt):
    """B training images (and labels, captions): the shapes data for the models that read captions
    (their loss needs real ones), uniform noise for the diffusion presets (as diffusers' row)."""
    import data
    import train
    if case_key in DIFFUSION:
        x = (torch.rand(B, 3, S, S, device=device) * 2 - 1).contiguous(memory_format=fmt)
        return {"image": x, "label": torch.zeros(B, dtype=torch.long, device=device), "caption": [""] * B}
    name, preset, phase = CASES[case_key][:3]
    extra = getattr(model, "extra_image_sizes", lambda c, p: ())(train.presets(name)[preset], phase)
    shapes = data.ShapesDataset(B, S, seed=0, extra_sizes=tuple(extra))
    return data.to_device(torch.utils.data.default_collate([shapes[i] for i in range(B)]), device)


def case_name(case):
    return f"{case['impl']}/{case['preset']}/{case['precision']}/{case['mode']}"


def memory_format(impl):
    """ours-cl is our model with weights and inputs in channels_last."""
    return torch.channels_last if impl == "ours-cl" else torch.contiguous_format


def denoiser(impl, model):
    """(x_t, t) -> eps for the DDIM loop."""
    if impl == "diffusers":
        return lambda x, t: model.net(x, t).sample
    return lambda x, t: model.net(x, t)


# --- one case, in a subprocess ---

def run_case(case):
    import train
    device = torch.device(case["device"])
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as train.py on CUDA: fixed shapes, so autotune convs
    impl, preset, prec, mode, B = (case[k] for k in ("impl", "preset", "precision", "mode", "batch"))
    model, S, loss_fn = build(impl, preset)
    model.to(device).train()
    fmt = memory_format(impl)
    model.to(memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.adamw(params, 1e-4, 0.0, device)
    batch = make_batch(model, preset, B, S, device, fmt)
    eager_loss = loss_fn  # FLOPs are counted on the eager step
    if mode == "compile":
        loss_fn = torch.compile(loss_fn)
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")

    def step():
        with ac:
            loss = loss_fn(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {**case, "params": sum(p.numel() for p in model.parameters())}
    if case.get("train", True):
        out.update(time_training(case, eager_loss, step, batch, ac, sync, device, B))
    if case.get("sample_n"):
        out.update(time_ddim(impl, model, S, case, device, ac, sync))
    return out


def time_training(case, loss_fn, step, batch, ac, sync, device, B):
    for _ in range(case["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(case["steps"]):
        step()
    sync()
    dt = (time.perf_counter() - t0) / case["steps"]
    out = {"img_per_s": B / dt, "step_ms": 1000 * dt}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process
    if case.get("flops"):
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            with ac:
                loss = loss_fn(batch)["loss"]
            loss.backward()
        out["flops_per_step"] = fc.get_total_flops()
        out["achieved_tflops"] = out["flops_per_step"] / dt / 1e12
    if case.get("profile_dir"):
        profile_steps(case, step, sync, what=f"training step, batch {case['batch']}")
    return out


def profile_steps(case, step, sync, n=3, what="training steps"):
    """A torch.profiler table of n calls of step (training steps, or a whole sampling loop), by
    self device time: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case["device"] == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    table = None
    keys = ("self_device_time_total", "self_cuda_time_total") if case["device"] == "cuda" else ()
    for key in keys + ("self_cpu_time_total",):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=30)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    path = Path(case["profile_dir"]) / "profiles.txt"  # one file for all cases, appended
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"== {case_name(case)}, {n} x {what}\n{table}\n\n")


@torch.inference_mode()
def time_ddim(impl, model, S, case, device, ac, sync):
    """Latency of `sample_steps`-step DDIM (eta = 0) for sample_n images: the project's sampler
    for ours, diffusers' DDIMScheduler loop for diffusers."""
    model.eval()
    n, K = case["sample_n"], case["sample_steps"]
    if case["mode"] == "compile":
        if impl == "diffusers":
            model.net.compile(mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
        else:  # what sample.py --compile does
            import sample
            sample.compile_for_sampling(model, device)
    net = denoiser(impl, model)
    if impl == "diffusers":
        from diffusers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

        def sample():
            sched.set_timesteps(K)
            x = torch.randn(n, 3, S, S, device=device)
            for t in sched.timesteps:
                with ac:
                    eps = net(x, t.to(device).expand(n))
                x = sched.step(eps.float(), t, x, eta=0.0).prev_sample
            return x
    else:
        diffusion = model.diffusion
        fmt = memory_format(impl)

        class Net(torch.nn.Module):
            def forward(self, x, t):
                with ac:
                    return net(x.contiguous(memory_format=fmt), t).float()

        def sample():
            return diffusion.sample(Net(), (n, 3, S, S), steps=K, eta=0.0, device=device)
    sample()
    sync()
    times = []
    for _ in range(case["sample_reps"]):
        t0 = time.perf_counter()
        sample()
        sync()
        times.append(time.perf_counter() - t0)
    if case.get("profile_dir"):
        profile_steps(case, sample, sync, n=1, what=f"{K}-step DDIM of {n} images")
    return {"ddim_ms": 1000 * min(times)}


def matmul_tflops(device):
    """Dense bf16 matmul throughput of the GPU (8192^3), the yardstick of MFU."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (time.perf_counter() - t0) / 1e12


# --- the driver ---

def priority(case):
    """Run order on CUDA: the issue's targets first, so a time budget cuts the least needed rows."""
    p, i, pr, m = case["preset"], case["impl"], case["precision"], case["mode"]
    train = case.get("train", True)
    if p == "ddpm-cifar10" and pr == "bf16" and i != "ours-cl" and train:
        return 0 if m == "eager" else 1                   # the 1.2x pairs, DDIM 60 ms
    if p == "adm-imagenet64" and pr == "bf16" and m == "eager":
        return 2                                          # MFU
    if i == "ours-cl" and pr == "bf16" and m == "eager":
        return 3
    if p == "ddpm-cifar10" and pr == "fp32" and m == "eager":
        return 4
    if p == "adm-imagenet64" and pr == "bf16":
        return 5
    if not train:
        return 6                                          # diffusers' compiled DDIM loop
    if p not in DIFFUSION:
        return 9                                          # the models that read captions
    return 7 if p == "iddpm-cifar10" and pr == "bf16" else 8


def cases_for(args):
    cuda = args.device == "cuda"
    impls = ["ours"] + (["diffusers"] if have_diffusers() and not args.no_diffusers else [])
    impls += ["ours-cl"] if args.channels_last else []
    out = []
    for preset in args.only.split(",") if args.only else list(CASES):
        for impl in impls:
            if impl == "diffusers" and preset != "ddpm-cifar10":
                continue
            for prec in args.precisions.split(","):
                for mode in args.modes.split(","):
                    B = args.batch or CASES[preset][3 if cuda else 4]
                    case = dict(impl=impl, preset=preset, precision=prec, mode=mode, batch=B,
                                device=args.device, warmup=args.warmup or (5 if cuda else 1),
                                steps=args.steps or (20 if cuda else 3))
                    if cuda and preset == "adm-imagenet64" and prec == "bf16":
                        case["flops"] = True
                    if args.profile_dir and impl == "ours" and (prec == "bf16" or not cuda):
                        case["profile_dir"] = args.profile_dir
                    # sampling figures for the ddpm-cifar10 rows only: the issue's DDIM target
                    ddim = dict(sample_n=64 if cuda else 4, sample_steps=25, sample_reps=3 if cuda else 1)
                    if preset == "ddpm-cifar10":
                        if cuda and impl == "diffusers" and mode == "compile":
                            # its own case, after the rows the targets need (a second compile)
                            out.append({**case, "train": False, **ddim})
                        else:
                            case.update(ddim)
                    out.append(case)
    return sorted(out, key=priority) if cuda else out


def fmt_row(row):
    val = lambda k, f: format(row[k], f) if k in row else "-"
    mfu = f"{100 * row['mfu']:.0f}%" if "mfu" in row else "-"
    return (f"{row['impl']:9} {row['preset']:22} {row['precision']:5} {row['mode']:8} "
            f"{row['batch']:5d} {val('img_per_s', '.1f'):>8} {val('step_ms', '.1f'):>8} "
            f"{val('peak_mb', '.0f'):>8} {val('ddim_ms', '.1f'):>10} {mfu:>6}")


HEADER = (f"{'impl':9} {'preset':22} {'prec':5} {'mode':8} {'batch':>5} {'img/s':>8} "
          f"{'step ms':>8} {'peak MB':>8} {'ddim25 ms':>10} {'MFU':>6}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=None, help=f"comma-separated cases (default: all): {', '.join(CASES)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--channels-last", action="store_true",
                   help="also time our models in channels_last memory format (impl ours-cl)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new case starts (the rest are listed as skipped)")
    p.add_argument("--case-timeout", type=float, default=300, help="seconds per case")
    p.add_argument("--profile-dir", default=None,
                   help="append profiler tables of our training steps and DDIM loops (bf16 on "
                        "CUDA) to profiles.txt in this folder")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case as JSON
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    unknown = [k for k in (args.only or "").split(",") if k and k not in CASES]
    if unknown:
        sys.exit(f"error: unknown case {unknown[0]!r}; the cases are {', '.join(CASES)}")
    t_start = time.time()
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, diffusers: "
          f"{'yes' if have_diffusers() and not args.no_diffusers else 'not installed'}")
    peak = matmul_tflops(torch.device("cuda")) if args.device == "cuda" else None
    if peak:
        print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    rows, skipped = [], []
    print(HEADER)
    for case in cases_for(args):
        if args.budget is not None and time.time() - t_start > args.budget:
            skipped.append(case_name(case) + ("" if case.get("train", True) else " (ddim)"))
            continue
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                               capture_output=True, text=True, env={**os.environ},
                               timeout=args.case_timeout)
            line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
            err = (r.stderr.strip().splitlines() or ["?"])[-1][:100]
        except subprocess.TimeoutExpired:
            line, err = None, f"timed out after {args.case_timeout:.0f} s"
        if line is None:
            print(f"{case['impl']:9} {case['preset']:22} {case['precision']:5} {case['mode']:8} "
                  f"failed: {err}", flush=True)
            continue
        row = json.loads(line[7:])
        row["case_s"] = time.time() - t0
        if peak and "achieved_tflops" in row:
            row["mfu"] = row["achieved_tflops"] / peak
            row["matmul_tflops"] = peak
        rows.append(row)
        print(fmt_row(row) + f"   ({row['case_s']:.0f} s)", flush=True)
    if skipped:
        print(f"skipped (past the {args.budget:.0f} s budget): {', '.join(skipped)}")
    ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def ratios(rows):
    """ours / diffusers for every (precision, mode) measured for both."""
    by = {}
    for r in rows:
        if r["preset"] == "ddpm-cifar10":
            by.setdefault((r["impl"], r["precision"], r["mode"]), {}).update(r)
    for (impl, prec, mode), r in sorted(by.items()):
        d = by.get(("diffusers", prec, mode))
        if impl in ("ours", "ours-cl") and d:
            parts = []
            if "img_per_s" in r and "img_per_s" in d:
                parts.append(f"train {r['img_per_s'] / d['img_per_s']:.2f}x diffusers' images/s, "
                             f"peak memory {r['peak_mb'] / d['peak_mb']:.2f}x")
            if "ddim_ms" in r and "ddim_ms" in d:
                parts.append(f"DDIM latency {r['ddim_ms'] / d['ddim_ms']:.2f}x")
            if parts:
                print(f"{impl} ddpm-cifar10 {prec} {mode}: " + ", ".join(parts))
    for r in rows:
        if "mfu" in r:
            print(f"{r['impl']} {r['preset']} {r['precision']} {r['mode']}: "
                  f"{r['achieved_tflops']:.0f} TFLOP/s = {100 * r['mfu']:.0f}% of the measured "
                  f"bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s "
                  f"({r['flops_per_step'] / 1e12:.2f} TFLOP per step)")


if __name__ == "__main__":
    main()
