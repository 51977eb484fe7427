"""dfc-oracle's reference model and judge: what computes and judges.

- :func:`run` — the NumPy reference model of a whole ``dispatch_ffn_combine`` call.
- :func:`compare` / :func:`check_implementation` — judge an implementation against it.
"""

from oracle.check.harness import ConformanceError, check_implementation, evaluate
from oracle.judge.verdict import Verdict, compare
from oracle.model.numerics import Numerics
from oracle.model.reference import RankResult, ReceiveLayout, Result, Trace, run

__all__ = [
    "ConformanceError",
    "Numerics",
    "RankResult",
    "ReceiveLayout",
    "Result",
    "Trace",
    "Verdict",
    "check_implementation",
    "compare",
    "evaluate",
    "run",
]
