"""Typed compressed payloads (re-exported): each payload class lives with its compressor family.

:class:`Payload` is the base class; a payload holds exactly the numbers that cross the network, decodes
without the compressor, and adds itself into a dense accumulator in place (``add_to``).
"""

from fl_compams.compressors import (
    INDEX_CODINGS,
    SPARSE_KINDS,
    BlockSignPayload,
    DensePayload,
    Kind,
    Payload,
    QSGDPayload,
    SignSparsePayload,
    SparsePayload,
)

__all__ = [
    "INDEX_CODINGS",
    "SPARSE_KINDS",
    "BlockSignPayload",
    "DensePayload",
    "Kind",
    "Payload",
    "QSGDPayload",
    "SignSparsePayload",
    "SparsePayload",
]
