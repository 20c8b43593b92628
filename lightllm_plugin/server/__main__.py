"""`python -m lightllm_plugin.server [LightLLM flags]`: the drop-in for `python -m lightllm.server.api_server`."""

import sys

from lightllm_plugin.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:], prog="python -m lightllm_plugin.server"))
