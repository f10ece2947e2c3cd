"""Fixtures: tiny random checkpoints saved by transformers, loaded once per test run; the built-in model; a
cache folder per test."""

from __future__ import annotations

import pytest
import torch

from streamvlm.tiny import write_tiny_checkpoint
from support import SPECS


@pytest.fixture(autouse=True)
def _intra_op_threads():
    """Each test starts with the same torch thread count: a thread that hands work to a Batcher (the test's own,
    in some tests) drops to one core (streamvlm.cores)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """streamvlm's cache folder (sample video, bench checkpoints) under the test's tmp_path."""
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def builtin():
    """The built-in model, loaded once per module."""
    from streamvlm import StreamVLM
    from streamvlm.world.builtin import default_model_dir

    return StreamVLM.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """name -> path of a checkpoint written by `write_tiny_checkpoint` (transformers' save_pretrained)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_tiny_checkpoint(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_dir(checkpoints):
    return checkpoints["gqa"]


@pytest.fixture(scope="session")
def hf_model():
    """Load transformers' own model for a checkpoint directory (cached per path)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    cache = {}

    def load(model_dir):
        if model_dir not in cache:
            cache[model_dir] = LlavaOnevisionForConditionalGeneration.from_pretrained(
                model_dir, dtype=torch.float32).eval()
        return cache[model_dir]

    return load


@pytest.fixture(scope="session")
def serve(tiny_dir, tmp_path_factory):
    """Start `streamvlm serve` on the tiny checkpoint: serve(api_key=None, media_dir=None, max_sessions=4,
    workers=2, extra=()) -> ServerProcess (.url, .api_key, .pid, .rss_bytes(), .log()). One process per distinct
    configuration, shared by the session's tests, stopped at the end."""
    import os

    from streamvlm.serve.process import ServerProcess

    root = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "STREAMVLM_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("STREAMVLM_API_KEY", None)
    servers: dict = {}

    def start(api_key=None, media_dir=None, max_sessions=4, workers=2, extra=()):
        key = (api_key, str(media_dir), max_sessions, workers, tuple(extra))
        if key not in servers:
            args = ["--model", str(tiny_dir), "--max-sessions", str(max_sessions), "--workers", str(workers),
                    "--model-name", "tiny", *extra]
            servers[key] = ServerProcess(args, env, root / f"server-{len(servers)}.log", api_key, media_dir)
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()
