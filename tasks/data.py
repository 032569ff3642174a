"""Data sets for the simulations: loading, normalisation, a fixed train/test split, and a validation split.

Every loader returns a :class:`DataBundle` of normalised ``float32`` input tensors (``N x C x H x W`` images,
or ``N x C x L`` signals) and ``int64`` labels. The data sets (design.md section 5):

``digits``
    scikit-learn's handwritten digits (1,797 8x8 images). It ships with scikit-learn, so the default run needs
    no network and no ``data-dir``. The train/test split is fixed (stratified, 20% test, drawn with
    ``np.random.default_rng(12345)``) and does not depend on any run seed, so every run evaluates on the same
    test set.
``mnist1d``
    MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020, arXiv:2011.14439): 1 x 40 signals, 10 classes,
    generated offline by the ``mnist1d`` package's ``make_dataset`` with its default arguments (its
    ``get_dataset_args()``, data seed 42), only ``num_samples`` overridden (``mnist1d-samples``). The package
    standardises the whole set and splits it 80/20 into train/test (``train_split``); both are kept as they are.
    Generation is slow (about 25 s for 70,000 samples), so the arrays are cached as ``.npz`` in
    ``<data-dir>/mnist1d`` (or ``$XDG_CACHE_HOME/fl-compams/mnist1d``, default ``~/.cache/fl-compams/mnist1d``)
    under a name that hashes every generation argument; see :func:`mnist1d_cache_path`. Nothing is downloaded
    and nothing is pickled: the package's own pickle cache and download helpers are never used.
``mnist``, ``fashion-mnist``
    Read through torchvision from ``<data-dir>/MNIST/raw`` or ``<data-dir>/FashionMNIST/raw`` (the uncompressed
    IDX files); fetched by torchvision when ``download`` is true.
``cifar10``
    Read from the official *binary* version (``<data-dir>/cifar-10-batches-bin/*.bin``). torchvision's
    ``CIFAR10`` class is not used: it reads the Python-pickle version, and this project never loads pickles.

Data sets that need files never download anything unless ``download`` is true, and a missing ``data-dir`` or
missing files raise :class:`DataError` with the exact files expected and the command that fetches them.

:func:`hold_out_validation` moves a seeded, stratified share of a bundle's training set into ``val_x``/``val_y``
(the ``validation-fraction`` key); the test set is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_compams.config import MNIST1D_DEFAULT_SAMPLES

__all__ = [
    "DataBundle",
    "DataError",
    "available_datasets",
    "hold_out_validation",
    "load_dataset",
    "mnist1d_cache_path",
]

log = logging.getLogger(__name__)

# The digits split is a property of the data set, not of a run: never derive it from a run seed.
DIGITS_SPLIT_SEED = 12345
DIGITS_TEST_FRACTION = 0.2

MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

MNIST1D_LENGTH = 40  # final_seq_length of the package's default arguments
MNIST1D_CACHE_FORMAT = 1  # bump when the cached arrays change meaning; part of the file-name hash
MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")

#: Seed-sequence tag of the validation split, so that it draws from its own stream of the run seed.
VALIDATION_SPLIT_STREAM = 0x76616C  # "val"
MAX_VALIDATION_FRACTION = 0.5

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
    """A data set ready for training: normalised input tensors, labels and their shapes.

    ``eq=False``: tensors have no single truth value, so bundles compare by identity.

    Attributes
    ----------
    name : str
        Registry name of the data set (``"digits"``, ``"mnist1d"``, ...).
    train_x, test_x : torch.Tensor
        ``float32`` inputs, ``N x *input_shape`` (images ``N x C x H x W``, 1-D signals ``N x C x L``),
        normalised (zero mean, unit variance per channel, using fixed published statistics or the training-set
        statistics; MNIST-1D as its package generates it).
    train_y, test_y : torch.Tensor
        ``int64`` class labels in ``[0, num_classes)``, one per example.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        Shape of one example, channels first: ``(C, H, W)`` for images, ``(C, L)`` for 1-D signals.
    val_x, val_y : torch.Tensor
        The validation split held out of the training set (:func:`hold_out_validation`), shaped like
        ``train_x``/``train_y``; empty (zero rows) when there is none, which is the default.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    val_x: torch.Tensor = None  # type: ignore[assignment]  # None -> empty, in __post_init__
    val_y: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"DataBundle {self.name!r}: num_classes must be >= 2, got {self.num_classes}.")
        shape = tuple(self.input_shape)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(
                f"DataBundle {self.name!r}: input_shape must be a non-empty tuple of positive ints, "
                f"got {self.input_shape!r}."
            )
        object.__setattr__(self, "input_shape", shape)
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError(f"DataBundle {self.name!r}: give both val_x and val_y, or neither.")
        if self.val_x is None:
            object.__setattr__(self, "val_x", torch.empty((0, *shape), dtype=torch.float32))
            object.__setattr__(self, "val_y", torch.empty(0, dtype=torch.int64))
        layout = {3: "N x C x H x W", 2: "N x C x L"}.get(len(shape), f"N x {len(shape)}-D")
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
            ("val", self.val_x, self.val_y),
        ):
            if x.dtype != torch.float32 or x.ndim != 1 + len(shape):
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_x must be a float32 {layout} tensor, "
                    f"got dtype {x.dtype} with shape {tuple(x.shape)}."
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_x examples have shape {tuple(x.shape[1:])}, "
                    f"but input_shape is {shape}."
                )
            if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"DataBundle {self.name!r}: {split}_y must be an int64 vector with one label per example "
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

    @property
    def num_val(self) -> int:
        """Number of validation examples (0 without a validation split)."""
        return int(self.val_x.shape[0])


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


