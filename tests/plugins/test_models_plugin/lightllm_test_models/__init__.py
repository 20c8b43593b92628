"""Test-only architectures, declared as a third-party plugin declares its own.

- ``FaultyLlamaForCausalLM``: a step holding the token ``$LIGHTLLM_TEST_FAULT_TOKEN`` raises on
  tensor-parallel rank 0, as a failing model worker would; the other ranks go on into the step's
  collectives and wait there, as they would behind a real fault.
- ``ModuleRecordingLlamaForCausalLM``: each forward writes the names of the modules its process
  has imported to ``$LIGHTLLM_TEST_MODULES_DIR/<pid>.json`` (when that set has grown), so a test
  can read what a router or rank process really imported.

The classes import torch, so they are built inside the hook: a process that only lists plugins
(the api process) does not pay for them.
"""

from lightllm_plugin.plugins import hookimpl

FAULT_TOKEN_ENV = "LIGHTLLM_TEST_FAULT_TOKEN"
MODULES_DIR_ENV = "LIGHTLLM_TEST_MODULES_DIR"
FAULTY = "FaultyLlamaForCausalLM"
MODULE_RECORDING = "ModuleRecordingLlamaForCausalLM"


@hookimpl
def register_models(register):
    from lightllm_test_models.models import FaultyLlama, ModuleRecordingLlama

    register(FAULTY, FaultyLlama)
    register(MODULE_RECORDING, ModuleRecordingLlama)
