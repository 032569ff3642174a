"""Data sets for the simulations: loading, normalisation and a fixed train/test split.

Every loader returns a :class:`DataBundle` of normalised ``float32`` image tensors (``N x C x H x W``) and
``int64`` labels. The data sets (design.md section 5):

``digits``
    scikit-learn's handwritten digits (1,797 8x8 images). It ships with scikit-learn, so the default run needs
    no network and no ``data-dir``. The train/test split is fixed (stratified, 20% test, drawn with
    ``np.random.default_rng(12345)``) and does not depend on any run seed, so every run evaluates on the same
    test set.
``mnist``, ``fashion-mnist``
    Read through torchvision from ``<data-dir>/MNIST/raw`` or ``<data-dir>/FashionMNIST/raw`` (the uncompressed
    IDX files); fetched by torchvision when ``download`` is true.
``cifar10``
    Read from the official *binary* version (``<data-dir>/cifar-10-batches-bin/*.bin``). torchvision's
    ``CIFAR10`` class is not used: it reads the Python-pickle version, and this project never loads pickles.

Data sets that need files never download anything unless ``download`` is true, and a missing ``data-dir`` or
missing files raise :class:`DataError` with the exact files expected and the command that fetches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataBundle", "DataError", "available_datasets", "load_dataset"]

# The digits split is a property of the data set, not of a run: never derive it from a run seed.
DIGITS_SPLIT_SEED = 12345
DIGITS_TEST_FRACTION = 0.2

MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Errors torchvision raises on unreadable IDX files (its parser validates with ``assert``) and on failed
# downloads (``RuntimeError``, ``URLError`` which is an ``OSError``).
_TORCHVISION_ERRORS = (RuntimeError, OSError, ValueError, TypeError, AssertionError)


class DataError(RuntimeError):
    """A data set is missing, cannot be downloaded, or its files are corrupt.

    The message names the files expected and says how to get them.
    """


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A data set ready for training: normalised image tensors, labels and their shapes.

    ``eq=False``: tensors have no single truth value, so bundles compare by identity.

    Attributes
    ----------
    name : str
        Registry name of the data set (``"digits"``, ``"mnist"``, ...).
    train_x, test_x : torch.Tensor
        ``float32`` images, ``N x C x H x W``, normalised (zero mean, unit variance per channel, using fixed
        published statistics or the training-set statistics).
    train_y, test_y : torch.Tensor
        ``int64`` class labels in ``[0, num_classes)``, one per image.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"DataBundle {self.name!r}: num_classes must be >= 2, got {self.num_classes}.")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.float32 or x.ndim != 4:
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_x must be a float32 N x C x H x W tensor, "
                    f"got dtype {x.dtype} with shape {tuple(x.shape)}."
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_x images have shape {tuple(x.shape[1:])}, "
                    f"but input_shape is {tuple(self.input_shape)}."
                )
            if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_y must be an int64 vector with one label per image "
                    f"({x.shape[0]}), got dtype {y.dtype} with shape {tuple(y.shape)}."
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_y has labels in [{int(y.min())}, {int(y.max())}], "
                    f"outside [0, {self.num_classes})."
                )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.test_x.shape[0])


# --------------------------------------------------------------------------------------------------- helpers


def _how_to_get(name: str) -> str:
    """Return the run-config fragment that lets ``name`` be downloaded."""
    return (
        f"flwr run . --run-config \"dataset='{name}' data-dir='/path/to/data' download=true\" "
        "(download once, then drop download=true)"
    )


def _require_data_dir(name: str, data_dir: str, expected: list[Path]) -> Path:
    """Return ``data_dir`` as an expanded path; raise :class:`DataError` if it is empty."""
    if not data_dir:
        rel = ", ".join(str(p) for p in expected)
        raise DataError(
            f"Data set {name!r} needs files on disk but data-dir is empty. Set data-dir to a directory that "
            f"holds (or may receive) {rel}, e.g. {_how_to_get(name)}. "
            "Use dataset='digits' for the embedded data set that needs no files."
        )
    return Path(data_dir).expanduser()


def _missing_error(name: str, root: Path, missing: list[Path]) -> DataError:
    """Build the :class:`DataError` for files that are absent while downloading is off."""
    files = ", ".join(str(p) for p in missing)
    return DataError(
        f"Data set {name!r} not found under data-dir {str(root)!r}: missing {files}. "
        f"Allow the download with download=true, e.g. {_how_to_get(name)}, "
        "or place those files there yourself."
    )


def _to_tensor_normalised(images_u8: torch.Tensor, scale: float, mean, std) -> torch.Tensor:
    """Convert ``uint8`` images ``N x C x H x W`` to ``float32``: ``(x / scale - mean) / std`` per channel."""
    x = images_u8.to(torch.float32).div_(scale)
    channels = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    return x.sub_(mean_t).div_(std_t).contiguous()


# --------------------------------------------------------------------------------------------------- digits


def _stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Split indices per class: ``round(test_fraction * n_c)`` of each class go to the test set.

    Returns sorted ``(train_idx, test_idx)``.
    """
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = round(test_fraction * idx.size)
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _load_digits(data_dir: str, download: bool) -> DataBundle:
    """Load scikit-learn's digits (embedded; ``data_dir`` and ``download`` are ignored)."""
    from sklearn.datasets import load_digits

    del data_dir, download  # embedded data: nothing to find or fetch
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # pixels are integers in [0, 16]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(
        labels, DIGITS_TEST_FRACTION, np.random.default_rng(DIGITS_SPLIT_SEED)
    )
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    images = ((images - mean) / std).astype(np.float32)[:, None, :, :]
    return DataBundle(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(images[train_idx])),
        train_y=torch.from_numpy(labels[train_idx]),
        test_x=torch.from_numpy(np.ascontiguousarray(images[test_idx])),
        test_y=torch.from_numpy(labels[test_idx]),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


