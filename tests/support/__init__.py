"""Helpers shared across the test directories, imported as `support.<module>`.

`tests/` is on sys.path through pytest's configuration (pyproject.toml, [tool.pytest.ini_options]
pythonpath), and tests/conftest.py loads `support.live_server` as a plugin, so its fixtures
(`default_server`, `launch_server`) reach every directory without a conftest re-export.
"""
