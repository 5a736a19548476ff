"""Fixtures of the recipe tests."""

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny random teacher/student and tiny JSONL data (see tiny_models.py)."""
    from tiny_models import build

    return build(tmp_path_factory.mktemp("tiny"))
