"""Session-wide rules: no network but loopback, Hub offline, an isolated Hub cache."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub, which reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="clipzoo-test-hf-home-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

import netguard  # noqa: E402

netguard.install()


@pytest.fixture(scope="session")
def tiny_model():
    """One randomly initialised tiny model (2-layer, 64-wide towers), built once."""
    import clipzoo.core as cz

    return cz.create_model("core/tiny").eval()
