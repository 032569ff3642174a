"""Small models for the simulations, built by name.

All models map ``N x *input_shape`` float inputs (``N x C x H x W`` images, ``N x C x L`` 1-D signals) to
``N x num_classes`` logits. Only ``resnet18`` and ``digits-bn-cnn`` have buffers (BatchNorm running statistics):
in every other model each tensor in the state dict is a trainable parameter, so the flat vector the core
compresses is the whole model (design.md section 3); buffers travel beside it (:mod:`fl_compams.buffers`).

``digits-cnn``
    Two 3x3 same-padding convolutions, 2x2 max-pool, dropout, two linear layers; sized for 1x8x8 digits
    (about 151k parameters) and adapting to any ``C x H x W`` with ``H, W >= 2``.
``digits-bn-cnn``
    ``digits-cnn`` with a BatchNorm after each convolution (151,498 parameters and 194 buffer values on 1x8x8
    digits): the quick model with buffers, for tests and smoke runs of ``buffers = "average" | "local"``.
``mnist1d-cnn``
    The 1-D CNN of the MNIST-1D benchmarks (Greydanus 2020, ``ConvBase`` in the mnist1d repository's
    ``notebooks/models.py``): three stride-2 convolutions with 25 channels and ReLU, then one linear layer.
    5,210 parameters on 1 x 40 signals; adapts to any ``C x L`` with ``L >= 3``.
``mnist1d-mlp``
    The MLP of the MNIST-1D benchmarks (Greydanus 2020, ``MLP`` in the mnist1d repository): two hidden ReLU
    layers. Width 256 instead of the repository's 100, so that Top-k 1 % keeps a meaningful number of values
    (789 of 78,858 parameters on 1 x 40 signals, against 152 of 15,210).
``transformer``
    A small Transformer encoder classifier for 1-D signals (MNIST-1D sequences): the signal cut into patches
    of 4 samples, a linear patch embedding (dimension 32) plus a learned position embedding, two pre-norm
    encoder layers (4 heads, feed-forward 64, dropout 0.1), mean pooling, layer norm and a linear head.
    17,962 parameters on 1 x 40 signals.
``mnist-cnn``
    The MNIST CNN of the COMP-AMS paper (Li, Karimi & Li, "On Distributed Adaptive Optimization with Gradient
    Compression", ICLR 2022, arXiv:2205.05632): two convolutional and two fully connected layers with ReLU,
    and dropout 0.5 after the max-pooled convolutional block. Needs 28x28 images.
``cifar-cnn``
    The paper's "larger CNN with 3 convolutional layers" for CIFAR-10. Needs 32x32 images.
``resnet18``
    torchvision's ResNet-18 (He et al., CVPR 2016) with the usual CIFAR stem (a 3x3 stride-1 first convolution
    and no max-pool, as in kuangliu/pytorch-cifar and the federated CIFAR-10 studies that use it):
    11,173,962 parameters and 9,620 buffer values (20 BatchNorm layers) for 10 classes on 3x32x32 images.
    Adapts to any ``C x H x W`` with ``H, W >= 8`` (three stride-2 stages, then adaptive average pooling).
``logreg``
    Multinomial logistic regression (flatten + one linear layer) on any input shape: a convex model for exact
    tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["available_models", "build_model", "count_parameters", "default_model_for"]

Shape = tuple[int, ...]


def _require_rank(name: str, input_shape: Shape, rank: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``input_shape`` has ``rank`` dimensions (``layout`` names them)."""
    if len(input_shape) != rank:
        raise ValueError(
            f"Model {name!r} needs inputs of shape {layout}, got input_shape {tuple(input_shape)}. "
            "Use 'logreg' for any shape."
        )


def _require_spatial(name: str, input_shape: Shape, hw: tuple[int, int], hint: str) -> None:
    """Raise ``ValueError`` unless ``input_shape`` is ``(C, H, W)`` with image size ``hw``."""
    if len(input_shape) != 3 or tuple(input_shape[1:]) != hw:
        raise ValueError(
            f"Model {name!r} needs {hw[0]}x{hw[1]} images, got input_shape {tuple(input_shape)}. {hint}"
        )


