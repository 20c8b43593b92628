"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter."""

import pytest

from lightllm_plugin.kernels import _triton

if not _triton.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
if not _triton.INTERPRETED:
    pytest.skip("needs TRITON_INTERPRET=1 before import (set by tests/conftest.py when there is no GPU); "
                "on a GPU see tests/gpu/test_kernels_cuda.py", allow_module_level=True)


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(_triton, "RUN_ON_CPU", True)
