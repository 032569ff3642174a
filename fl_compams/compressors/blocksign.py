r"""Block-Sign (Li, Karimi & Li, ICLR 2022, Definition 2): one sign bit per coordinate plus one scale per block.

Wire body: ``n_blocks u32 | block sizes u32[n_blocks] | scales f32[n_blocks] | signs ceil(dim/8)`` (packed
bits, 1 = non-negative, zero padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fl_compams.compressors.base import Compressor, Kind, Payload, check_vector, register
from fl_compams.errors import PayloadError
from fl_compams.kernels import blocksign_decode, blocksign_encode

if TYPE_CHECKING:
    from fl_compams.codec import Reader, Writer

__all__ = ["BlockSign", "BlockSignPayload"]


@dataclass(frozen=True, eq=False)
class BlockSignPayload(Payload):
    """Block-Sign payload: packed sign bits plus one scale per block.

    ``signs`` holds ``ceil(dim / 8)`` packed bytes (bit = 1 for x >= 0, so sign(0) = +1); ``scales[b]`` is
    ``||x_B||_1 / d_B``; ``block_sizes`` partition ``dim``.
    """

    dim: int
    block_sizes: tuple[int, ...]
    scales: torch.Tensor
    signs: torch.Tensor
    kind: int = Kind.BLOCKSIGN

    def decode(self) -> torch.Tensor:
        """Return ``sign(x_B) * scale_B`` for every block, concatenated."""
        return blocksign_decode(self.signs, self.scales, self.block_sizes, self.dim)

    def norm(self) -> float:
        """l2 norm of the decoded vector: ``sqrt(sum_B d_B scale_B^2)``."""
        sizes = torch.tensor(self.block_sizes, dtype=torch.float64)
        return float(torch.sqrt((sizes * self.scales.double().cpu() ** 2).sum()))

    def write_body(self, w: Writer) -> None:
        """``n_blocks | block sizes | scales | signs``."""
        w.u32(len(self.block_sizes))
        w.u32_array(self.block_sizes)
        w.f32(self.scales)
        w.raw(self.signs)

    @classmethod
    def read_body(cls, r: Reader, kind: int, dim: int) -> BlockSignPayload:
        """Block sizes positive, summing to dim and the model's; scales finite and >= 0; sign padding zero.

        The model's layout is ``r.block_sizes`` when the caller knows it. The decode cost grows with the number
        of blocks, so the layout is compared before the sizes are even read: a payload of d one-coordinate
        blocks is refused at its block count.
        """
        n_blocks = r.count("n_blocks", dim, minimum=1)
        expected = r.block_sizes
        if expected is not None and n_blocks != len(expected):
            raise PayloadError(
                f"block layout: expected the model's {len(expected)} blocks, got {n_blocks} blocks"
            )
        sizes = r.array(np.dtype("<u4"), n_blocks, "block sizes")
        if expected is not None and not np.array_equal(sizes, expected):
            at = int(np.flatnonzero(sizes != np.asarray(expected))[0])
            raise PayloadError(
                f"block layout: block {at} must have the model's size {expected[at]}, got {int(sizes[at])}"
            )
        total = int(sizes.sum(dtype=np.int64))
        if sizes.min() < 1 or total != dim:
            raise PayloadError(
                f"block sizes must be positive and sum to the dimension {dim}; got sum {total}, "
                f"min {int(sizes.min())}"
            )
        scales = r.f32(n_blocks, "scales")
        if bool((scales < 0).any()):
            raise PayloadError("block scales must be >= 0 (they are mean absolute values)")
        signs = r.bits(dim, "signs")
        return cls(dim, tuple(sizes.tolist()), scales, signs)


@register
@dataclass(frozen=True)
class BlockSign(Compressor):
    r"""Block-Sign (Li et al., Definition 2): ``C(x)_B = sign(x_B) ||x_B||_1 / d_B`` for every block B.

    Blocks are the model's trainable tensors (``ParamSpec.block_sizes``); ``block_sizes=None`` means one block.
    sign(0) = +1, so every coordinate is one bit. Exact error:
    :math:`\|C(x) - x\|^2 = \sum_B (\|x_B\|_2^2 - \|x_B\|_1^2 / d_B) \le (1 - \min_B 1/d_B)\|x\|^2`.
    Theory bits ``d + 32 N_blk``.
    """

    block_sizes: tuple[int, ...] | None = None
    name: ClassVar[str] = "blocksign"
    kind: ClassVar[int] = Kind.BLOCKSIGN
    payload_type: ClassVar[type[Payload]] = BlockSignPayload

    def __post_init__(self) -> None:
        if self.block_sizes is not None:
            sizes = tuple(int(b) for b in self.block_sizes)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"blocksign: block sizes must be positive, got {self.block_sizes}")
            object.__setattr__(self, "block_sizes", sizes)

    @classmethod
    def from_config(cls, values: Mapping[str, Any], block_sizes: tuple[int, ...] | None = None) -> BlockSign:
        """No keys: the blocks are the model's trainable tensors."""
        return cls(block_sizes=block_sizes)

    def blocks_for(self, dim: int) -> tuple[int, ...]:
        """Block sizes for a vector of length ``dim`` (checked against the configured blocks)."""
        if self.block_sizes is None:
            return (dim,)
        if sum(self.block_sizes) != dim:
            raise ValueError(
                f"blocksign: block sizes sum to {sum(self.block_sizes)} but the vector has {dim} "
                "elements; build the compressor from the model's ParamSpec.block_sizes"
            )
        return self.block_sizes

    def encode(self, x: torch.Tensor, rng: torch.Generator | None = None) -> BlockSignPayload:
        """Pack the signs and compute one l1-mean scale per block."""
        check_vector(x)
        blocks = self.blocks_for(x.numel())
        signs, scales = blocksign_encode(x, blocks)
        return BlockSignPayload(x.numel(), blocks, scales, signs)

    def theory_bits(self, dim: int) -> float:
        """``d + 32 N_blk``."""
        return float(dim + 32 * len(self.blocks_for(dim)))
