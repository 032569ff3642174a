"""Compression operators C: R^d -> R^d, one module per family, all registered in :mod:`.base`.

References: Li, Karimi & Li, "On Distributed Adaptive Optimization with Gradient Compression" (ICLR 2022):
Top-k is Definition 1 (:mod:`.sparse`) and Block-Sign is Definition 2 (:mod:`.blocksign`); baselines as cited
in their modules. Importing this package registers the built-ins.
"""

from fl_compams.compressors.base import (
    COMPRESSORS,
    INDEX_CODINGS,
    VALUE_DTYPES,
    Compressor,
    Kind,
    Payload,
    make_compressor,
    register,
    registered,
    unregister,
)
from fl_compams.compressors.blocksign import BlockSign, BlockSignPayload
from fl_compams.compressors.identity import DensePayload, Identity
from fl_compams.compressors.laq import LAQPayload, LAQQuantizer
from fl_compams.compressors.qsgd import QSGD, QSGDPayload
from fl_compams.compressors.qsgd_topk import QSGDTopK, QSGDTopKPayload
from fl_compams.compressors.sign import Sign, SignPayload
from fl_compams.compressors.signtopk import SignSparsePayload, SignTopK
from fl_compams.compressors.sparse import MVSS, SPARSE_KINDS, RandK, SparsePayload, TopK

__all__ = [
    "COMPRESSORS",
    "INDEX_CODINGS",
    "MVSS",
    "QSGD",
    "SPARSE_KINDS",
    "VALUE_DTYPES",
    "BlockSign",
    "BlockSignPayload",
    "Compressor",
    "DensePayload",
    "Identity",
    "Kind",
    "LAQPayload",
    "LAQQuantizer",
    "Payload",
    "QSGDPayload",
    "QSGDTopK",
    "QSGDTopKPayload",
    "RandK",
    "Sign",
    "SignPayload",
    "SignSparsePayload",
    "SignTopK",
    "SparsePayload",
    "TopK",
    "make_compressor",
    "register",
    "registered",
    "unregister",
]