# --------------------------------------------------------------------------------------------------- MNIST


def _load_mnist_like(name: str, class_name: str, mean_std, data_dir: str, download: bool) -> DataBundle:
    """Load MNIST or Fashion-MNIST through torchvision from the raw IDX files under ``data_dir``."""
    raw_rel = [Path(class_name) / "raw" / f for f in MNIST_FILES]
    root = _require_data_dir(name, data_dir, raw_rel)
    raw_dir = root / class_name / "raw"
    processed = root / class_name / "processed"
    if (processed / "training.pt").is_file() and (processed / "test.pt").is_file():
        # torchvision would load these legacy caches with torch.load (a pickle format) instead of the raw files.
        raise DataError(
            f"Found torchvision's legacy cache {processed}/{{training,test}}.pt. This project does not load "
            f"pickle-based files; rename or delete {processed} so the raw IDX files in {raw_dir} are read "
            "(run once with download=true if they are missing)."
        )
    missing = [root / p for p in raw_rel if not (root / p).is_file()]
    if missing and not download:
        raise _missing_error(name, root, missing)

    from torchvision import datasets as tv_datasets

    cls = getattr(tv_datasets, class_name)
    if missing:
        try:
            cls(root=str(root), train=True, download=True)
        except _TORCHVISION_ERRORS as exc:
            raise DataError(
                f"Downloading {name} into {raw_dir} failed ({type(exc).__name__}: {exc}). Check the network "
                f"connection, or put the files {', '.join(MNIST_FILES)} into {raw_dir} yourself."
            ) from exc
    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
    except _TORCHVISION_ERRORS as exc:
        raise DataError(
            f"The {name} IDX files in {raw_dir} could not be read ({type(exc).__name__}: {exc}); they are "
            f"corrupt or truncated. Delete {raw_dir} and run again with download=true."
        ) from exc

    def convert(split: str, ds) -> tuple[torch.Tensor, torch.Tensor]:
        data, targets = ds.data, ds.targets
        if data.dtype != torch.uint8 or data.ndim != 3 or tuple(data.shape[1:]) != (28, 28):
            raise DataError(
                f"{name} {split} images in {raw_dir} have dtype {data.dtype} and shape {tuple(data.shape)}; "
                "expected uint8 N x 28 x 28. Delete the files and run again with download=true."
            )
        if targets.shape != (data.shape[0],):
            raise DataError(
                f"{name} {split} set in {raw_dir} has {data.shape[0]} images but {targets.numel()} labels; "
                "the files are from different sets or truncated. Delete them and run again with download=true."
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) > 9):
            raise DataError(
                f"{name} {split} labels in {raw_dir} range over [{int(targets.min())}, {int(targets.max())}]; "
                "expected 0..9. Delete the files and run again with download=true."
            )
        x = _to_tensor_normalised(data.unsqueeze(1), 255.0, (mean_std[0],), (mean_std[1],))
        return x, targets.to(torch.int64)

    train_x, train_y = convert("train", train)
    test_x, test_y = convert("test", test)
    return DataBundle(name, train_x, train_y, test_x, test_y, num_classes=10, input_shape=(1, 28, 28))


def _load_mnist(data_dir: str, download: bool) -> DataBundle:
    """Load MNIST (torchvision ``MNIST``)."""
    return _load_mnist_like("mnist", "MNIST", MNIST_MEAN_STD, data_dir, download)


def _load_fashion_mnist(data_dir: str, download: bool) -> DataBundle:
    """Load Fashion-MNIST (torchvision ``FashionMNIST``)."""
    return _load_mnist_like("fashion-mnist", "FashionMNIST", FASHION_MNIST_MEAN_STD, data_dir, download)


