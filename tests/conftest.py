import os

import pytest

# several engine processes share 2 cores in CI; OpenMP spin-waiting across them costs
# 5-20x (set here too because test modules import torch before lightllm_plugin)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def default_model_file() -> str:
    from lightllm_plugin.models.default_model import default_model_path

    return default_model_path()
