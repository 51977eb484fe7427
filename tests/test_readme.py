"""The README's whole-call skeleton runs as written: it conforms to the default gate, and the
same code with one planted defect does not."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

from oracle import ConformanceError, check_implementation

README = Path(__file__).parents[1] / "README.md"
FAST = settings(max_examples=40, derandomize=True, database=None, deadline=None)


def _skeleton_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "def dispatch_ffn_combine(problem)" in b)


def _module(source: str, tmp_path: Path, name: str) -> ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("domain", ["kernel", "contract"])
def test_the_readme_skeleton_conforms(tmp_path: Path, domain: str) -> None:
    kernels = _module(_skeleton_source(), tmp_path, f"readme_kernels_{domain}")
    check_implementation(kernels.dispatch_ffn_combine, settings=FAST, save_dir=None,
                         domain=domain)


def test_the_readme_skeleton_with_a_planted_defect_fails(tmp_path: Path) -> None:
    source = _skeleton_source()
    planted = source.replace("acc = acc + y[s, t, k] * r.probs[t, k]", "acc = acc + y[s, t, k]")
    assert planted != source
    kernels = _module(planted, tmp_path, "readme_kernels_planted")
    with pytest.raises(ConformanceError, match="stage 'out'"):
        check_implementation(kernels.dispatch_ffn_combine, settings=FAST, save_dir=None)