# --------------------------------------------------------------------------------------------------- CIFAR-10


def _read_cifar10_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one file of the CIFAR-10 binary version.

    Each record is one label byte followed by 3,072 pixel bytes (1,024 red, then green, then blue, each a
    row-major 32x32 plane).

    Parameters
    ----------
    path : Path
        A ``data_batch_<i>.bin`` or ``test_batch.bin`` file.

    Returns
    -------
    images : np.ndarray
        ``uint8``, ``N x 3 x 32 x 32``.
    labels : np.ndarray
        ``int64``, ``N``, each in ``0..9``.

    Raises
    ------
    DataError
        If the size is not a positive multiple of 3,073 bytes or a label is not in ``0..9``.
    """
    size = path.stat().st_size
    if size == 0 or size % CIFAR10_RECORD_BYTES != 0:
        raise DataError(
            f"{path} has {size} bytes, not a positive multiple of {CIFAR10_RECORD_BYTES} (1 label byte + 3072 "
            "pixel bytes per record): it is truncated or not from the CIFAR-10 binary version. Delete "
            f"{path.parent} and run again with download=true, or re-extract cifar-10-binary.tar.gz."
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(
            f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}, expected 0..9 ({bad.size} bad "
            "records). The file is corrupt or not CIFAR-10 (CIFAR-100's binary format has two label bytes). "
            f"Delete {path.parent} and run again with download=true."
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def _load_cifar10(data_dir: str, download: bool) -> DataBundle:
    """Load CIFAR-10 from its binary version under ``<data_dir>/cifar-10-batches-bin``."""
    names = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    rel = [Path(CIFAR10_DIR) / f for f in names]
    root = _require_data_dir("cifar10", data_dir, rel)
    missing = [root / p for p in rel if not (root / p).is_file()]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10_URL, download_root=str(root), md5=CIFAR10_MD5)
        except _TORCHVISION_ERRORS as exc:
            raise DataError(
                f"Downloading {CIFAR10_URL} into {root} failed ({type(exc).__name__}: {exc}). Check the "
                f"network connection, or download and extract that archive into {root} yourself."
            ) from exc
        missing = [root / p for p in rel if not (root / p).is_file()]
        if missing:
            raise DataError(
                f"Extracted {CIFAR10_URL} into {root} but still miss {', '.join(map(str, missing))}; the "
                "archive is not the CIFAR-10 binary version. Delete it and run again."
            )
    if missing:
        err = _missing_error("cifar10", root, missing)
        if (root / "cifar-10-batches-py").is_dir():
            err = DataError(
                f"{err} Note: {root / 'cifar-10-batches-py'} is the Python-pickle version, which this "
                "project does not read; it needs the binary version (cifar-10-binary.tar.gz)."
            )
        raise err

    train = [_read_cifar10_bin(root / CIFAR10_DIR / f) for f in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar10_bin(root / CIFAR10_DIR / CIFAR10_TEST_FILE)
    train_images = np.concatenate([im for im, _ in train])
    train_labels = np.concatenate([lb for _, lb in train])
    return DataBundle(
        name="cifar10",
        train_x=_to_tensor_normalised(torch.from_numpy(train_images), 255.0, CIFAR10_MEAN, CIFAR10_STD),
        train_y=torch.from_numpy(train_labels),
        test_x=_to_tensor_normalised(torch.from_numpy(test_images), 255.0, CIFAR10_MEAN, CIFAR10_STD),
        test_y=torch.from_numpy(test_labels),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


# --------------------------------------------------------------------------------------------------- registry

# The only name -> loader map. A loader takes (data_dir, download).
_LOADERS: dict[str, Callable[[str, bool], DataBundle]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}


def available_datasets() -> tuple[str, ...]:
    """Return the names :func:`load_dataset` accepts."""
    return tuple(_LOADERS)


def load_dataset(name: str, data_dir: str = "", download: bool = False) -> DataBundle:
    """Load a data set by name.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`: ``"digits"`` (embedded, the default), ``"mnist"``,
        ``"fashion-mnist"`` or ``"cifar10"``.
    data_dir : str, default ""
        Directory holding the downloaded data sets; ignored for ``"digits"``, required for the others.
    download : bool, default False
        Fetch missing files into ``data_dir``. Nothing is ever downloaded unless this is true.

    Returns
    -------
    DataBundle
        Normalised ``float32`` images ``N x C x H x W`` and ``int64`` labels for train and test.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    DataError
        If ``data_dir`` is empty or files are missing (the message says how to get them), a download fails,
        or the files are corrupt.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        known = ", ".join(repr(k) for k in _LOADERS)
        raise ValueError(f"Unknown data set {name!r}; choose one of {known}.") from None
    return loader(data_dir, download)
