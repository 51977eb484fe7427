"""The routing contract of GPU MoE stacks (``spec.placement``, ``oracle.model.routing``):
every error path, the placement invariants as checks (each shown failing on a planted
violation), the identity case (a placed call with the defaults is the plain problem), and the
metamorphic properties of the reference, each shown failing on the mutant whose bug it guards.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import spec.placement
from oracle.model.routing import run_placed
from spec import ExpertIdError, OpConfig, RankInputs, ShapeError, SpecError, random_problem
from spec.errors import PlacementError
from spec.placed_strategies import placed_calls, placements
from spec.placement import (
    PlacedCall,
    Placement,
    RoutingWeights,
    SharedExperts,
    check_local_map,
    check_log2phy,
    check_replicas,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a plain folder
    sys.path.insert(0, str(ROOT))

from benchmarks.mutants.placement import PLACED_MUTANTS, placed_correct  # noqa: E402

SMALL = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
BASE = OpConfig(ep_size=2, experts_per_rank=2, top_k=2, hidden=32, intermediate=16,
                tokens_per_rank=(3, 2))


def ranks(cfg: OpConfig = BASE, **changes: Any) -> list[RankInputs]:
    return [dataclasses.replace(r, **changes) for r in random_problem(cfg, seed=0).ranks]


def shared(n: int = 1, cfg: OpConfig = BASE, **changes: Any) -> SharedExperts:
    one = random_problem(dataclasses.replace(cfg, ep_size=1, experts_per_rank=n,
                                             tokens_per_rank=(0,)), seed=1).ranks[0]
    lists = {"w1": list(one.w1), "w2": list(one.w2), "scale1": list(one.scale1 or ()),
             "scale2": list(one.scale2 or ())}
    return SharedExperts(lists={**lists, **changes})


def placement(**changes: Any) -> Placement:
    fields = {"phy2log": np.array([0, 1, 2, 0]), "num_logical": 3, "ep_size": 2}
    return Placement(**{**fields, **changes})


# ---- every raise of spec/placement.py, and what its message says --------------------------

CASES: list[tuple[str, type[SpecError], str, str, Callable[[], object]]] = [
    ("phy2log not ints", PlacementError, "phy2log", "integer array",
     lambda: placement(phy2log=np.array([0.0, 1.0]))),
    ("num_logical 0", PlacementError, "num_logical", "int >= 1", lambda: placement(num_logical=0)),
    ("EP 33", PlacementError, "ep_size", "1..32",
     lambda: placement(phy2log=np.arange(33), num_logical=33, ep_size=33)),
    ("P % EP", PlacementError, "phy2log", "multiple of EP", lambda: placement(ep_size=3)),
    ("P < logical", PlacementError, "phy2log", "P >= num_logical",
     lambda: placement(num_logical=5)),
    ("layer", PlacementError, "layer", "0..0", lambda: placement(layer=1)),
    ("stale id", PlacementError, "phy2log[0, 3]", "logical id 0..2",
     lambda: placement(phy2log=np.array([0, 1, 2, 3]))),
    ("expert without slot", PlacementError, "phy2log[0]", "at least one",
     lambda: placement(phy2log=np.array([0, 1, 0, 0]))),
    ("choice name", PlacementError, "replica_choice", "'token' or 'rank'",
     lambda: placement(replica_choice="hash")),
    ("dispatch name", PlacementError, "dispatch", "'all_to_all'",
     lambda: placement(dispatch="broadcast")),
    ("rank choice without all-to-all", PlacementError, "replica_choice", "rank-independent",
     lambda: placement(replica_choice="rank", dispatch="all_gather")),
    ("log2phy shape", PlacementError, "log2phy", "(3, X)",
     lambda: check_log2phy(placement(), np.zeros((2, 2), int))),
    ("log2phy not inverse", PlacementError, "log2phy[0]", "slots [0, 3]",
     lambda: check_log2phy(placement(), np.array([[0, -1], [1, 3], [2, -1]]))),
    ("local map shape", PlacementError, "expert_map", "(4,)",
     lambda: check_local_map(placement(), 0, np.zeros(3, int))),
    ("local map range (PR #4793)", PlacementError, "expert_map[3]", "0..1",
     lambda: check_local_map(placement(), 1, np.array([-1, -1, 0, 2]))),
    ("local index twice", PlacementError, "expert_map", "used once",
     lambda: check_local_map(placement(), 1, np.array([-1, -1, 0, 0]))),
    ("another path's map (PR #5806)", PlacementError, "expert_map[2]", "placement's own",
     lambda: check_local_map(placement(), 1, np.array([-1, -1, 1, 0]))),
    ("replica tensor shape", PlacementError, "scale1", "(P = 4",
     lambda: check_replicas(placement(), {"scale1": np.zeros((3, 2))})),
    ("scales moved without weights (PR #47588)", PlacementError, "scale1[slot 3]",
     "bit-identical", lambda: check_replicas(
         placement(), {"scale1": np.array([[1.0], [2.0], [3.0], [1.5]])})),
    ("renormalize not bool", PlacementError, "renormalize", "True or False",
     lambda: RoutingWeights(renormalize=1)),  # type: ignore[arg-type]
    ("rsf 0", PlacementError, "routed_scaling_factor", "finite float > 0",
     lambda: RoutingWeights(routed_scaling_factor=0.0)),
    ("ids 1-D (Problem's check)", ShapeError, "expert_idx", "(M, top_k)",
     lambda: PlacedCall(ranks(expert_idx=np.zeros(3, np.int64)))),
    ("ids int16", ExpertIdError, "expert_idx", "int32 or int64",
     lambda: PlacedCall([dataclasses.replace(r, expert_idx=r.expert_idx.astype(np.int16))
                         for r in ranks()])),
    ("id -2", ExpertIdError, "expert_idx[0, 1]", "-1 for a slot routed nowhere",
     lambda: PlacedCall([dataclasses.replace(r, expert_idx=np.where(
         np.arange(r.expert_idx.size).reshape(r.expert_idx.shape) == 1, -2, r.expert_idx))
         for r in ranks()])),
    ("placement type", PlacementError, "placement", "Placement or None",
     lambda: PlacedCall(ranks(), placement="identity")),  # type: ignore[arg-type]
    ("placement vs weights", PlacementError, "placement", "2 slots each",
     lambda: PlacedCall(ranks(), placement=Placement.identity(8, 2))),
    ("weights on input, top_k 2", PlacementError, "weights.on_input", "top_k = 1",
     lambda: PlacedCall(ranks(), weights=RoutingWeights(on_input=True))),
    ("shared with weights on input", PlacementError, "shared", "no shared experts",
     lambda: PlacedCall(ranks(dataclasses.replace(BASE, top_k=1)), shared=shared(),
                        weights=RoutingWeights(on_input=True))),
    ("shared type", PlacementError, "shared", "SharedExperts",
     lambda: PlacedCall(ranks(), shared=SharedExperts())),
    ("shared unknown list", PlacementError, "shared.w3", "w1",
     lambda: PlacedCall(ranks(), shared=shared(w3=[np.zeros(1)]))),
    ("shared K", PlacementError, "shared.weight1", "K = 32",
     lambda: PlacedCall(ranks(), shared=shared(w1=[np.zeros((1, 16, 32), np.int8)]))),
    ("shared I", PlacementError, "shared (intermediate size I)", "16 as the routed",
     lambda: PlacedCall(ranks(), shared=shared(cfg=dataclasses.replace(BASE, intermediate=8)))),
    ("record fields", PlacementError, "placement record", "exactly the fields",
     lambda: from_record(fields={"layer": 0}, whole=True)),
    ("record field type", PlacementError, "placement record.on_input", "a JSON bool",
     lambda: from_record(fields={"on_input": 1})),
    ("record array missing", PlacementError, "placement record", "the arrays",
     lambda: from_record(drop="placement.phy2log")),
    ("record stray shared array", PlacementError, "shared.w1.3", "shared.{field}.{i}",
     lambda: from_record(arrays={"shared.w1.3": np.zeros(1)})),
    ("record shared flag", PlacementError, "placement record.shared", "False",
     lambda: from_record(fields={"shared": True})),
]


def from_record(fields: dict[str, object] | None = None, arrays: dict[str, object] | None = None,
                drop: str | None = None, whole: bool = False) -> PlacedCall:
    """:meth:`PlacedCall.from_record` of a plain call's record, edited (``whole``: ``fields``
    replaces its fields)."""
    call = PlacedCall(ranks())
    given, record = call.record()
    edited = fields if whole else {**given, **(fields or {})}
    record = {k: a for k, a in {**record, **(arrays or {})}.items() if k != drop}
    return PlacedCall.from_record(call.problem.ranks, edited, record)  # type: ignore[arg-type]


def raise_line(make: Callable[[], object], error: type[SpecError], field: str,
               allowed: str) -> int:
    with pytest.raises(error) as info:
        make()
    err = info.value
    where = f"rank {err.rank}, " if err.rank is not None else ""
    assert str(err) == f"{where}{err.field}: got {err.given}; allowed: {err.allowed}. " \
                       f"Fix: {err.fix}"
    assert err.field.startswith(field), f"field {err.field!r}, want {field!r}"
    assert allowed in err.allowed, f"allowed {err.allowed!r} lacks {allowed!r}"
    tb = info.tb
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == spec.placement.__file__:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@pytest.mark.parametrize("name, error, field, allowed, make", CASES, ids=[c[0] for c in CASES])
def test_error(name: str, error: type[SpecError], field: str, allowed: str,
               make: Callable[[], object]) -> None:
    raise_line(make, error, field, allowed)


def test_every_raise_site_has_a_case() -> None:
    source = Path(spec.placement.__file__).read_text()
    sites = {(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(source))
             if isinstance(n, ast.Raise)}
    hit = {raise_line(make, error, field, allowed) for _, error, field, allowed, make in CASES}
    missing = [s for s in sites if not any(s[0] <= line <= (s[1] or s[0]) for line in hit)]
    assert not missing, f"raise statements without a case (lines): {sorted(missing)}"


# ---- the invariants as checks pass on the placement's own data ----------------------------

def test_checks_accept_the_placements_own_maps() -> None:
    pl = placement()
    check_log2phy(pl, pl.log2phy())
    for r in range(pl.ep_size):
        check_local_map(pl, r, pl.local_map(r))
    check_replicas(pl, {"scale1": np.array([[1.0], [2.0], [3.0], [1.0]])})
    assert pl.log2phy().tolist() == [[0, 3], [1, -1], [2, -1]]


# ---- the identity case: nothing existing changes -------------------------------------------

@pytest.mark.parametrize("numerics", ["faithful", "vllm-triton", "ideal"])
def test_identity_call_is_the_plain_problem(numerics: str) -> None:
    problem = random_problem(BASE, seed=3)
    plain = oracle.run(problem, numerics=numerics)
    placed = run_placed(PlacedCall(problem.ranks), numerics=numerics)
    for a, b in zip(plain.ranks, placed.ranks):
        assert a.out.tobytes() == b.out.tobytes()
        assert (a.expert_token_nums == b.expert_token_nums).all()


# ---- metamorphic properties of the reference ------------------------------------------------

def outs(impl: Callable[[PlacedCall], Any], call: PlacedCall) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64) for o, _ in impl(call)])


def reference(call: PlacedCall) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(r.out, r.expert_token_nums) for r in run_placed(call).ranks]


def regrouped(call: PlacedCall, ep: int) -> PlacedCall:
    """The same tokens, logical experts and slots on ``ep`` ranks (P % ep == 0)."""
    pl, cfg = call.placement, call.config
    e = pl.slots // ep
    tokens = np.concatenate([r.x for r in call.problem.ranks])
    ids = np.concatenate(call.logical)
    probs = np.concatenate([r.probs for r in call.problem.ranks])
    slot_lists = {name: np.concatenate([np.stack([r.expert_lists(j)[name]
                                                  for j in range(cfg.experts_per_rank)])
                                        for r in call.problem.ranks])
                  for name in call.problem.ranks[0].expert_lists(0)}
    cut = np.linspace(0, tokens.shape[0], ep + 1).astype(int)
    new = [RankInputs(x=tokens[a:b], expert_idx=ids[a:b], probs=probs[a:b],
                      **{n: [w[r * e:(r + 1) * e]] for n, w in slot_lists.items()})
           for r, (a, b) in enumerate(itertools.pairwise(cut))]
    return PlacedCall(new, placement=dataclasses.replace(pl, ep_size=ep), weights=call.weights,
                      shared=call.shared, swiglu_limit=cfg.swiglu_limit,
                      swiglu_alpha=cfg.swiglu_alpha)


@SMALL
@given(placed_calls(placements=placements(max_ep=8)))
def test_out_invariant_under_ep(call: PlacedCall) -> None:
    """EP = n ≡ EP = 1: the same call on one rank gives the same rows, bit for bit."""
    if call.placement.replica_choice == "rank":
        return  # the rank choice picks other replicas at other EP: counts differ, out not
    assert outs(reference, call).tobytes() == outs(reference, regrouped(call, 1)).tobytes()


def test_ep_invariance_fails_on_shared_per_rank() -> None:
    call = _call_with(shared=shared(), ep=2)
    one = regrouped(call, 1)
    mutant = PLACED_MUTANTS["shared_per_rank"]
    assert np.allclose(outs(placed_correct, call), outs(placed_correct, one))
    assert not np.allclose(outs(mutant, call), outs(mutant, one), rtol=0.05, atol=0.05)


@SMALL
@given(placed_calls(placements=placements(max_ep=8)))
def test_out_invariant_under_replica_choice(call: PlacedCall) -> None:
    """With all-to-all, any replica choice computes the same rows (replicas are identical)."""
    pl = call.placement
    if pl.dispatch != "all_to_all":
        return
    other = "rank" if pl.replica_choice == "token" else "token"
    again = _rebuilt(call, placement=dataclasses.replace(pl, replica_choice=other))
    assert outs(reference, call).tobytes() == outs(reference, again).tobytes()


@SMALL
@given(placed_calls(placements=placements(max_ep=8), shared=st.just(0)))
def test_out_linear_in_routing_weights(call: PlacedCall) -> None:
    """``out(2·p) = 2·out(p)`` in the float64 mathematics, exactly (a power of two commutes
    with every rounding there): rsf = 2 doubles the routed part, once."""
    w = call.weights
    doubled = _rebuilt(call, weights=dataclasses.replace(
        w, routed_scaling_factor=2 * w.routed_scaling_factor))
    assert (combined(doubled) == 2 * combined(call)).all()


def combined(call: PlacedCall) -> np.ndarray:
    """The ideal model's combine result of every token, float64, before the cast."""
    return np.concatenate(run_placed(call, numerics="ideal").result.trace.combined)


