"""MNIST IDX and CIFAR-10 pickle loaders on tiny files written in the real formats."""

import pickle

import numpy as np
import pytest
import torch
from data_formats import images, unstandardize, write_cifar, write_idx, write_mnist

from ggda.data.images import CIFAR10Files, MNISTFiles, read_idx
from ggda.data.loading import DataFileError


def _ids(x: torch.Tensor) -> np.ndarray:
    return unstandardize(x.numpy())[:, 0, 0, 2]


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arr = images(5, 1, 28, 0, seed=0)[:, 0]
    p = write_idx(tmp_path / "train-images-idx3-ubyte", arr, gz)
    out = read_idx(p, str(tmp_path), 3)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    p = write_idx(tmp_path / "labels", labels, gz)
    assert np.array_equal(read_idx(p, str(tmp_path), 1), labels)


@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_splits_pair_images_with_labels(tmp_path, sub, gz):
    raw = write_mnist(tmp_path / sub if sub else tmp_path, n_train=40, n_test=20, gz=gz)
    b = MNISTFiles(
        str(tmp_path), num_val=8, num_test=12, num_queries=5, split_seed=3, flatten=False
    ).load()
    assert b.x_train.shape == (32, 1, 28, 28) and b.x_val.shape == (8, 1, 28, 28)
    assert b.x_test.shape == (12, 1, 28, 28) and b.num_classes == 10
    tr, va, te = _ids(b.x_train), _ids(b.x_val), _ids(b.x_test)
    # Disjoint, from the right files, every image exact and paired with its own label.
    assert set(tr).isdisjoint(va) and len(set(tr) | set(va)) == 40
    assert set(te) <= set(range(100, 120)) and len(set(te)) == 12
    for x, y, ids, pool_x, pool_y, first in (
        (b.x_train, b.y_train, tr, raw["x_train"], raw["y_train"], 0),
        (b.x_val, b.y_val, va, raw["x_train"], raw["y_train"], 0),
        (b.x_test, b.y_test, te, raw["x_test"], raw["y_test"], 100),
    ):
        assert np.array_equal(unstandardize(x.numpy())[:, 0], pool_x[ids - first])
        assert np.array_equal(y.numpy(), pool_y[ids - first])
    # Standardised with training statistics: mean 0, std 1 over the training pixels.
    assert abs(float(b.x_train.mean())) < 1e-4 and abs(float(b.x_train.std()) - 1) < 1e-3
    assert b.query_idx.numel() == 5 and int(b.query_idx.max()) < 12


def test_mnist_subsets_flatten_and_noise(tmp_path):
    write_mnist(tmp_path)
    full = MNISTFiles(str(tmp_path), num_val=8, num_queries=5, flatten=False).load()
    sub = MNISTFiles(str(tmp_path), num_train=10, num_val=8, num_queries=5, flatten=False).load()
    assert sub.n_train == 10 and set(_ids(sub.x_train)) <= set(_ids(full.x_train))
    assert torch.equal(sub.y_val, full.y_val)  # val does not depend on num_train
    flat = MNISTFiles(str(tmp_path), num_val=8, num_queries=5, flatten=True).load()
    assert flat.x_train.shape == (32, 784)
    assert torch.allclose(flat.x_train, full.x_train.flatten(1))
    noisy = MNISTFiles(
        str(tmp_path), num_val=8, num_queries=5, label_noise=0.25, flatten=False
    ).load()
    assert int(noisy.noise_mask.sum()) == 8
    assert torch.equal(noisy.clean_y_train, full.y_train)
    assert bool((noisy.y_train != full.y_train)[noisy.noise_mask].all())


def test_mnist_missing_file_names_file_dir_and_source(tmp_path):
    with pytest.raises(DataFileError) as e:
        MNISTFiles(str(tmp_path / "nowhere"), num_val=8).load()
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and f"paths.data_dir={tmp_path / 'nowhere'}" in msg
    assert "IDX" in msg and "yann.lecun.com" in msg


def test_mnist_malformed_files(tmp_path):
    write_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    good = p.read_bytes()
    p.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(DataFileError, match="bad magic"):
        MNISTFiles(str(tmp_path), num_val=8).load()
    p.write_bytes(good[:-5])
    with pytest.raises(DataFileError, match="data bytes") as e:
        MNISTFiles(str(tmp_path), num_val=8).load()
    assert "train-images-idx3-ubyte" in str(e.value) and "paths.data_dir=" in str(e.value)
    p.write_bytes(good)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataFileError, match="39 labels"):
        MNISTFiles(str(tmp_path), num_val=8).load()


def test_mnist_subset_sizes_are_validated(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match="dataset.num_train"):
        MNISTFiles(str(tmp_path), num_train=1000, num_val=8).load()


def test_cifar_batches_channel_order_and_pairs(tmp_path):
    raw = write_cifar(tmp_path, per_batch=6, n_test=10)
    b = CIFAR10Files(str(tmp_path), num_val=6, num_queries=4).load()
    assert b.x_train.shape == (24, 3, 32, 32) and b.x_test.shape == (10, 3, 32, 32)
    for x, y, pool_x, pool_y, first in (
        (b.x_train, b.y_train, raw["x_train"], raw["y_train"], 0),
        (b.x_val, b.y_val, raw["x_train"], raw["y_train"], 0),
        (b.x_test, b.y_test, raw["x_test"], raw["y_test"], 200),
    ):
        ids = _ids(x)
        # Exact (3, 32, 32) images: the 3072-byte rows were read as R, G, B planes.
        assert np.array_equal(unstandardize(x.numpy()), pool_x[ids - first])
        assert np.array_equal(y.numpy(), pool_y[ids - first])
    assert set(_ids(b.x_train)).isdisjoint(_ids(b.x_val))
    # Per-channel standardisation with the training subset's statistics.
    mu = b.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(mu, torch.zeros(3), atol=1e-4)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataFileError) as e:
        CIFAR10Files(str(tmp_path), num_val=6).load()
    msg = str(e.value)
    assert "data_batch_1" in msg and "cifar-10-batches-py" in msg
    assert f"paths.data_dir={tmp_path}" in msg and "cifar-10-python.tar.gz" in msg
    write_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").write_bytes(pickle.dumps({b"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataFileError, match="lacks keys") as e:
        CIFAR10Files(str(tmp_path), num_val=6).load()
    assert "data_batch_3" in str(e.value)
    bad = {b"labels": [0, 1], b"data": np.zeros((2, 100), dtype=np.uint8)}
    (d / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataFileError, match="N x 3072"):
        CIFAR10Files(str(tmp_path), num_val=6).load()
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataFileError, match="cannot be unpickled"):
        CIFAR10Files(str(tmp_path), num_val=6).load()


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_pickle_cannot_run_code(tmp_path, capsys):
    write_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataFileError, match="refusing to load .*print"):
        CIFAR10Files(str(tmp_path), num_val=6).load()
    assert "must never run" not in capsys.readouterr().out
