import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def sdpa_strides(monkeypatch):
    """Spy on F.scaled_dot_product_attention: a list that gets, per call, the last-dimension stride
    of q, k and v. The fused (flash) kernels need stride 1 there; otherwise SDPA falls back to the
    unfused maths, which under autocast runs in float32 (what a GPU profile showed)."""
    import torch.nn.functional as F
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen
