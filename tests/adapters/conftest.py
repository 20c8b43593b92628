"""The adapters' tests run real servers, as the server's own tests do."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "server"))

import pytest  # noqa: E402
from live_server import launch_server  # noqa: E402,F401  (the fixture)


@pytest.fixture(scope="session")
def tiny_tools_model(tmp_path_factory) -> str:
    """The folder of tiny_tools_model's checkpoint, built once per run."""
    from tiny_tools_model import build_tiny_tools_model

    return build_tiny_tools_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def pytest_collection_modifyitems(items):
    """Mark the standard LangChain tests the default model cannot pass (test_langchain.XFAIL)."""
    for item in items:
        if "test_langchain.py" not in item.nodeid:
            continue
        reason = getattr(item.module, "XFAIL", {}).get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
