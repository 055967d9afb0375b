"""Fréchet Inception Distance: the papers' sample-quality metric, with the FID Inception network.

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", 2017, arXiv:1706.08500 (section 3, the FID); Szegedy et al., "Rethinking the
Inception Architecture for Computer Vision", 2015, arXiv:1512.00567 (Inception-v3).

What is here:
- `FIDInception`: Inception-v3 as TensorFlow's FID code runs it (the graph of 2015-12-05 with
  1008 classes), written in plain torch. Its state-dict keys are those of pytorch-fid's weight file
  `pt_inception-2015-12-05-6726825d.pth`, key for key, so that file loads into it (`load_inception`);
  nothing is downloaded. Features are the 2048-d pool3 activations of images in [0, 1], resized
  bilinearly to 299 x 299 and mapped to [-1, 1] as pytorch-fid does.
- `frechet_distance`: d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))
  (Heusel et al. eq. 6), with the square-root term from a symmetric eigen decomposition (no scipy).
- statistics of an image folder, of sampled images, or read from an `.npz` with `mu` and `sigma`
  (what pytorch-fid's `--save-stats` and guided-diffusion's reference batches hold).

This is an evaluation module, not a model file: it may import numpy and PIL.

Why our own network rather than pytorch-fid as an optional dependency: pytorch-fid needs
torchvision, which pins torch versions and would be the project's only such dependency; the
network is ~150 lines of blocks whose names the weight file fixes, and a reference output built
with pytorch-fid (../shared/released/golden/pytorch_fid_inception.pt) checks ours against it.

The FID blocks differ from torchvision's Inception-v3 in three places, all in the pooling branch
(TensorFlow's graph): the average pools of the A, C and first E blocks leave the zero padding out
of the mean (count_include_pad=False), and the last E block max-pools instead.

Glossary (paper -> code):
  mu, Sigma   mean and covariance of pool3 features     mu, sigma
  d^2         the Fréchet distance of two Gaussians       frechet_distance(...)
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --- the FID Inception network ---


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    """3x3 stride-1 average pool whose mean leaves the zero padding out (TensorFlow's SAME pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """The 35x35 block: 1x1, 5x5, double 3x3 and pooled branches. (B, C, 35, 35) -> (B, 224 + pool, 35, 35)."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)                                  # (B, 224 + pool, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: strided 3x3, strided double 3x3, max pool. (B, C, 35, 35) -> (B, 480 + C, 17, 17)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)          # (B, 480 + C, H/2, W/2)


class InceptionC(nn.Module):
    """The 17x17 block with factorised 7x7 convolutions (1x7 then 7x1). (B, 768, 17, 17) -> same."""

    def __init__(self, c_in, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for i in range(1, 6):
            c = getattr(self, f"branch7x7dbl_{i}")(c)
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], 1)                                  # (B, 768, H, W)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8. (B, 768, 17, 17) -> (B, 1280, 8, 8)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)          # (B, 512 + C, H/2, W/2)


class InceptionE(nn.Module):
    """The 8x8 block with split 1x3 / 3x1 outputs. (B, C, 8, 8) -> (B, 2048, 8, 8).
    max_pool: the pooled branch max-pools (the FID graph's last block) instead of averaging."""

    def __init__(self, c_in, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)      # (B, 768, H, W)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)  # (B, 768, H, W)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)           # (B, 2048, H, W)


class FIDInception(nn.Module):
    """Inception-v3 of TensorFlow's FID graph; forward(images) -> pool3 features.

    images: (B, 3, H, W) in [0, 1], any size (resized bilinearly to 299 x 299, then 2x - 1).
    Returns (B, 2048) float32. `fc` (1008 classes) is kept only so the weight file loads strictly.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                      # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                   # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                   # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                          # ... (B, 2048, 8, 8)
        return x.mean((2, 3))                                              # (B, 2048)


def load_inception(path, device="cpu"):
    """pytorch-fid's weight file -> FIDInception in eval mode. Read with weights_only=True; every
    key and shape is checked (the BatchNorm num_batches_tracked counters may be absent, as in the
    file's older format); a missing file is a one-line error that says where to get it."""
    if not path or not os.path.isfile(path):
        where = f"at {path}" if path else "given"
        raise ValueError(f"no FID Inception weights {where}: download pytorch-fid's release asset "
                         f"{WEIGHTS_FILE} ({WEIGHTS_URL}) and pass its path")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}); it may be truncated") from None
    model = FIDInception()
    expected = model.state_dict()
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict; expected pytorch-fid's {WEIGHTS_FILE}")
    for k, v in sd.items():
        if k not in expected or not torch.is_tensor(v):
            raise ValueError(f"{path}: unexpected key {k!r} for pytorch-fid's {WEIGHTS_FILE}")
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: key {k!r} has shape {tuple(v.shape)}, pytorch-fid's {WEIGHTS_FILE} "
                             f"has {tuple(expected[k].shape)}")
    for k in expected:
        if k not in sd and not k.endswith("num_batches_tracked"):
            raise ValueError(f"{path}: missing key {k!r} of pytorch-fid's {WEIGHTS_FILE}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)
    return model.to(device).eval()


# --- statistics and the distance ---


def statistics(features):
    """(N, D) features -> (mu (D,), sigma (D, D)), float64 numpy; sigma is the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. eq. 6):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    sigma1 sigma2 is similar to the PSD matrix M = sigma1^(1/2) sigma2 sigma1^(1/2), so
    Tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(M)): two symmetric eigen decompositions, in
    float64. Symmetric in its arguments up to rounding; 0 for identical statistics.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@torch.no_grad()
def features_of(model, images, batch_size=50):
    """Pool3 features (N, 2048) float64 numpy of images: a tensor (N, 3, H, W) in [0, 1], or an
    iterable of such batches; the network sees at most batch_size images at a time (at 299 x 299
    its activations take about 20 MB per image)."""
    device = next(model.parameters()).device
    batches = [images] if torch.is_tensor(images) else images
    out = [model(chunk.to(device)).double().cpu().numpy() for b in batches for chunk in b.split(batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2048))


def folder_batches(folder, batch_size=50):
    """The images of a folder (sorted, searched recursively), RGB in [0, 1], in batches of tensors
    (B, 3, 299, 299): each is resized to 299 first, as the network would do anyway."""
    from PIL import Image
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
            try:
                with Image.open(f) as im:
                    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
            except OSError as e:
                raise ValueError(f"{f}: cannot read this image ({type(e).__name__})") from None
            x = x.permute(2, 0, 1)[None]                                   # (1, 3, H, W)
            batch.append(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
        yield torch.cat(batch)                                             # (B, 3, 299, 299)


def load_statistics(path):
    """An .npz with `mu` (D,) and `sigma` (D, D) -> (mu, sigma)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: an FID reference .npz needs arrays mu and sigma; "
                                 f"it has {', '.join(f.files)}")
            return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, EOFError, ValueError) as e:
        if isinstance(e, ValueError) and "mu and sigma" in str(e):
            raise
        raise ValueError(f"{path}: not a readable .npz ({type(e).__name__})") from None


def save_statistics(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma)


def reference_statistics(ref, model, batch_size=50):
    """REF: an .npz of statistics, or a folder of images (statistics computed with `model`)."""
    if str(ref).endswith(".npz"):
        return load_statistics(ref)
    if os.path.isdir(ref):
        return statistics(features_of(model, folder_batches(ref, batch_size)))
    raise ValueError(f"--fid {ref}: give an image folder or an .npz with mu and sigma")
