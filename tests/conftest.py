"""Shared fixtures: tiny random models of each architecture, and the real default model (loaded once)."""

from __future__ import annotations

import os

import pytest

from tests.tiny import ARCHS, build_model_dir, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = build_tokenizer()
    return {arch: build_model_dir(arch, root, tokenizer) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    from geomap.models import load_model

    return {arch: load_model(str(path), device="cpu") for arch, path in tiny_dirs.items()}


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def real():
    """The real default model (Gemma-3-270M), converted once per machine under $GEOMAP_HOME."""
    from transformers.utils import logging

    from geomap.models import load_model

    logging.set_verbosity_error()
    return load_model("gemma-3-270m", device="cpu")
