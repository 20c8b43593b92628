"""The adapters' tests run real servers (support.live_server's fixtures), as the server's own tests do."""

import os

import pytest


@pytest.fixture(scope="session")
def tiny_tools_model(tmp_path_factory) -> str:
    """The folder of tiny_tools_model's checkpoint, built once per run."""
    from tiny_tools_model import build_tiny_tools_model

    return build_tiny_tools_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")



# the expected failures run to max_tokens each (about 21 s together on 2 cores) and fail the same
# way every time, for the model's reasons: listed with those reasons but not run, unless asked
RUN_EXPECTED_FAILURES = os.environ.get("LIGHTLLM_RUN_EXPECTED_FAILURES") == "1"


def pytest_collection_modifyitems(items):
    """A test module's EXPECTED_FAILURES ({"Class::test[param]": reason}) marks those items xfail,
    for standard suites (langchain-tests) whose methods may not be overridden."""
    for item in items:
        expected = getattr(item.module, "EXPECTED_FAILURES", None)
        if expected:
            reason = expected.get(item.nodeid.split("::", 1)[1])
            if reason:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=False, run=RUN_EXPECTED_FAILURES))
