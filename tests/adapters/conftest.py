"""The adapters' tests run real servers (support.live_server's fixtures), as the server's own tests do."""

import pytest


@pytest.fixture(scope="session")
def tiny_tools_model(tmp_path_factory) -> str:
    """The folder of tiny_tools_model's checkpoint, built once per run."""
    from tiny_tools_model import build_tiny_tools_model

    return build_tiny_tools_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")

