"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random model of its architecture, and
(for the slower tests) the real SmolLM2-135M-Instruct. Models are materialised once per machine
under DRIFT_MODEL_CACHE (default ~/.cache/drift/models)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tasks.models import materialize_tiny

    return materialize_tiny()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tasks.models import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def smol_tokenizer(tiny_model_dir):
    from tasks.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from tasks.models import load_model

    return load_model(str(tiny_model_dir))
