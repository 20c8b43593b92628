import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "server"))

from live_server import launch_server  # noqa: E402,F401  (the fixture)
