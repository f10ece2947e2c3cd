"""Training tests share one fixture: a per-module folder that is also the streamvlm cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMVLM_CACHE", str(root / "cache"))
        yield root
