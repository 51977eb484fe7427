"""A kernel whose defect only real hidden sizes reach, for the model-shape presets' tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import oracle
from spec import Problem

#: Columns the defective K loop covers (a hard-coded tile count); the search's K stays below.
K_TILES_COVER = 1024


def k_loop_stops_early(problem: Problem) -> list[tuple[Any, Any]]:
    """GEMM1 reads only the first 1024 columns of x: right at every K <= 1024."""
    ranks = []
    for r in problem.ranks:
        x = np.array(r.x)
        x[:, K_TILES_COVER:] = 0
        ranks.append(dataclasses.replace(r, x=x))
    result = oracle.run(Problem.from_validated(ranks, problem.config))
    return [(r.out, r.expert_token_nums) for r in result.ranks]
