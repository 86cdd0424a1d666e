"""One loaded toy-world session for the web app's tests (loading the pair once keeps them fast)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dreamblend.ui.session import BlendSession
from dreamblend.ui.settings import toy_config

# Few DDIM steps: the tests check wiring and equality of runs, not image quality.
TEST_STEPS = 4


@pytest.fixture(scope="session")
def toy_session() -> BlendSession:
    config = toy_config()
    session = BlendSession(replace(config, defaults=replace(config.defaults, steps=TEST_STEPS)))
    session.pipeline(config.defaults.guidance, config.defaults.edit)
    return session
