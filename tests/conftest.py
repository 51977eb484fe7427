"""The project's own test suite runs under the deterministic ``dfc-ci`` profile (see
``oracle.config.settings``) unless ``--dfc-profile`` or ``DFC_PROFILE`` says otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hypothesis.internal.conjecture.providers as hypothesis_providers
import pytest
from hypothesis import settings

import oracle.config.settings  # noqa: F401 - registers the profiles

# Hypothesis draws about 2.5 % of its integers and floats from literals in the source of the
# "local" modules imported so far: here this checkout's oracle/ and spec/ (an installed copy
# lives in site-packages, which is not local, so a user's gate never draws them). In this
# suite that made every derandomised outcome depend on which modules the collection had
# imported (CI failures of pinned coverage, tests moved to fresh interpreters), and drew
# production sizes (K = 7168 ...) into searches of small shapes: the README's torch skeleton
# took 24 s of CPU in the full suite and 2.4 s without. The suite draws as an installed copy
# does. The hook is private: a Hypothesis without it fails here, loudly.
if not hasattr(hypothesis_providers, "_get_local_constants"):
    raise RuntimeError("hypothesis.internal.conjecture.providers._get_local_constants is gone: "
                       "update tests/conftest.py for this Hypothesis version")
hypothesis_providers._get_local_constants = lambda: hypothesis_providers._local_constants


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--dfc-profile", default=None):
        settings.load_profile(os.environ.get("DFC_PROFILE", "dfc-ci"))


# The harness tests import their broken implementations as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
