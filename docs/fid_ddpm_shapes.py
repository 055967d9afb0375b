"""FID of a default `train.py ddpm` run against the shapes test split (issue 23).

    python docs/fid_ddpm_shapes.py --inception pt_inception-2015-12-05-6726825d.pth [--run runs/ddpm]
                                   [-n 1000] [--steps 100] [--ref-n 2000] [--device auto]

Trains the default run first when RUN holds no checkpoint, then runs
`python sample.py RUN --fid test --inception FILE -n N [--steps S]`: N samples (EMA weights) and
the whole shapes test split, both through the FID Inception (fid.py), and their Fréchet distance.
The Inception weights are pytorch-fid's release asset (nothing is downloaded here); without them
this stops at once with a one-line error that says where to get the file.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fid  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--inception", default=None, help=f"pytorch-fid's {fid.WEIGHTS_FILE} ({fid.WEIGHTS_URL})")
p.add_argument("--run", default="runs/ddpm", help="the ddpm run (trained with the defaults when empty)")
p.add_argument("-n", type=int, default=1000, help="number of samples")
p.add_argument("--steps", type=int, default=None, help="respaced sampling steps (default: all T)")
p.add_argument("--ref-n", type=int, default=None, help="reference: the first N test images (default: all)")
p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
a = p.parse_args()
try:
    fid.load_inception(a.inception)  # fail before minutes of training, not after
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
if not any(Path(a.run).glob("ckpt*.pt")):
    if train.main(["ddpm", "--out", a.run, "--device", a.device]) != 0:
        sys.exit(2)
ref = "test" if a.ref_n is None else f"test:{a.ref_n}"
argv = [a.run, "--fid", ref, "--inception", a.inception, "-n", str(a.n), "--device", a.device]
sys.exit(sample.main(argv + (["--steps", str(a.steps)] if a.steps else [])))
