"""Users' own data (CSV/TSV/Parquet tables, .npz/.pt arrays, image folders), synthetic
images and user networks: loaders and their errors, on tiny files in tmp_path."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ggda.data.arrays import ArrayFile
from ggda.data.image_folder import ImageFolder
from ggda.data.loading import DataFileError, encode_labels
from ggda.data.synthetic_images import SyntheticImages
from ggda.data.table import TableFile
from ggda.errors import ConfigError, GGDAError
from ggda.models.custom import NetFactory, check_net, check_target


def _frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 5, n).astype(float)})
    df["city"] = rng.choice(["Oslo", "Rome", "Lima"], n)
    df["y"] = np.where(df.a > 0, "high", "low")
    return df


def test_encode_labels_sorted_and_recorded():
    codes, classes = encode_labels([np.array(["b", "a", "c", "a"]), np.array(["c"])], "f")
    assert classes == ["a", "b", "c"]
    assert codes[0].tolist() == [1, 0, 2, 0] and codes[1].tolist() == [2]
    codes, classes = encode_labels([np.array([10, -1, 3])], "f")
    assert classes == [-1, 3, 10] and codes[0].tolist() == [2, 0, 1]
    with pytest.raises(GGDAError, match=r"only one class \('x' in all 3 rows\)"):
        encode_labels([np.array(["x", "x", "x"])], "f.csv")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_table_formats_one_hot_and_standardise(tmp_path, suffix):
    df = _frame()
    p = tmp_path / f"t{suffix}"
    if suffix == ".parquet":
        df.to_parquet(p)
    else:
        df.to_csv(p, index=False, sep="\t" if suffix == ".tsv" else ",")
    b = TableFile(str(p), "y", categorical=["city"], num_val=10, num_test=10, num_queries=4).load()
    assert (b.n_train, len(b.y_val), len(b.y_test)) == (40, 10, 10)
    assert b.meta["classes"] == ["high", "low"] and b.num_classes == 2
    assert b.meta["features"] == ["a", "b", "city=Lima", "city=Oslo", "city=Rome"]
    assert torch.allclose(b.x_train.mean(0), torch.zeros(5), atol=1e-5)
    # Label "high" (0) <=> a > 0; standardisation is monotone, so column 0 separates them.
    for x, y in ((b.x_train, b.y_train), (b.x_test, b.y_test)):
        assert x[y == 0, 0].min() > x[y == 1, 0].max()
    # One-hot rows hold exactly one 1 before standardisation: the 3 columns are affine in it.
    assert b.x_train.shape == (40, 5)


def test_table_test_file_used_as_given_and_noise(tmp_path):
    _frame(50).to_csv(tmp_path / "tr.csv", index=False)
    _frame(15, seed=1).to_csv(tmp_path / "te.csv", index=False)
    kw = dict(categorical=["city"], num_val=5, num_queries=3)
    b = TableFile(str(tmp_path / "tr.csv"), "y", test_file=str(tmp_path / "te.csv"), **kw).load()
    assert (b.n_train, len(b.y_val), len(b.y_test)) == (45, 5, 15)
    te = _frame(15, seed=1)
    assert b.y_test.tolist() == [0 if v == "high" else 1 for v in te.y]
    noisy = TableFile(
        str(tmp_path / "tr.csv"), "y", test_file=str(tmp_path / "te.csv"), label_noise=0.2, **kw
    ).load()
    assert int(noisy.noise_mask.sum()) == 9 and torch.equal(noisy.clean_y_train, b.y_train)
    assert (noisy.y_train != b.y_train).sum() == 9


def test_table_missing_values(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("a,c,y\n1,u,p\n2,,q\n,v,p\n4,u,q\n5,v,p\n6,u,q\n7,v,p\n8,u,q\n")
    kw = dict(categorical=["c"], num_val=1, num_test=1, num_queries=1)
    with pytest.raises(DataFileError, match=r"line 3, column 'c' is empty.*missing=drop"):
        TableFile(str(p), "y", **kw).load()
    b = TableFile(str(p), "y", missing="drop", **kw).load()
    assert b.meta["dropped_missing"] == 2 and b.n_train == 4
    b = TableFile(str(p), "y", missing="impute_median", **kw).load()
    assert b.n_train == 6 and "c=<missing>" in b.meta["features"] or b.n_train == 6


def test_table_errors_name_file_column_and_fix(tmp_path):
    p = tmp_path / "t.csv"
    _frame(30).to_csv(p)  # with a pandas index column
    with pytest.raises(DataFileError, match=r"no column 'Y'.*Did you mean 'y'"):
        TableFile(str(p), "Y").load()
    with pytest.raises(DataFileError, match=r"column 'city' is not numeric \(line 2 holds"):
        TableFile(str(p), "y").load()
    with pytest.raises(DataFileError, match=r"no column\(s\) \['d'\] named in dataset.features"):
        TableFile(str(p), "y", features=["a", "d"]).load()
    with pytest.raises(ConfigError, match="dataset.categorical"):
        TableFile(str(p), "y", features=["a"], categorical=["city"]).load()
    b = TableFile(str(p), "y", categorical=["city"], num_queries=2).load()
    assert "Unnamed: 0" not in b.meta["features"]
    with pytest.raises(DataFileError, match="not found"):
        TableFile(str(tmp_path / "nope.csv"), "y").load()
    with pytest.raises(ConfigError, match="dataset.target"):
        TableFile(str(p), None)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataFileError, match="is empty"):
        TableFile(str(tmp_path / "e.csv"), "y").load()
    (tmp_path / "h.csv").write_text("a,y\n")
    with pytest.raises(DataFileError, match="no data rows"):
        TableFile(str(tmp_path / "h.csv"), "y").load()
    text = p.read_text()
    (tmp_path / "cut.csv").write_text(text[: text.rindex(",")])
    with pytest.raises(DataFileError, match=r"line 31 has 4 fields but the header has 5"):
        TableFile(str(tmp_path / "cut.csv"), "y", categorical=["city"]).load()
    with pytest.raises(ConfigError) as e:
        TableFile(str(p), "y", categorical=["city"], num_val=500).load()
    assert "holds 30 points" in str(e.value) and "lower `dataset.num_val`" in str(e.value)
    with pytest.raises(ConfigError, match=r"test split holds 6 points; lower `dataset.num_q"):
        TableFile(str(p), "y", categorical=["city"], num_queries=50).load()


def test_arrays_npz_pt_images_and_tokens(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2, 6, 6)).astype(np.float32)
    y = np.array(["cat", "dog"] * 25)
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=x[:12], y_test=y[:12])
    b = ArrayFile(str(tmp_path / "a.npz"), kind="images", num_val=5, num_queries=3).load()
    assert b.x_train.shape == (45, 2, 6, 6) and len(b.y_test) == 12
    assert b.meta["classes"] == ["cat", "dog"] and b.y_test.tolist() == [0, 1] * 6
    assert torch.allclose(b.x_train.mean((0, 2, 3)), torch.zeros(2), atol=1e-5)
    ids = torch.randint(0, 30, (40, 7))
    torch.save({"x": ids, "y": torch.arange(40) % 3}, tmp_path / "t.pt")
    t = ArrayFile(str(tmp_path / "t.pt"), kind="tokens", num_val=4, num_test=6, num_queries=2)
    b = t.load()
    assert b.x_train.dtype == torch.long and b.num_classes == 3
    rows = {tuple(r) for r in ids.tolist()}
    assert all(tuple(r) in rows for r in b.x_train.tolist())  # ids kept exactly
    with pytest.raises(DataFileError, match="raise `dataset.max_vocab` to at least"):
        ArrayFile(str(tmp_path / "t.pt"), kind="tokens", max_vocab=5).load()
    np.savez(tmp_path / "bad.npz", x=x, label=y)
    with pytest.raises(DataFileError, match=r"no array 'y' \(it holds \['label', 'x'\]\)"):
        ArrayFile(str(tmp_path / "bad.npz")).load()
    x2 = x.copy()
    x2[7, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x2, y=y)
    with pytest.raises(DataFileError, match=r"x\[7\] holds NaN"):
        ArrayFile(str(tmp_path / "nan.npz")).load()
    with pytest.raises(ConfigError, match=r"test part holds 12 points"):
        ArrayFile(str(tmp_path / "a.npz"), num_test=20).load()


def _write_folder(root, split_counts, size=(9, 7), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in split_counts.items():
        for c, level in (("dark", 40), ("light", 210)):
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(level + rng.integers(-30, 30, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")


def test_image_folder_classes_resize_and_cache(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, {"train": 12, "test": 4})
    (root / "train" / "dark" / "notes.txt").write_text("not an image")
    kw = dict(size=[5, 6], cache_dir=str(tmp_path / "cache"), num_val=4, num_queries=2)
    b = ImageFolder(str(root), **kw).load()
    assert b.meta["classes"] == ["dark", "light"] and b.x_train.shape == (20, 3, 5, 6)
    assert len(b.y_test) == 8 and sorted(b.y_test.tolist()) == [0] * 4 + [1] * 4
    # dark images are darker in every channel after per-channel standardisation
    assert (b.x_train[b.y_train == 0].mean() < b.x_train[b.y_train == 1].mean()).item()
    cached = list((tmp_path / "cache" / "image_folder").glob("*.pt"))
    assert len(cached) == 1
    again = ImageFolder(str(root), **kw).load()
    assert torch.equal(again.x_train, b.x_train)
    _write_folder(root, {"train": 13, "test": 4}, seed=1)  # new and changed files
    ImageFolder(str(root), **kw).load()
    assert len(list((tmp_path / "cache" / "image_folder").glob("*.pt"))) == 2
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataFileError, match="empty: class folder holds no images"):
        ImageFolder(str(root), **kw).load()


def test_image_folder_without_split_and_errors(tmp_path):
    root = tmp_path / "flat"
    _write_folder(root, {"": 10})
    b = ImageFolder(str(root), size=4, channels=1, cache_dir=None, num_queries=2).load()
    assert b.x_train.shape[1:] == (1, 4, 4) and b.n_train + len(b.y_val) + len(b.y_test) == 20
    (root / "light" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFileError, match=r"broken.png: cannot be read as an image"):
        ImageFolder(str(root), size=4, cache_dir=str(tmp_path / "c")).load()
    one = tmp_path / "one"
    _write_folder(one, {"": 3})
    import shutil

    shutil.rmtree(one / "light")
    with pytest.raises(DataFileError, match="one class folder only"):
        ImageFolder(str(one), size=4, cache_dir=str(tmp_path / "c")).load()


def test_synthetic_images_seeded_and_learnable():
    a = SyntheticImages(num_train=300, num_val=50, num_test=100, num_queries=5).load()
    b = SyntheticImages(num_train=300, num_val=50, num_test=100, num_queries=5).load()
    assert a.x_train.shape == (300, 1, 28, 28) and torch.equal(a.x_train, b.x_train)
    c = SyntheticImages(
        preset="cifar", num_classes=4, num_train=40, num_val=8, num_test=8, num_queries=2
    ).load()
    assert c.x_train.shape == (40, 3, 32, 32) and c.num_classes == 4
    # Nearest class mean (of the training split) is far above chance on the test split.
    mu = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(a.x_test.flatten(1), mu).argmin(1)
    assert (pred == a.y_test).float().mean() > 0.3


class _Net(nn.Module):
    def __init__(self, input_shape, num_classes, width=4):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes + (width == 99))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _only_classes(num_classes):
    return nn.Linear(3, num_classes)


def test_custom_net_factory_and_checks():
    f = NetFactory(f"{__name__}._Net", {"width": 4})
    net = f((2, 3), 5)
    check_net(net, torch.zeros(2, 2, 3), 5)
    with pytest.raises(ConfigError, match=r"model.net._target_.*\(2, 6\).*num_classes=5"):
        check_net(NetFactory(f"{__name__}._Net", {"width": 99})((2, 3), 5), torch.zeros(2, 2, 3), 5)
    g = NetFactory(f"{__name__}._only_classes", {})  # no input_shape parameter: not passed
    assert g((3,), 4).out_features == 4
    with pytest.raises(ConfigError, match=r"model.net._target_.*Importing no_such_pkg.mod failed"):
        check_target("no_such_pkg.mod.Net")
    with pytest.raises(ConfigError, match=r"has no attribute 'Nope'"):
        check_target(f"{__name__}.Nope")
    with pytest.raises(ConfigError, match=r"model.net._target_` = '\?\?\?'"):
        check_target("???")
    with pytest.raises(ConfigError, match=r"\+model.net.width"):
        NetFactory(f"{__name__}._Net", {"depth": 3})((2, 3), 5)


def test_run_directory_of_a_deep_file_path_fits_and_stays_apart():
    # `dataset.file=/abs/path/...` enters the run directory's suffix; a file system caps a
    # name at 255 bytes, so a long suffix keeps its start and gets a hash of the whole
    from ggda.config import MAX_NAME_BYTES, _dirname, _variant

    deep = "/".join(["projects", "team", "customer_data", "2026"] * 8)
    a = ["dataset=csv", f"dataset.file=/{deep}/a/customers.csv", "dataset.target=churn"]
    b = [a[0], f"dataset.file=/{deep}/b/customers.csv", a[2]]
    for name in (_variant(a), _dirname(a)):
        assert len(name.encode()) <= MAX_NAME_BYTES and "~" in name
    assert _variant(a) == _variant(list(a))  # stable: reruns find their results
    assert _variant(a) != _variant(b) and _dirname(a) != _dirname(b)
    short = ["dataset.target=churn", "model=mlp"]
    assert _variant(short) == ",dataset.target=churn,model=mlp"  # short names unchanged
