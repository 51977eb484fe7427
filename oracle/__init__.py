"""dfc-oracle's reference model and judge: what computes and judges.

- :func:`run` — the NumPy reference model of a whole ``dispatch_ffn_combine`` call.
- :func:`compare` / :func:`check_implementation` — judge an implementation against it.
- :func:`compare_dispatch`, :func:`compare_experts`, :func:`compare_combine` /
  :func:`check_stage` — judge one stage of the modular split (:mod:`spec.modular`).
"""

from oracle.check.harness import ConformanceError, check_implementation, evaluate
from oracle.check.modular import StageConformanceError, check_stage
from oracle.judge.modular import compare_combine, compare_dispatch, compare_experts
from oracle.judge.verdict import Verdict, compare
from oracle.model.numerics import Numerics
from oracle.model.reference import RankResult, ReceiveLayout, Result, Trace, run

__all__ = [
    "ConformanceError",
    "Numerics",
    "RankResult",
    "ReceiveLayout",
    "Result",
    "StageConformanceError",
    "Trace",
    "Verdict",
    "check_implementation",
    "check_stage",
    "compare",
    "compare_combine",
    "compare_dispatch",
    "compare_experts",
    "evaluate",
    "run",
]
