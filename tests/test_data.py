"""The data sets of data.py: the built-in shapes, folders, MNIST and CIFAR-10 files."""
import gzip
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import ShapesDataset


def test_shapes_items_and_determinism():
    ds = ShapesDataset(50, 32, seed=3)
    item = ds[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.equal(item["image"], ShapesDataset(50, 32, seed=3)[7]["image"])
    assert not torch.equal(item["image"], ShapesDataset(50, 32, seed=4)[7]["image"])
    assert 0 <= item["label"] < 18 and ShapesDataset.num_classes == 18
    with pytest.raises(IndexError):
        ds[50]


def test_shapes_pixels_are_black_or_the_pure_colour():
    for i in range(30):
        item = ShapesDataset(30, 32)[i]
        a = data.parse_caption(item["caption"])
        px = ((item["image"] + 1) * 127.5).round().long().reshape(3, -1).T
        colours = {tuple(p.tolist()) for p in px}
        assert colours == {(0, 0, 0), data.COLORS[a["color"]]}


def test_shapes_extra_sizes_draw_the_same_shape_natively():
    big, both = ShapesDataset(20, 128), ShapesDataset(20, 128, extra_sizes=(32,))
    for i in range(20):
        item = both[i]
        assert torch.equal(item["image"], big[i]["image"])  # asking for more leaves `image` alone
        x = item["image_32"]
        assert x.shape == (3, 32, 32)
        a = data.parse_caption(item["caption"])
        px = ((x + 1) * 127.5).round().long().reshape(3, -1).T  # hard edges: no antialiased greys
        assert {tuple(p.tolist()) for p in px} == {(0, 0, 0), data.COLORS[a["color"]]}
        mask_big, mask = (item["image"].max(0).values > 0), (x.max(0).values > 0)
        ys, xs = mask_big.nonzero(as_tuple=True)
        ys32, xs32 = mask.nonzero(as_tuple=True)
        for v, v32 in ((ys, ys32), (xs, xs32)):  # the same box, a quarter the size, within a pixel
            assert abs(v.min() / 4 - v32.min()) <= 1 and abs((v.max() + 1) / 4 - (v32.max() + 1)) <= 1


def test_to_device_carries_every_rendering():
    b = torch.utils.data.default_collate([ShapesDataset(4, 64, extra_sizes=(32,))[i] for i in range(2)])
    out = data.to_device(b, "cpu", in_channels=1)  # grayscale models get the channel mean of each
    assert out["image"].shape == (2, 1, 64, 64) and out["image_32"].shape == (2, 1, 32, 32)
    assert torch.equal(out["image_32"], b["image_32"].mean(1, keepdim=True))
    assert out["caption"] == list(b["caption"]) and torch.equal(out["label"], b["label"])


def test_folder_and_array_extra_sizes(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    item = data.FolderDataset(tmp_path, 32, extra_sizes=(16,))[0]
    assert item["image"].shape == (3, 32, 32) and item["image_16"].shape == (3, 16, 16)
    arr = data.ArrayDataset(np.zeros((2, 28, 28, 1), np.uint8), np.array([0, 1]), 32, str, 2, extra_sizes=(28,))
    assert arr[1]["image"].shape == (3, 32, 32) and arr[1]["image_28"].shape == (3, 28, 28)


def test_captions_and_labels_follow_the_factors():
    ds = ShapesDataset(300, 32, seed=0)
    seen = set()
    for i in range(len(ds)):
        item, a = ds[i], ds.attributes(i)
        assert item["caption"] == f"a {a['size']} {a['color']} {a['shape']} at the {a['position']}"
        assert item["label"] == data.SHAPES.index(a["shape"]) * 6 + list(data.COLORS).index(a["color"])
        cell = data.POSITIONS.index(a["position"])
        assert int(a["cy"] * 3 / 32) == cell // 3 and int(a["cx"] * 3 / 32) == cell % 3
        seen.add(a["position"])
    assert seen == set(data.POSITIONS)


def test_train_and_test_splits_differ():
    tr, te = ShapesDataset(200, 32, split="train"), ShapesDataset(200, 32, split="test")
    assert not any(torch.equal(tr[i]["image"], te[i]["image"]) for i in range(20))


@pytest.mark.parametrize("size", [32, 64])
def test_judge_reads_the_true_attributes(size):
    ds = ShapesDataset(400, size, split="test")
    batch = torch.stack([ds[i]["image"] for i in range(len(ds))])
    acc = data.caption_accuracy(batch, [ds[i]["caption"] for i in range(len(ds))])
    assert acc["all"] >= 0.97, acc
    # and it can fail: a wrong caption is judged wrong
    wrong = ["a small red circle at the center" if ds[i]["caption"] != "a small red circle at the center"
             else "a large blue square at the top" for i in range(len(ds))]
    assert data.caption_accuracy(batch, wrong)["all"] < 0.05


def test_judge_ignores_stray_pixels_and_handles_blank():
    ds = ShapesDataset(10, 32)
    x = ds[0]["image"].clone()
    x[:, 0, 31] = 1.0  # one white stray pixel far from the shape
    assert data.judge_shapes(x[None])[0] == data.parse_caption(ds[0]["caption"])
    assert data.judge_shapes(-torch.ones(1, 3, 32, 32)) == [None]


def test_folder_dataset(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    Image.new("L", (16, 16), 128).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = data.make_dataset(f"folder:{tmp_path}", "train", 32)
    assert len(ds) == 2 and any("skipped 1 unreadable" in str(x.message) for x in w)
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, 32, 32) and a["caption"] == "a red thing"
    assert torch.allclose(a["image"][0], torch.ones(32, 32)) and b["caption"] == ""


def test_folder_errors(tmp_path):
    with pytest.raises(data.UsageError, match="no such folder"):
        data.make_dataset(f"folder:{tmp_path}/nope", "train", 32)
    with pytest.raises(data.UsageError, match="no readable images"):
        data.make_dataset(f"folder:{tmp_path}", "train", 32)
    with pytest.raises(data.UsageError, match="unknown data set"):
        data.make_dataset("imagenet:/x", "train", 32)
    with pytest.raises(data.UsageError, match="give a path"):
        data.make_dataset("mnist", "train", 32)


def _idx(arr, path, gz):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    sfx = ".gz" if gz else ""
    _idx(imgs, tmp_path / f"t10k-images-idx3-ubyte{sfx}", gz)
    _idx(np.array([7, 1, 2, 3, 4]), tmp_path / f"t10k-labels-idx1-ubyte{sfx}", gz)
    ds = data.make_dataset(f"mnist:{tmp_path}", "test", 28)
    item = ds[0]
    assert len(ds) == 5 and item["label"] == 7 and item["caption"] == "the digit 7"
    expect = torch.from_numpy(imgs[0]).float() / 127.5 - 1
    assert torch.allclose(item["image"][1], expect)
    with pytest.raises(data.UsageError, match="train-images"):
        data.make_dataset(f"mnist:{tmp_path}", "train", 28)


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        d = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [3, 0, 1, 2]}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(d, f)
    ds = data.make_dataset(f"cifar10:{tmp_path}", "train", 32)
    assert len(ds) == 20 and ds[0]["caption"] == "a photo of a cat"
    assert ds[1]["caption"] == "a photo of an airplane" and ds[0]["image"].shape == (3, 32, 32)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str (BINSTRING) and numpy.core as the module name, the
    way CIFAR-10's batches were pickled (by Python 2's cPickle, protocol 2)."""

    def save_bytes(self, obj):
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                    else pickle.BINSTRING + len(obj).to_bytes(4, "little")) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_str}


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar10_batches_of_every_pickle_protocol(tmp_path, protocol):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
    d = {b"batch_label": b"testing batch 1 of 1", b"data": x, b"labels": [9, 0, 4],
         b"filenames": [b"a.png", b"b.png", b"c.png"]}
    with open(tmp_path / "test_batch", "wb") as f:
        if protocol == "py2":
            _Py2Pickler(f, 2).dump(d)
        else:
            pickle.dump(d, f, protocol)
    if protocol == "py2":
        assert b"cnumpy.core.multiarray\n_reconstruct" in (tmp_path / "test_batch").read_bytes()
    ds = data.make_dataset(f"cifar10:{tmp_path}", "test", 32)
    assert len(ds) == 3 and ds[0]["caption"] == "a photo of a truck"
    assert torch.equal(ds[1]["image"], torch.from_numpy(x[1].reshape(3, 32, 32)).float() / 127.5 - 1)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content, message", [
    (lambda m: {b"data": _Payload(m), b"labels": []}, "asks to call posix.system"),
    (lambda m: {b"data": np.array([_Payload(m)], dtype=object), b"labels": []}, "dtype object"),
    (lambda m: {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "dtype float32"),
    (lambda m: {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "no uint8 'data'"),
    (lambda m: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "class numbers"),
    (lambda m: [1, 2], "no uint8 'data'"),
])
def test_cifar10_refuses_what_its_batches_never_hold(tmp_path, content, message):
    """A pickle names the functions it calls: pickle.load would run os.system. Nothing but numpy's
    array rebuilders may be called, and the contents must be a batch."""
    marker = tmp_path / "ran"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(content(marker), f)
    with pytest.raises(data.UsageError, match=message):
        data.make_dataset(f"cifar10:{tmp_path}", "test", 32)
    assert not marker.exists()
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:40])
    with pytest.raises(data.UsageError, match="truncated|not a CIFAR-10"):
        data.make_dataset(f"cifar10:{tmp_path}", "test", 32)


def test_mnist_damaged_files_say_what_is_wrong(tmp_path):
    _idx(np.zeros((5, 28, 28)), tmp_path / "t10k-images-idx3-ubyte", False)
    _idx(np.zeros(4), tmp_path / "t10k-labels-idx1-ubyte", False)
    with pytest.raises(data.UsageError, match="expected N images"):
        data.make_dataset(f"mnist:{tmp_path}", "test", 28)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # was: "buffer is smaller than requested size"
    with pytest.raises(data.UsageError, match="truncated: its header promises 5 x 28 x 28"):
        data.make_dataset(f"mnist:{tmp_path}", "test", 28)
    images.write_bytes(images.read_bytes()[:10])
    with pytest.raises(data.UsageError, match="ends inside its header"):
        data.make_dataset(f"mnist:{tmp_path}", "test", 28)


@pytest.mark.parametrize("spec", ["shapes:-5", "shapes:0", "shapes:x"])
def test_shapes_size_must_be_positive(spec):  # was: "__len__() should return >= 0"
    with pytest.raises(data.UsageError, match="positive number of images"):
        data.make_dataset(spec, "train", 32)


def test_write_atomic_leaves_nothing_behind_a_failed_write(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        data.write_atomic(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    data.write_atomic(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_step_batches_resume_exactly():
    full = list(data.StepBatches(100, 8, seed=1, start=0, total=30))
    assert full[20:] == list(data.StepBatches(100, 8, seed=1, start=20, total=30))
    assert all(len(b) == 8 for b in full) and len(set(full[0]) | set(full[5])) == 16
    r0 = list(data.StepBatches(100, 8, 1, 0, 5, rank=0, world=2))
    r1 = list(data.StepBatches(100, 8, 1, 0, 5, rank=1, world=2))
    assert not set(sum(r0, [])) & set(sum(r1, []))
    with pytest.raises(data.UsageError, match="fewer than one batch"):
        data.StepBatches(4, 8, 0, 0, 1)


def test_background_level_reads_what_surrounds_the_shape():
    ds = ShapesDataset(8, 32, seed=3)
    x = torch.stack([ds[i]["image"] for i in range(8)])
    assert data.background_level(x) == 0.0  # drawn images: pure black around the shape
    shape = x.max(1, keepdim=True).values > 0
    grey = torch.where(shape, x, torch.full_like(x, -1 + 20 / 127.5))  # background at level 20
    assert abs(data.background_level(grey) - 20) < 0.01
    speck = x.clone()
    speck[:, :, 0, 0] = 1.0  # a white corner pixel apart from the shape: background, not shape
    assert abs(data.background_level(speck) - 255 / (32 * 32 - 1) * 1) < 2
    assert data.background_level(speck) > 0
