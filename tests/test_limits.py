"""Platform profiles (§9): every violated limit, actionable, and which real models hit it."""

from __future__ import annotations

from spec import OpConfig
from spec.errors import ConfigError
from spec.limits import (
    A3_W8A8,
    MC2_V1_A3,
    REAL_MODELS,
    Shape,
    check_supported,
    models_hitting,
)


def test_deepseek_on_two_a3_nodes_is_supported() -> None:
    deepseek = REAL_MODELS[0]
    assert check_supported(deepseek.shape(32), A3_W8A8) == []


def test_every_violation_is_reported_with_value_and_source() -> None:
    cfg = OpConfig(ep_size=32, experts_per_rank=1, top_k=1, hidden=9024, intermediate=9024,
                   tokens_per_rank=(1,) * 32)
    found = check_supported(cfg, A3_W8A8)
    assert [v.limit.name for v in found] == [
        "hidden <= 9000", "n <= hidden", "experts_per_rank >= 2"]
    assert all(isinstance(v.error, ConfigError) for v in found)
    assert "got 18048" in str(found[1]) and "PR #9528" in str(found[1])
    big = check_supported(Shape(ep_size=32, experts_per_rank=256, top_k=8, hidden=7168), A3_W8A8)
    assert [v.limit.name for v in big] == ["count matrix <= 1 MiB"]
    assert big[0].value == 1064960


def test_real_models_hitting_the_a3_limits() -> None:
    hits = models_hitting(A3_W8A8)
    n_le_k = hits["n <= hidden"]
    assert [line.split(":")[0] for line in n_le_k] == [
        "Qwen1.5-MoE-A2.7B", "Mixtral-8x7B", "gpt-oss-120b", "gpt-oss-20b", "Llama-4-Scout"]
    mixtral = next(line for line in n_le_k if line.startswith("Mixtral"))
    assert "got 28672" in mixtral and "<= hidden" in mixtral
    assert set(hits) == {"n <= hidden"}


def test_mc2_v1_a3_admits_only_h7168_models() -> None:
    hits = models_hitting(MC2_V1_A3)
    blocked = {line.split(":")[0] for line in hits["hidden == 7168"]}
    assert {m.name for m in REAL_MODELS} - blocked == {"DeepSeek-V3/R1", "Kimi K2"}
