"""Flat parameter vectors: one float32 vector for the trainable tensors of a model, and back.

The core only ever sees ``float32[d]`` (design.md section 3). A :class:`ParamSpec` records what is needed to go
back to named tensors: names, shapes, dtypes, which tensors are trainable, and the Block-Sign block boundaries
(one block per trainable tensor, Li, Karimi & Li, Definition 2). Non-trainable buffers (e.g. BatchNorm running
statistics) are kept out of the flat vector: they travel dense and are never compressed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ParamSpec", "flatten", "unflatten"]

TensorLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes, dtypes and trainable flags of a model's tensors, in state-dict order.

    Attributes
    ----------
    names, shapes, dtypes, trainable
        One entry per tensor. ``dtypes`` are torch dtype names (``"float32"``).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    trainable: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.shapes) == len(self.dtypes) == len(self.trainable) == n):
            raise ValueError(
                f"ParamSpec fields must have one entry per tensor: names={n}, shapes={len(self.shapes)}, "
                f"dtypes={len(self.dtypes)}, trainable={len(self.trainable)}"
            )
        if len(set(self.names)) != n:
            raise ValueError(f"ParamSpec names must be unique, got {self.names}")

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamSpec:
        """Spec of ``module.state_dict()``; a tensor is trainable if it is a parameter with ``requires_grad``."""
        trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}
        return cls.from_tensors(module.state_dict(), trainable_names)

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, TensorLike], trainable_names: set[str] | None = None
    ) -> ParamSpec:
        """Spec of named tensors or arrays; all floating tensors are trainable unless names are given."""
        names, shapes, dtypes, trainable = [], [], [], []
        for name, t in tensors.items():
            tt = torch.as_tensor(t) if isinstance(t, np.ndarray) else t
            names.append(name)
            shapes.append(tuple(int(s) for s in tt.shape))
            dtypes.append(str(tt.dtype).removeprefix("torch."))
            is_float = tt.is_floating_point()
            trainable.append(is_float if trainable_names is None else name in trainable_names)
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(trainable))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of every tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Sizes of the trainable tensors: the Block-Sign blocks, in flat-vector order."""
        return tuple(n for n, t in zip(self.sizes, self.trainable, strict=True) if t)

    @property
    def dim(self) -> int:
        """Length d of the flat trainable vector."""
        return sum(self.block_sizes)

    @property
    def buffer_dim(self) -> int:
        """Total number of elements of the non-trainable tensors."""
        return sum(n for n, t in zip(self.sizes, self.trainable, strict=True) if not t)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """Names of the non-trainable tensors (BatchNorm running statistics and counters), in state-dict order."""
        return tuple(n for n, t in zip(self.names, self.trainable, strict=True) if not t)

    def to_dict(self) -> dict:
        """JSON-serialisable form (for results files and checkpoints)."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "trainable": list(self.trainable),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ParamSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(data["names"]),
            tuple(tuple(int(x) for x in s) for s in data["shapes"]),
            tuple(data["dtypes"]),
            tuple(bool(x) for x in data["trainable"]),
        )


def flatten(tensors: Mapping[str, TensorLike], spec: ParamSpec, *, trainable: bool = True) -> torch.Tensor:
    """Concatenate the trainable (or, with ``trainable=False``, the buffer) tensors into one float32 vector.

    The vector lives on the device of the tensors. Missing names or wrong shapes raise ``ValueError``.
    """
    parts = []
    device = None
    for name, shape, is_trainable in zip(spec.names, spec.shapes, spec.trainable, strict=True):
        if is_trainable != trainable:
            continue
        if name not in tensors:
            raise ValueError(f"tensor {name!r} of the ParamSpec is missing; got keys {sorted(tensors)}")
        t = tensors[name]
        t = torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r}: expected shape {shape}, got {tuple(t.shape)}")
        device = t.device if device is None else device
        parts.append(t.detach().reshape(-1).to(device=device, dtype=torch.float32))
    if not parts:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def unflatten(vector: torch.Tensor, spec: ParamSpec, *, trainable: bool = True) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named tensors with the spec's shapes and dtypes (views where possible)."""
    expected = spec.dim if trainable else spec.buffer_dim
    if vector.ndim != 1 or vector.numel() != expected:
        raise ValueError(f"expected a flat vector of {expected} elements, got shape {tuple(vector.shape)}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape, dtype, size, is_trainable in zip(
        spec.names, spec.shapes, spec.dtypes, spec.sizes, spec.trainable, strict=True
    ):
        if is_trainable != trainable:
            continue
        out[name] = vector[offset : offset + size].reshape(shape).to(getattr(torch, dtype))
        offset += size
    return out