def _digits_cnn(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the digits CNN: conv-conv-pool-dropout-fc-fc, 3x3 same-padding convolutions.

    conv(C->32, 3, pad 1), ReLU, conv(32->64, 3, pad 1), ReLU, maxpool 2, dropout 0.5, flatten,
    fc(64 * (H//2) * (W//2) -> 128), ReLU, fc(128 -> num_classes). On 1x8x8 this has 151,306 parameters for 10
    classes.
    """
    _require_rank("digits-cnn", input_shape, 3, "(C, H, W)")
    c, h, w = input_shape
    if h < 2 or w < 2:
        raise ValueError(
            f"Model 'digits-cnn' needs images of at least 2x2 (it max-pools by 2), got input_shape "
            f"{tuple(input_shape)}."
        )
    return nn.Sequential(
        nn.Conv2d(c, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(64 * (h // 2) * (w // 2), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _digits_bn_cnn(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the digits CNN with BatchNorm after each convolution (a small model with buffers)."""
    plain = _digits_cnn(num_classes, input_shape)
    conv1, conv2 = plain[0], plain[2]
    return nn.Sequential(
        conv1,
        nn.BatchNorm2d(conv1.out_channels),
        nn.ReLU(),
        conv2,
        nn.BatchNorm2d(conv2.out_channels),
        *plain[3:],
    )


def _mnist_cnn(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the COMP-AMS paper's MNIST CNN (Li, Karimi & Li, ICLR 2022, arXiv:2205.05632, experiments).

    The paper's text gives only the structure: two convolutional and two fully connected layers, ReLU, and
    dropout 0.5 after the max-pooled convolutional block. The layer widths appear only in a figure; the ones
    here follow the PyTorch MNIST example: conv(C->32, 3), ReLU, conv(32->64, 3), ReLU, maxpool 2,
    dropout 0.5, flatten, fc(9216 -> 128), ReLU, fc(128 -> num_classes).
    """
    _require_spatial(
        "mnist-cnn", input_shape, (28, 28), "Use 'digits-cnn' for 8x8 digits or 'logreg' for other sizes."
    )
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 32, kernel_size=3),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _cifar_cnn(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the CIFAR-10 CNN: "a larger CNN with 3 convolutional layers" (COMP-AMS paper, experiments).

    Three blocks of conv(3x3, pad 1), ReLU, maxpool 2 with 32, 64 and 128 channels, then flatten,
    dropout 0.5, fc(128 * 4 * 4 -> 256), ReLU, fc(256 -> num_classes).
    """
    _require_spatial(
        "cifar-cnn", input_shape, (32, 32), "Use 'digits-cnn' for 8x8 digits or 'mnist-cnn' for 28x28."
    )
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def _conv1d_length(length: int, kernel: int, stride: int = 2, padding: int = 1) -> int:
    """Output length of a ``Conv1d`` (dilation 1)."""
    return (length + 2 * padding - kernel) // stride + 1


def _mnist1d_cnn(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the MNIST-1D CNN, ``ConvBase`` of the mnist1d repository (``notebooks/models.py``).

    conv1d(C->25, 5, stride 2, pad 1), ReLU, conv1d(25->25, 3, stride 2, pad 1), ReLU,
    conv1d(25->25, 3, stride 2, pad 1), ReLU, flatten, fc(25 * L3 -> num_classes), where L3 is the length after
    the three convolutions (40 -> 19 -> 10 -> 5, so fc is 125 -> 10 as in the original). On 1 x 40 signals and
    10 classes: 150 + 1,900 + 1,900 + 1,260 = 5,210 parameters.
    """
    _require_rank("mnist1d-cnn", input_shape, 2, "(C, L), e.g. (1, 40) for MNIST-1D")
    c, length = input_shape
    out = _conv1d_length(_conv1d_length(_conv1d_length(length, 5), 3), 3)
    if out < 1:
        raise ValueError(
            f"Model 'mnist1d-cnn' needs signals of length >= 3 (three stride-2 convolutions), got input_shape "
            f"{tuple(input_shape)}."
        )
    channels = 25
    return nn.Sequential(
        nn.Conv1d(c, channels, kernel_size=5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * out, num_classes),
    )


def _mnist1d_mlp(num_classes: int, input_shape: Shape, hidden: int = 256) -> nn.Module:
    """Build the MNIST-1D MLP: flatten, fc(C*L -> 256), ReLU, fc(256 -> 256), ReLU, fc(256 -> num_classes)."""
    _require_rank("mnist1d-mlp", input_shape, 2, "(C, L), e.g. (1, 40) for MNIST-1D")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class _PatchTransformer(nn.Module):
    """Encoder-only Transformer over non-overlapping patches of a ``C x L`` signal (ViT-style, 1-D).

    Patches of ``patch`` samples (all channels) are embedded linearly, a learned position embedding is added,
    ``layers`` pre-norm encoder layers follow (pre-norm trains stably without warm-up at small scale), and the
    mean over positions goes through a layer norm to the linear head. No buffers: every state-dict entry is a
    trainable parameter, in ``parameters()`` order (the flat vector relies on it).
    """

    def __init__(
        self, num_classes: int, input_shape: Shape, *, patch: int = 4, dim: int = 32, layers: int = 2
    ) -> None:
        super().__init__()
        c, length = input_shape
        self.patch = patch
        self.tokens = math.ceil(length / patch)
        self.pad = self.tokens * patch - length  # right-pad the last patch with zeros
        self.embed = nn.Linear(c * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, self.tokens, dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, self.pad))
        n, c, _ = x.shape
        x = (
            x.reshape(n, c, self.tokens, self.patch)
            .permute(0, 2, 1, 3)
            .reshape(n, self.tokens, c * self.patch)
        )
        h = self.encoder(self.embed(x) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


def _transformer(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build the patch Transformer classifier for ``C x L`` signals (see :class:`_PatchTransformer`)."""
    _require_rank("transformer", input_shape, 2, "(C, L), e.g. (1, 40) for MNIST-1D")
    return _PatchTransformer(num_classes, input_shape)


def _resnet18(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build torchvision's ResNet-18 with the CIFAR stem: conv1 = 3x3, stride 1, padding 1, no bias; no max-pool.

    The replaced first convolution is initialised as torchvision initialises its convolutions (Kaiming normal,
    fan-out, ReLU), so the whole model follows one scheme; BatchNorm starts at weight 1, bias 0, running mean 0,
    running variance 1.
    """
    from torchvision.models import resnet18  # torchvision imports take ~1 s: only when this model is built

    _require_rank("resnet18", input_shape, 3, "(C, H, W), e.g. (3, 32, 32) for CIFAR-10")
    c, h, w = input_shape
    if h < 8 or w < 8:
        raise ValueError(
            f"Model 'resnet18' needs images of at least 8x8 (three stride-2 stages), got input_shape "
            f"{tuple(input_shape)}."
        )
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _logreg(num_classes: int, input_shape: Shape) -> nn.Module:
    """Build multinomial logistic regression: flatten, then one linear layer to the logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


# The only name -> model map. A builder takes (num_classes, input_shape).
_MODELS: dict[str, Callable[[int, Shape], nn.Module]] = {
    "digits-cnn": _digits_cnn,
    "digits-bn-cnn": _digits_bn_cnn,
    "mnist1d-cnn": _mnist1d_cnn,
    "mnist1d-mlp": _mnist1d_mlp,
    "transformer": _transformer,
    "mnist-cnn": _mnist_cnn,
    "cifar-cnn": _cifar_cnn,
    "resnet18": _resnet18,
    "logreg": _logreg,
}

_DEFAULT_FOR_DATASET = {
    "digits": "digits-cnn",
    "mnist1d": "mnist1d-cnn",
    "mnist": "mnist-cnn",
    "fashion-mnist": "mnist-cnn",
    "cifar10": "cifar-cnn",
}


def available_models() -> tuple[str, ...]:
    """Return the names :func:`build_model` accepts."""
    return tuple(_MODELS)


def default_model_for(dataset: str) -> str:
    """Return the default model name for a data set.

    Parameters
    ----------
    dataset : str
        A data set name (``"digits"``, ``"mnist1d"``, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``).

    Returns
    -------
    str
        ``"digits-cnn"``, ``"mnist1d-cnn"``, ``"mnist-cnn"`` or ``"cifar-cnn"``.

    Raises
    ------
    ValueError
        If the data set has no default model.
    """
    try:
        return _DEFAULT_FOR_DATASET[dataset]
    except KeyError:
        known = ", ".join(repr(k) for k in _DEFAULT_FOR_DATASET)
        raise ValueError(
            f"No default model for data set {dataset!r}; known data sets: {known}. Name a model explicitly."
        ) from None


def build_model(name: str, num_classes: int, input_shape: Shape, *, seed: int | None = None) -> nn.Module:
    """Build a model by name.

    Parameters
    ----------
    name : str
        One of :func:`available_models`: ``"digits-cnn"``, ``"digits-bn-cnn"``, ``"mnist1d-cnn"``, ``"mnist1d-mlp"``,
        ``"transformer"``, ``"mnist-cnn"``, ``"cifar-cnn"``, ``"resnet18"``, ``"logreg"``.
    num_classes : int
        Number of output logits (``>= 2``).
    input_shape : tuple of int
        Shape of one input, channels first: ``(C, H, W)`` for the image CNNs, ``(C, L)`` for
        ``"mnist1d-cnn"``, ``"mnist1d-mlp"`` and ``"transformer"``, any non-empty shape for ``"logreg"``.
    seed : int or None, default None
        If given, the initial weights are drawn from a CPU generator seeded with it, inside
        ``torch.random.fork_rng`` so the global torch RNG is left untouched; the same seed gives the same
        weights. If None, torch's global RNG is used (PyTorch's default initialisation).

    Returns
    -------
    torch.nn.Module
        A freshly initialised model on the CPU, in training mode (only ``"resnet18"`` and ``"digits-bn-cnn"``
        have buffers).

    Raises
    ------
    ValueError
        If ``name`` is unknown, ``num_classes < 2``, ``input_shape`` is not a non-empty tuple of positive ints,
        or the model cannot take that input shape (e.g. ``"mnist-cnn"`` on 8x8 images).
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        known = ", ".join(repr(k) for k in _MODELS)
        raise ValueError(f"Unknown model {name!r}; choose one of {known}.") from None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints (channels first), got {input_shape!r}."
        )
    if seed is None:
        return builder(num_classes, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes, shape)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
