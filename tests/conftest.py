import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_train(*argv):
    """train.py's main in-process, with every argument as a string; returns the exit status."""
    import train
    return train.main([str(a) for a in argv])


def error_line(capsys):
    """The one line a CLI wrote to stderr for bad input (asserting there is exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def overfit_losses(loss_fn, params, steps, lr):
    """Adam on one fixed objective for `steps` steps; loss_fn() -> scalar tensor. Returns the loss
    of every step (each measured before that step's update)."""
    import torch
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
