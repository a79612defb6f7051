"""Shared fixtures: paths into ../shared (models, wikitext) and the small random-LM factory.

Everything that needs ../shared skips with a reason when it is absent, so the suite passes on a bare
checkout. Random models come from ``tests/_models.py`` (importable outside fixtures too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ is a package (tests/__init__.py): with pytest's default import mode the repository root goes on
# sys.path, not tests/, so tests.kernels cannot shadow an installed ``kernels`` (transformers imports one).
from tests._models import ARCHS
from tests._models import make_random_lm as _make_random_lm
from tests._postgres import Unavailable, postgres_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository (may not exist; the path fixtures below skip then)."""
    return SHARED_DIR


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path.relative_to(REPO_ROOT.parent).as_posix()} ({what} is absent)")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(shared_dir: Path) -> Path:
    """stories260k: a 260K-parameter Llama (5 layers, GQA 8/4, tied embeddings), stored as float16."""
    path = shared_dir / "models" / "stories260k"
    if not (path / "config.json").is_file():
        pytest.skip("needs ../shared/models/stories260k (the shared model folder is absent)")
    return path


@pytest.fixture(scope="session")
def main_model_path(shared_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a float16 HF directory (materialized once into a cache, ~30 s)."""
    script = shared_dir / "models" / "materialize"
    if not script.is_file():
        pytest.skip("needs ../shared/models/materialize (the shared model folder is absent)")
    try:
        done = subprocess.run(
            [sys.executable, str(script), "smollm2-135m-instruct"],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"materialize smollm2-135m-instruct failed: {exc}")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"materialize smollm2-135m-instruct failed (exit {done.returncode}): {reason}")
    path = Path(lines[-1].strip())
    if not (path / "config.json").is_file():
        pytest.skip(f"materialize printed {path}, which is not a model directory")
    return path


@pytest.fixture(scope="session")
def wikitext_test(shared_dir: Path) -> Path:
    """wikitext-2 raw test split (evaluation text)."""
    return _need(shared_dir / "data" / "wikitext-2-raw-test.txt", "the wikitext-2 test file")


@pytest.fixture(scope="session")
def wikitext_calib(shared_dir: Path) -> Path:
    """wikitext-2 validation split (calibration text; disjoint from the test split)."""
    return _need(shared_dir / "data" / "wikitext-2-valid-unk.txt", "the wikitext-2 validation file")


@pytest.fixture(scope="session")
def make_random_lm() -> Callable[..., Any]:
    """``make_random_lm(arch, *, seed=0, **config_overrides)`` for arch in llama, qwen2, mistral, gpt_neox, gpt2."""
    return _make_random_lm


@pytest.fixture(scope="session")
def random_archs() -> tuple[str, ...]:
    return ARCHS


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of an empty database on a throwaway PostgreSQL server (see ``tests/_postgres.py``)."""
    try:
        with postgres_server() as url:
            yield url
    except Unavailable as e:
        if os.environ.get("BITPLAN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"BITPLAN_REQUIRE_POSTGRES=1 but {e}")
        pytest.skip(str(e))
