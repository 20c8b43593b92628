import importlib.util
import os

import pytest

# the shared helpers (tests/support/, on sys.path through pyproject's pytest `pythonpath`): their
# asserts get pytest's messages, and live_server's fixtures (default_server, launch_server) are
# a plugin, so every directory sees them
pytest.register_assert_rewrite("support")
pytest_plugins = ["support.live_server", "support.model_plugin", "support.pooling_models"]

# several engine processes share 2 cores in CI: OpenMP's spin is bounded as the package bounds
# it (lightllm_plugin/__init__.py; set here too because test modules import torch first)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the Triton kernels can only run in the interpreter, and `@triton.jit` picks
# the interpreter when the kernel modules are imported: decide before any test imports them.
# The engine still runs the references on CPU (kernels._triton.RUN_ON_CPU stays off).
if importlib.util.find_spec("triton") is not None and not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_file() -> str:
    from lightllm_plugin.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_default_model(default_model_file):
    """Hugging Face transformers' float32 model from the default model's GGUF file: the
    independent reference of several modules, converted once a session."""
    import functools

    import gguf
    import torch
    import transformers

    folder, name = os.path.split(default_model_file)
    parsed = {}

    def parse_once(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = real_reader(path, *args, **kwargs)
        return parsed[key]

    real_reader = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as patch:
        # the reference's own deterministic functions, memoized for this one load: transformers
        # parses the file twice (config, then weights) and rebuilds gguf's tensor-name map for each
        # of its ~400 tensors, about half of the load's ~17 s. Its result is the same.
        patch.setattr(gguf, "GGUFReader", parse_once)
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
