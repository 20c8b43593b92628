import os

import pytest

# several engine processes share 2 cores in CI; OpenMP spin-waiting across them costs 5x
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def default_model_file() -> str:
    from lightllm_plugin.models.default_model import default_model_path

    return default_model_path()
