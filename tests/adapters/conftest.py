"""The adapters' tests run real servers, as the server's own tests do."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "server"))

from live_server import launch_server  # noqa: E402,F401  (the fixture)


def pytest_collection_modifyitems(items):
    """Mark the standard LangChain tests the default model cannot pass (test_langchain.XFAIL)."""
    import pytest

    for item in items:
        if "test_langchain.py" not in item.nodeid:
            continue
        reason = getattr(item.module, "XFAIL", {}).get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
