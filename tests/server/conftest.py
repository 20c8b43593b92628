"""Servers for the tests: one real server subprocess per module, always shut down."""

from live_server import launch_server  # noqa: F401  (the fixture)