def test_linearity_fails_on_rsf_twice() -> None:
    call = _call_with(weights=RoutingWeights(routed_scaling_factor=1.0))
    doubled = _rebuilt(call, weights=RoutingWeights(routed_scaling_factor=2.0))
    mutant = PLACED_MUTANTS["rsf_twice"]
    assert (outs(placed_correct, doubled) == 2 * outs(placed_correct, call)).all()
    assert not (outs(mutant, doubled) == 2 * outs(mutant, call)).all()


@SMALL
@given(placed_calls(placements=placements(max_ep=8), shared=st.just(1)))
def test_shared_expert_adds_its_own_output(call: PlacedCall) -> None:
    """``out(routed + shared) − out(routed) = shared(x)`` in the float64 mathematics."""
    with_shared = run_placed(call, numerics="ideal").result.trace.combined
    alone = run_placed(_rebuilt(call, shared=None),
                       numerics="ideal").result.trace.combined
    x = np.concatenate([r.x for r in call.problem.ranks]).astype(np.float64)
    assert call.shared is not None
    want = _ffn64(x, {n: np.asarray(v[0])[0] for n, v in call.shared.lists.items()})
    got = np.concatenate(with_shared) - np.concatenate(alone)
    assert np.allclose(got, want, rtol=1e-9, atol=1e-9 * (1 + np.abs(want).max(initial=0)))


