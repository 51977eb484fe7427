"""The project's own test suite runs under the deterministic ``dfc-ci`` profile (see
``oracle.config.settings``) unless ``--dfc-profile`` or ``DFC_PROFILE`` says otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

import oracle.config.settings  # noqa: F401 - registers the profiles


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--dfc-profile", default=None):
        settings.load_profile(os.environ.get("DFC_PROFILE", "dfc-ci"))


# The harness tests import their broken implementations as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
