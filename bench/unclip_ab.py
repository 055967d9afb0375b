"""A/B of one unCLIP phase's training step on the CPU: fp32, channels-last weights, bf16 autocast.

    python bench/unclip_ab.py decoder                # the tiny preset's decoder, its batch of 16
    python bench/unclip_ab.py upsampler2 --rounds 7

The variants take turns, 10 steps each per round, in one process on one fixed batch of the shapes
data, so a host whose speed drifts (a shared VM) moves every variant alike. Prints each round's
milliseconds a step and the median of all rounds but the first (warm-up). Threads: torch's default
(OMP_NUM_THREADS). The step is the phase's loss, backward and train.adamw's AdamW.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from data import make_dataset, to_device  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=("clip", "prior", "decoder", "upsampler1", "upsampler2"))
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    config = train.presets("unclip")["tiny"]
    hp = {**train.TRAIN_DEFAULTS, **train.MODELS["unclip"].phases[args.phase]}
    torch.manual_seed(0)
    model = train.model_class("unclip")(config)
    data = make_dataset("shapes", "train", config.image_size)
    data.extra_sizes = tuple(model.extra_image_sizes(config, args.phase))
    batch = torch.utils.data.default_collate([data[i] for i in range(hp["batch_size"])])
    batch = to_device(batch, torch.device("cpu"))
    variants = {"fp32": (model, False),
                "channels-last": (copy.deepcopy(model).to(memory_format=torch.channels_last), False),
                "bf16": (copy.deepcopy(model), True)}
    opts = {k: train.adamw(list(m.phase_module(args.phase).parameters()), hp["lr"], hp["weight_decay"],
                           torch.device("cpu")) for k, (m, _) in variants.items()}
    ms = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, (m, bf16) in variants.items():
            t = time.perf_counter()
            for _ in range(10):
                torch.manual_seed(r)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = m.loss(batch, args.phase)["loss"]
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
            ms[k].append((time.perf_counter() - t) * 100)
    print(f"unclip/{args.phase}, batch {hp['batch_size']}, {torch.get_num_threads()} threads, ms a step")
    for k, v in ms.items():
        rest = sorted(v[1:])
        print(f"  {k:14s} median {rest[len(rest) // 2]:6.1f}   rounds " + " ".join(f"{x:.0f}" for x in v))


if __name__ == "__main__":
    main()