def test_shared_property_fails_on_shared_per_rank() -> None:
    call = _call_with(shared=shared(), ep=2)
    bare = _rebuilt(call, shared=None)
    x = np.concatenate([r.x for r in call.problem.ranks]).astype(np.float64)
    assert call.shared is not None
    want = _ffn64(x, {n: np.asarray(v[0])[0] for n, v in call.shared.lists.items()})
    mutant = PLACED_MUTANTS["shared_per_rank"]
    for impl, holds in ((placed_correct, True), (mutant, False)):
        diff = outs(impl, call) - outs(impl, bare)
        assert np.allclose(diff, want, rtol=0.05, atol=0.1) is holds


# ---- helpers ---------------------------------------------------------------------------------

def _ffn64(x: np.ndarray, lists: dict[str, np.ndarray]) -> np.ndarray:
    w1 = lists["w1"].astype(np.float64) * lists.get("scale1", 1.0)
    w2 = lists["w2"].astype(np.float64) * lists.get("scale2", 1.0)
    h = x @ w1
    i = w2.shape[0]
    return np.asarray(h[:, :i] / (1 + np.exp(-h[:, :i])) * h[:, i:] @ w2)


def _rebuilt(call: PlacedCall, **changes: Any) -> PlacedCall:
    """``call`` again (its logical ids), with ``PlacedCall`` keywords changed."""
    cfg = call.config
    keywords: dict[str, Any] = {"placement": call.placement, "weights": call.weights,
                                "shared": call.shared, "swiglu_limit": cfg.swiglu_limit,
                                "swiglu_alpha": cfg.swiglu_alpha, **changes}
    return PlacedCall([dataclasses.replace(r, expert_idx=ids)
                       for r, ids in zip(call.problem.ranks, call.logical)], **keywords)


def _call_with(ep: int = 1, **keywords: Any) -> PlacedCall:
    cfg = dataclasses.replace(BASE, ep_size=ep, tokens_per_rank=(3,) * ep)
    return PlacedCall(ranks(cfg), **keywords)