# --------------------------------------------------------------------------------------------------- MNIST-1D


def _mnist1d_cache_dir(data_dir: str) -> Path:
    """``<data_dir>/mnist1d``, else ``$XDG_CACHE_HOME/fl-compams/mnist1d``, else ``~/.cache/fl-compams/mnist1d``."""
    if data_dir:
        return Path(data_dir).expanduser() / "mnist1d"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fl-compams" / "mnist1d"


def _mnist1d_recipe(num_samples: int) -> dict:
    """Everything the generated MNIST-1D arrays depend on (hashed into the cache file name).

    The package version, its default arguments with ``num_samples`` overridden, its digit templates, and this
    module's cache format.
    """
    from mnist1d.data import get_dataset_args, get_templates  # imports matplotlib: only when needed

    args = dict(get_dataset_args(as_dict=True))
    args["num_samples"] = int(num_samples)
    templates = {k: np.asarray(v).tolist() for k, v in sorted(get_templates().items())}
    return {
        "format": MNIST1D_CACHE_FORMAT,
        "package": f"mnist1d {importlib.metadata.version('mnist1d')}",
        "args": args,
        "templates": templates,
    }


def _recipe_json(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def mnist1d_cache_path(data_dir: str = "", num_samples: int = MNIST1D_DEFAULT_SAMPLES) -> Path:
    """Where the MNIST-1D arrays for these arguments are cached.

    The directory is ``<data_dir>/mnist1d`` when ``data_dir`` is set, else ``$XDG_CACHE_HOME/fl-compams/mnist1d``
    (``~/.cache/fl-compams/mnist1d`` without ``XDG_CACHE_HOME``). The file name carries the sample count and
    a SHA-256 of every generation argument (the package's arguments and templates, its version, the cache
    format), so any change gives a new file: ``mnist1d-n<num_samples>-<16 hex digits>.npz``.
    """
    return _mnist1d_path(data_dir, num_samples, _recipe_json(_mnist1d_recipe(num_samples)))


def _mnist1d_path(data_dir: str, num_samples: int, recipe: str) -> Path:
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return _mnist1d_cache_dir(data_dir) / f"mnist1d-n{int(num_samples)}-{digest}.npz"


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    """Run the package's ``make_dataset`` (offline) and return the cached arrays.

    ``make_dataset`` seeds NumPy's and Python's global RNGs with the data seed; their states are restored
    afterwards so loading the data set has no side effect on the process.
    """
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # The package draws from the legacy global RNGs; save and restore them.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        ds = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x": np.ascontiguousarray(ds["x"], dtype=np.float32),
        "y": np.ascontiguousarray(ds["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(ds["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(ds["y_test"], dtype=np.int64),
    }


def _mnist1d_sizes(args: dict) -> tuple[int, int]:
    """(train, test) sizes ``make_dataset`` produces: ``num_samples // 10`` per class, cut at ``train_split``."""
    total = 10 * (int(args["num_samples"]) // 10)
    n_train = int(total * args["train_split"])
    return n_train, total - n_train


def _read_mnist1d_cache(path: Path, recipe: str, sizes: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a warning unless the file is simply absent) if unusable."""
    if not path.is_file():
        return None
    problem = None
    try:
        with path.open("rb") as f:  # closed here even when numpy fails half-way
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                problem = "not an .npz archive"
            else:
                with loaded as npz:
                    missing = [k for k in (*MNIST1D_ARRAYS, "recipe") if k not in npz.files]
                    if missing:
                        problem = f"missing arrays {missing}"
                    else:
                        arrays = {k: npz[k] for k in MNIST1D_ARRAYS}
                        stored = npz["recipe"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None:
        if stored.dtype.kind != "U" or stored.shape != () or str(stored) != recipe:
            problem = "from other generation arguments"
        else:
            problem = _check_mnist1d_arrays(arrays, sizes)
    if problem is None:
        return arrays
    warnings.warn(
        f"MNIST-1D cache {path} is {problem}; generating the data set again and replacing the file.",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def _check_mnist1d_arrays(arrays: dict[str, np.ndarray], sizes: tuple[int, int]) -> str | None:
    """What is wrong with MNIST-1D arrays (shapes, dtypes, values), or None."""
    for split, n in (("", sizes[0]), ("_test", sizes[1])):
        x, y = arrays[f"x{split}"], arrays[f"y{split}"]
        if x.dtype != np.float32 or x.shape != (n, MNIST1D_LENGTH) or not np.isfinite(x).all():
            return f"damaged (x{split}: {x.dtype} {x.shape}, expected finite float32 ({n}, {MNIST1D_LENGTH}))"
        if y.dtype != np.int64 or y.shape != (n,) or (n and (y.min() < 0 or y.max() > 9)):
            return f"damaged (y{split}: {y.dtype} {y.shape}, expected int64 ({n},) labels in 0..9)"
    return None


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_mnist1d(data_dir: str, download: bool, num_samples: int = MNIST1D_DEFAULT_SAMPLES) -> DataBundle:
    """Load MNIST-1D from its cache, generating (and caching) it first if needed; ``download`` is ignored."""
    del download  # generated locally: nothing to fetch
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"mnist1d-samples must be an int >= 10, got {num_samples!r}.")
    recipe = _mnist1d_recipe(num_samples)
    text = _recipe_json(recipe)
    path = _mnist1d_path(data_dir, num_samples, text)
    sizes = _mnist1d_sizes(recipe["args"])
    arrays = _read_mnist1d_cache(path, text, sizes)
    if arrays is None:
        log.info("generating MNIST-1D with %d samples (cached in %s)", num_samples, path)
        arrays = _generate_mnist1d(recipe["args"])
        problem = _check_mnist1d_arrays(arrays, sizes)
        if problem is not None:  # the package changed what it generates: say so rather than train on it
            raise DataError(f"mnist1d's make_dataset returned arrays that are {problem}.")
        try:
            _write_npz_atomic(path, {**arrays, "recipe": np.array(text)})
        except OSError as exc:
            warnings.warn(
                f"Could not cache MNIST-1D in {path} ({type(exc).__name__}: {exc}); it will be generated "
                "again next time. Set data-dir to a writable directory.",
                RuntimeWarning,
                stacklevel=3,
            )

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x[:, None, :]))

    return DataBundle(
        name="mnist1d",
        train_x=tensor(arrays["x"]),
        train_y=torch.from_numpy(arrays["y"]),
        test_x=tensor(arrays["x_test"]),
        test_y=torch.from_numpy(arrays["y_test"]),
        num_classes=10,
        input_shape=(1, MNIST1D_LENGTH),
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
    "mnist1d": _load_mnist1d,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
}


def available_datasets() -> tuple[str, ...]:
    """Return the names :func:`load_dataset` accepts."""
    return tuple(_LOADERS)


def load_dataset(
    name: str, data_dir: str = "", download: bool = False, *, mnist1d_samples: int = MNIST1D_DEFAULT_SAMPLES
) -> DataBundle:
    """Load a data set by name.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`: ``"digits"`` (embedded, the default), ``"mnist1d"`` (generated),
        ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
    data_dir : str, default ""
        Directory holding the downloaded data sets; ignored for ``"digits"``, required for the downloaded
        ones; for ``"mnist1d"`` the optional cache location (``<data_dir>/mnist1d``).
    download : bool, default False
        Fetch missing files into ``data_dir``. Nothing is ever downloaded unless this is true (and ``"digits"``
        and ``"mnist1d"`` never download anything).
    mnist1d_samples : int, default 5000
        Number of MNIST-1D examples to generate (train + test); ignored by the other data sets.

    Returns
    -------
    DataBundle
        Normalised ``float32`` inputs and ``int64`` labels for train and test; no validation split.

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
    if name == "mnist1d":
        return _load_mnist1d(data_dir, download, mnist1d_samples)
    return loader(data_dir, download)


# --------------------------------------------------------------------------------------------------- validation


def hold_out_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """Move a seeded, stratified ``fraction`` of the training set into the validation split.

    Per class c, ``round(fraction * n_c)`` training examples are drawn with
    ``np.random.default_rng([seed, VALIDATION_SPLIT_STREAM])`` and moved to ``val_x``/``val_y``; the rest stay
    in ``train_x``/``train_y``, in their original order. The test set and the normalisation (computed from
    the data set's whole training split) are unchanged, so the validation examples are preprocessed exactly
    like the others. The same ``(bundle, fraction, seed)`` always gives the same split.

    Parameters
    ----------
    bundle : DataBundle
        A bundle without a validation split.
    fraction : float
        Share of the training set to hold out, in ``[0, 0.5]``. 0 returns ``bundle`` itself.
    seed : int
        The run seed (``>= 0``).

    Returns
    -------
    DataBundle
        A new bundle (or ``bundle`` when ``fraction`` is 0).

    Raises
    ------
    ValueError
        If ``fraction`` or ``seed`` is out of range, or ``bundle`` already has a validation split.
    """
    if isinstance(fraction, bool) or not (0.0 <= fraction <= MAX_VALIDATION_FRACTION):
        raise ValueError(
            f"validation-fraction must be a number in [0, {MAX_VALIDATION_FRACTION}], got {fraction!r}."
        )
    if fraction == 0.0:
        return bundle
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    if bundle.num_val:
        raise ValueError(f"DataBundle {bundle.name!r} already has a validation split of {bundle.num_val}.")
    rng = np.random.default_rng([int(seed), VALIDATION_SPLIT_STREAM])
    train_idx, val_idx = _stratified_split(bundle.train_y.numpy(), fraction, rng)
    keep, held = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return dataclasses.replace(
        bundle,
        train_x=bundle.train_x[keep],
        train_y=bundle.train_y[keep],
        val_x=bundle.train_x[held],
        val_y=bundle.train_y[held],
    )
