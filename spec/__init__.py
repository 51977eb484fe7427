"""dfc-oracle's executable specification of ``dispatch_ffn_combine``: what is right.

The data model (:class:`RankInputs`, :class:`Problem`, :class:`OpConfig`), its validation
(:class:`SpecError` and subclasses), and — in submodules — buffer sizes (``spec.buffers``), the
count-row layout (``spec.layout``), platform limits (``spec.limits``) and Hypothesis strategies
(``spec.strategies``).
"""

from spec.config import MAX_EP_SIZE, OpConfig
from spec.errors import (
    AmbiguousTensorList,
    BiasError,
    ConfigError,
    CounterexampleFileError,
    DTypeError,
    ExpertIdError,
    HcclBufferTooSmall,
    MaskError,
    NonFiniteError,
    RankCountError,
    ShapeError,
    SpecError,
    TensorListError,
)
from spec.problem import DTYPES, Problem, RankInputs
from spec.synth import random_problem

__all__ = [
    "DTYPES",
    "MAX_EP_SIZE",
    "AmbiguousTensorList",
    "BiasError",
    "ConfigError",
    "CounterexampleFileError",
    "DTypeError",
    "ExpertIdError",
    "HcclBufferTooSmall",
    "MaskError",
    "NonFiniteError",
    "OpConfig",
    "Problem",
    "RankCountError",
    "RankInputs",
    "ShapeError",
    "SpecError",
    "TensorListError",
    "random_problem",
]
