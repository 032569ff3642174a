"""Tests for tasks.data: the embedded digits set, and the MNIST / CIFAR-10 file loaders on tiny files."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.data import (
    CIFAR10_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    FASHION_MNIST_MEAN_STD,
    MNIST_MEAN_STD,
    DataBundle,
    DataError,
    available_datasets,
    load_dataset,
)

# ---------------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_dtypes_and_normalisation(digits):
    assert digits.name == "digits"
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.train_x.dtype == torch.float32 and digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == torch.int64 and digits.test_y.dtype == torch.int64
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.test_x.shape[1:] == (1, 8, 8)
    assert digits.num_train + digits.num_test == 1797
    assert abs(digits.num_test - 0.2 * 1797) <= 10
    # standardised with the training statistics
    assert abs(float(digits.train_x.mean())) < 1e-4
    assert abs(float(digits.train_x.std()) - 1.0) < 1e-3


def test_digits_split_is_stratified(digits):
    train_counts = torch.bincount(digits.train_y, minlength=10)
    test_counts = torch.bincount(digits.test_y, minlength=10)
    totals = train_counts + test_counts
    for c in range(10):
        assert int(test_counts[c]) == round(0.2 * int(totals[c])), c


def test_digits_split_is_fixed(digits):
    torch.rand(3)  # whatever the global RNGs do, the split must not move
    again = load_dataset("digits")
    assert torch.equal(again.test_y, digits.test_y)
    assert torch.equal(again.test_x, digits.test_x)
    assert torch.equal(again.train_x, digits.train_x)


def test_digits_train_and_test_are_disjoint_images(digits):
    # digits has no duplicate images and both splits share one affine normalisation, so a test image
    # equal to a training image means the split leaked
    train = {r.tobytes() for r in digits.train_x.reshape(-1, 64).numpy()}
    assert not any(r.tobytes() in train for r in digits.test_x.reshape(-1, 64).numpy())
    assert len({r.tobytes() for r in digits.test_x.reshape(-1, 64).numpy()}) == digits.num_test


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="digits") as info:
        load_dataset("imagenet")
    for name in available_datasets():
        assert repr(name) in str(info.value)


def test_databundle_rejects_inconsistent_tensors():
    x = torch.zeros(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.int64)
    DataBundle("ok", x, y, x, y, num_classes=2, input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="float32"):
        DataBundle("bad", x.double(), y, x, y, num_classes=2, input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="input_shape"):
        DataBundle("bad", x, y, x, y, num_classes=2, input_shape=(1, 4, 1))
    with pytest.raises(ValueError, match="int64"):
        DataBundle("bad", x, y.int(), x, y, num_classes=2, input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        DataBundle("bad", x, y + 2, x, y, num_classes=2, input_shape=(1, 2, 2))


# ---------------------------------------------------------------------------------------------------- MNIST


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """Write uint8 N x H x W images as an uncompressed IDX3 file (big-endian header, magic 0x0803)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """Write uint8 labels as an uncompressed IDX1 file (magic 0x0801)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, folder: str):
    rng = np.random.default_rng(7)
    train_x = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    train_y = np.array([0, 1, 2, 3, 9, 5], dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    test_y = np.array([7, 8, 9, 0], dtype=np.uint8)
    raw = root / folder / "raw"
    write_idx_images(raw / "train-images-idx3-ubyte", train_x)
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_y)
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_y)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize(
    ("name", "folder", "mean_std"),
    [("mnist", "MNIST", MNIST_MEAN_STD), ("fashion-mnist", "FashionMNIST", FASHION_MNIST_MEAN_STD)],
)
def test_mnist_like_reads_idx_files(tmp_path, name, folder, mean_std):
    train_x, train_y, test_x, test_y = write_tiny_mnist(tmp_path, folder)
    b = load_dataset(name, data_dir=str(tmp_path), download=False)
    assert b.name == name and b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert b.train_x.shape == (6, 1, 28, 28) and b.test_x.shape == (4, 1, 28, 28)
    assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
    assert b.train_y.tolist() == train_y.tolist() and b.test_y.tolist() == test_y.tolist()
    mean, std = mean_std
    expected_train = (train_x.astype(np.float64) / 255 - mean) / std
    expected_test = (test_x.astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(b.train_x[:, 0].numpy(), expected_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.test_x[:, 0].numpy(), expected_test, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_empty_data_dir_says_how_to_get_the_data(name):
    with pytest.raises(DataError, match="data-dir") as info:
        load_dataset(name, data_dir="")
    assert "download=true" in str(info.value)


def test_mnist_missing_files_names_them(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=str(tmp_path), download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "download=true" in msg


def test_mnist_truncated_file_is_a_data_error(tmp_path):
    write_tiny_mnist(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_label_count_mismatch_is_a_data_error(tmp_path):
    write_tiny_mnist(tmp_path, "MNIST")
    write_idx_labels(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    with pytest.raises(DataError, match="labels"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_refuses_legacy_pickle_cache(tmp_path):
    write_tiny_mnist(tmp_path, "MNIST")
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    (processed / "training.pt").write_bytes(b"not read")
    (processed / "test.pt").write_bytes(b"not read")
    with pytest.raises(DataError, match="pickle"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fail(self):
        calls.append(self.root)
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail)
    with pytest.raises(DataError, match="Downloading mnist"):
        load_dataset("mnist", data_dir=str(tmp_path), download=True)
    assert calls == [str(tmp_path)]


# ---------------------------------------------------------------------------------------------------- CIFAR-10


def cifar_records(labels, fill=(10, 20, 30)) -> bytes:
    """CIFAR-10 binary records: label byte, then red, green, blue 32x32 planes (each plane constant)."""
    out = bytearray()
    for label in labels:
        planes = np.stack([np.full((32, 32), v, np.uint8) for v in fill])
        out += bytes([label]) + planes.tobytes()
    return bytes(out)


def write_tiny_cifar(root: Path) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}.bin").write_bytes(cifar_records([i - 1, 9]))
    # one test record with a marked pixel: red plane, row 1, column 2
    rec = bytearray(cifar_records([3, 4, 5]))
    rec[1 + 1 * 32 + 2] = 200
    (d / "test_batch.bin").write_bytes(bytes(rec))
    return d


def test_cifar10_reads_binary_files(tmp_path):
    write_tiny_cifar(tmp_path)
    b = load_dataset("cifar10", data_dir=str(tmp_path))
    assert b.name == "cifar10" and b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.train_x.shape == (10, 3, 32, 32) and b.test_x.shape == (3, 3, 32, 32)
    assert b.train_y.tolist() == [0, 9, 1, 9, 2, 9, 3, 9, 4, 9]
    assert b.test_y.tolist() == [3, 4, 5]
    for c, v in enumerate((10, 20, 30)):
        expected = (v / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert torch.allclose(b.train_x[:, c], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    # channel-major, row-major layout: byte 1 + 1*32 + 2 is red pixel (1, 2) of the first record
    marked = (200 / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]
    assert b.test_x[0, 0, 1, 2].item() == pytest.approx(marked, abs=1e-5)
    assert b.test_x[0, 0, 1, 3].item() == pytest.approx(
        (10 / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0], abs=1e-5
    )


def test_cifar10_size_not_multiple_of_record_is_a_data_error(tmp_path):
    d = write_tiny_cifar(tmp_path)
    (d / "data_batch_3.bin").write_bytes(cifar_records([1, 2]) + b"\x00" * 5)
    with pytest.raises(DataError, match="3073") as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "data_batch_3.bin" in str(info.value)


def test_cifar10_empty_file_is_a_data_error(tmp_path):
    d = write_tiny_cifar(tmp_path)
    (d / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"test_batch\.bin"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar10_bad_label_is_a_data_error(tmp_path):
    d = write_tiny_cifar(tmp_path)
    (d / "data_batch_2.bin").write_bytes(cifar_records([1, 10]))
    with pytest.raises(DataError, match="label 10"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar10_missing_files_names_them(tmp_path):
    d = write_tiny_cifar(tmp_path)
    (d / "data_batch_4.bin").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    msg = str(info.value)
    assert "data_batch_4.bin" in msg and "data_batch_1.bin" not in msg
    assert "download=true" in msg


def test_cifar10_pickle_version_is_not_read(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="pickle"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar10_download_fetches_the_binary_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append((url, download_root, md5))
        write_tiny_cifar(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    b = load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert calls == [(CIFAR10_URL, str(tmp_path), CIFAR10_MD5)]
    assert CIFAR10_URL.endswith("cifar-10-binary.tar.gz")
    assert b.train_x.shape == (10, 3, 32, 32)
    # files present: no second download
    load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert len(calls) == 1


def test_cifar10_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def fail(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fail)
    with pytest.raises(DataError, match="Downloading"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=True)
