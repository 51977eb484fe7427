"""Hypothesis settings profiles of dfc-oracle, registered on import.

- ``dfc-ci``: deterministic (derandomised, no database), no deadline, blob printing on, a
  modest number of examples: a CI gate that gives the same answer on every run.
- ``dfc-dev``: random, with the local example database, more examples.
- ``dfc-nightly``: thousands of examples and a shared database directory
  (``DFC_ORACLE_DB``, default ``.hypothesis/dfc-nightly``), for the long search whose finds
  come back as explicit ``@example`` regressions.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

__all__ = ["DEFAULT_PROFILE", "SETTINGS_PROFILES", "register_profiles"]

SETTINGS_PROFILES = ("dfc-ci", "dfc-dev", "dfc-nightly")
DEFAULT_PROFILE = "dfc-ci"
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]


def register_profiles() -> None:
    settings.register_profile(
        "dfc-ci", derandomize=True, deadline=None, database=None, print_blob=True,
        max_examples=100, suppress_health_check=_SLOW_DATA,
    )
    settings.register_profile(
        "dfc-dev", deadline=None, max_examples=200, suppress_health_check=_SLOW_DATA,
    )
    settings.register_profile(
        "dfc-nightly", deadline=None, max_examples=5000, print_blob=True,
        database=DirectoryBasedExampleDatabase(
            os.environ.get("DFC_ORACLE_DB", ".hypothesis/dfc-nightly")
        ),
        suppress_health_check=_SLOW_DATA,
    )


register_profiles()
