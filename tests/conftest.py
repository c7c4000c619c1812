from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import FAMILIES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-weight HF model directory per family."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture
def no_bound_checks():
    """The integer ops' bound checks off for one test (kernels are compared on inputs outside the checked
    bounds too: wraparound, wild shifts); restored after."""
    from ditto.numerics.kernels import integer_ops as iops

    old = iops._CHECKS
    iops.set_bound_checks(False)
    yield
    iops.set_bound_checks(old)
