"""fid.py: the Fréchet distance against closed forms, the FID Inception's layout and reference
output (pytorch-fid's), and the whole path from images to a number (issue 23)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fid

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "released"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent: the authors' layouts "
                                  "and reference outputs live outside the project")


def random_gaussian(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    # covariances sharing eigenvectors: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)


def test_frechet_distance_is_symmetric_and_zero_for_equal_statistics():
    mu1, s1 = random_gaussian(8, 1)
    mu2, s2 = random_gaussian(8, 2)
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0 and d12 == pytest.approx(d21, rel=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # a singular covariance (fewer samples than dimensions) stays finite and non-negative
    f = np.random.default_rng(3).normal(size=(5, 16))
    mu, sigma = fid.statistics(f)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_the_inception_has_pytorch_fids_keys():
    with torch.device("meta"):
        sd = fid.FIDInception().state_dict()
    assert len(sd) == 566 and sum(v.numel() for k, v in sd.items() if "running" not in k
                                  and "num_batches" not in k) == 23_850_960
    if SHARED.is_dir():
        spec = json.loads((SHARED / "fid" / "pytorch_fid_inception.json").read_text())["state_dict"]
        assert list(sd) == list(spec) and all(list(sd[k].shape) == v["shape"] for k, v in spec.items())


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A weight file of random FID Inception weights, in the older format (no BatchNorm counters)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "w.pth"
    torch.save({k: v for k, v in fid.FIDInception().state_dict().items() if "num_batches" not in k}, path)
    return str(path)


def test_fid_of_random_images_with_random_weights(tmp_path, random_weights):
    model = fid.load_inception(random_weights)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(3, 3, 16, 16, generator=g) * 255).round() / 255
    f1 = fid.features_of(model, images, batch_size=2)
    assert f1.shape == (3, 2048) and np.isfinite(f1).all() and f1.std() > 0
    # an image folder gives the same features (the same images, other batches): deterministic
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate((images * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    mu_ref, sigma_ref = fid.reference_statistics(str(tmp_path / "imgs"), model, batch_size=3)
    mu, sigma = fid.statistics(f1)
    assert np.allclose(mu, mu_ref, rtol=1e-4, atol=1e-6 * np.abs(mu).max())
    fid.save_statistics(tmp_path / "ref.npz", mu_ref, sigma_ref)
    d = fid.frechet_distance(mu, sigma, *fid.reference_statistics(str(tmp_path / "ref.npz"), model))
    assert np.isfinite(d) and d < 1e-2 * np.trace(sigma)


def test_inception_weight_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"pt_inception-2015-12-05-6726825d\.pth .*releases"):
        fid.load_inception(str(tmp_path / "absent.pth"))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        fid.load_inception(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="mu and sigma"):
        np.savez(tmp_path / "x.npz", a=np.zeros(2))
        fid.load_statistics(tmp_path / "x.npz")


@needs_shared
def test_inception_reproduces_pytorch_fid():
    d = torch.load(SHARED / "golden" / "pytorch_fid_inception.pt", weights_only=True)
    w = d["state_dict"]
    sd = {k: v.float() * w["scale"][k] for k, v in w["int8"].items()} | dict(w["other"])
    model = fid.FIDInception()
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in sd.items()})
    with torch.no_grad():
        out = model.eval()(d["inputs"]["images"])
    assert out.shape == (2, 2048) and (out - d["output"]).abs().max() < 2e-3


@needs_shared
def test_a_file_of_pytorch_fids_layout_loads_into_the_right_parameters(tmp_path):
    from test_released import cheap_state_dict, same
    spec = json.loads((SHARED / "fid" / "pytorch_fid_inception.json").read_text())["state_dict"]
    sd = cheap_state_dict(spec)
    torch.save(sd, tmp_path / fid.WEIGHTS_FILE)
    got = fid.load_inception(str(tmp_path / fid.WEIGHTS_FILE)).state_dict()
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and same(got[k], v), k
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing key 'Mixed_6b.branch7x7_2.conv.weight'"):
        fid.load_inception(str(tmp_path / "bad.pth"))


def test_sample_py_fid_against_the_test_split_of_a_run(tmp_path, capsys, random_weights):
    """`sample.py RUN --fid test:N`: a (fabricated, untrained) ddpm run of this project against its
    first N shapes test images; random Inception weights."""
    import dataclasses
    import ddpm
    import sample
    cfg = dataclasses.replace(ddpm.PRESETS["tiny"], image_size=16, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), T=50)
    sd = ddpm.DDPM(cfg).state_dict()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": "ddpm", "preset": "tiny", "config": dataclasses.asdict(cfg), "state_dict": sd, "ema": sd,
                "step": 0, "hparams": {"data": "shapes"}}, run / "ckpt.pt")
    assert sample.main([str(run), "--fid", "test:2", "--inception", random_weights,
                        "-n", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "against test:2" in out
