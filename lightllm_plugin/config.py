"""EngineConfig: the one typed configuration object of the engine and the server.

Field names follow LightLLM's command-line flags so that `--flag value` maps onto
`EngineConfig.flag` one to one. Values discovered at run time (the KV slot count,
the eos ids, the resolved dtype and device) are written back into the same object.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from lightllm_plugin.pooling_params import TASKS, PoolerInfo

_DATA_TYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
_TRUNCATION_MODES = (None, "head", "tail")
# auto: K/V stored in the model's dtype; int8: symmetric per-token-per-head quantized K/V
KV_CACHE_DTYPES = ("auto", "int8")


class ConfigError(ValueError):
    """A setting that cannot work, reported with the field it concerns."""


@dataclass
class EngineConfig:
    # model
    model_dir: str | None = None  # None: the default model (DESIGN.md)
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    # auto: bfloat16 on CUDA, float32 on CPU. bfloat16/float16 on CPU: float32 activations, quantized
    # projections for decode rows (the checkpoint's 4-bit codes, else int8) and a bfloat16 KV cache
    # (models/cpu_weights.py)
    data_type: str = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    eos_id: list[int] | None = None  # extra eos ids, added to the model's own
    # what the server does with the model: auto reads the architecture (a score head: reward with
    # one label, classify with more) and the folder's sentence-transformers files (embed); embed on
    # a causal LM pools its last hidden state (models/pooling_config.py)
    task: str = "auto"

    # memory and admission
    max_total_token_num: int | None = None  # KV slots; None: profile free memory
    mem_fraction: float = 0.9
    max_req_total_len: int = 4096  # prompt + output tokens of one request
    max_req_input_len: int = 2048
    batch_max_tokens: int | None = None  # new tokens per forward; None: max_req_total_len
    running_max_req_size: int = 256
    long_truncation_mode: str | None = None  # None: reject long prompts; head/tail: cut
    seed: int = 0
    kv_cache_dtype: str = "auto"  # auto: the model dtype; int8: about twice the slots
    # the prefix cache: a prompt's longest prefix the engine has seen (system prompt, tool list, chat
    # history) is read from the KV it kept instead of being computed again
    disable_dynamic_prompt_cache: bool = False
    # a prompt longer than chunked_prefill_size is prefilled that many tokens a step, each step
    # beside the running decodes, so a long prompt never stalls the streams (README: the default)
    disable_chunked_prefill: bool = False
    chunked_prefill_size: int = 512
    # decode steps replay CUDA graphs on GPUs; True runs every step eagerly (debugging, profiling)
    enforce_eager: bool = False

    # server
    host: str = "127.0.0.1"
    port: int = 8000
    tp: int = 1
    nccl_port: int = 28765
    tokenizer_workers: int = 1
    served_model_name: str | None = None  # None: the model folder's (or GGUF file's) name
    api_key: str | None = field(default=None, repr=False)  # None: no key asked for
    # overload protection: requests not yet given their first token; None: no bound
    max_queue_size: int | None = None
    max_body_size: int = 8 * 1024 * 1024  # bytes of one HTTP request body
    request_timeout: float | None = None  # seconds one request may run; None: no limit
    # on SIGTERM: seconds the running requests get to finish while new ones are refused (0: stop at
    # once); below Kubernetes' default 30 s grace period, so a pod ends on its own before its SIGKILL
    drain_timeout: float = 25.0
    # inputs of one /v1/embeddings (or /pooling, /classify, /score, /v1/rerank) request; OpenAI's limit
    max_batch_embeddings: int = 2048
    # images (vision-language models): hosts whose http(s) image URLs the server fetches (None: it
    # fetches nothing, images come as data URLs or base64), the most pixels of one decoded image,
    # the most images of one prompt
    allowed_media_domains: list[str] | None = None
    max_image_pixels: int = 16384 * 28 * 28
    limit_mm_per_prompt: int = 16
    # a plugin that fails to load is skipped with a warning instead of stopping the command; the
    # model processes read it to skip the same plugins the server did
    skip_broken_plugins: bool = False

    # discovered at run time
    total_slots: int = field(default=0, init=False)
    resolved_eos_ids: list[int] = field(default_factory=list, init=False)
    resolved_dtype: str = field(default="", init=False)
    resolved_device: str = field(default="", init=False)
    resolved_model_path: str = field(default="", init=False)
    resolved_task: str = field(default="", init=False)  # generate, reward, embed, classify or score
    pooler: PoolerInfo | None = field(default=None, init=False)  # None: a generation model

    def __post_init__(self) -> None:
        if self.data_type not in _DATA_TYPES:
            raise ConfigError(f"data_type must be one of {_DATA_TYPES}, got {self.data_type!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.max_total_token_num is not None and self.max_total_token_num < 1:
            raise ConfigError("max_total_token_num must be >= 1")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ConfigError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.max_req_input_len < 1 or self.max_req_total_len < 2:
            raise ConfigError("max_req_input_len must be >= 1 and max_req_total_len >= 2")
        if self.max_req_input_len >= self.max_req_total_len:
            raise ConfigError(
                f"max_req_input_len ({self.max_req_input_len}) must be smaller than "
                f"max_req_total_len ({self.max_req_total_len})"
            )
        if self.batch_max_tokens is None:
            self.batch_max_tokens = self.max_req_total_len
        if self.chunked_prefill_size < 1:
            raise ConfigError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        if self.disable_chunked_prefill and self.batch_max_tokens < self.max_req_input_len:
            raise ConfigError(
                f"batch_max_tokens ({self.batch_max_tokens}) must be >= max_req_input_len "
                f"({self.max_req_input_len}) when chunked prefill is disabled, or a long prompt could never be scheduled"
            )
        if self.running_max_req_size < 1:
            raise ConfigError("running_max_req_size must be >= 1")
        if self.long_truncation_mode not in _TRUNCATION_MODES:
            raise ConfigError(f"long_truncation_mode must be head or tail, got {self.long_truncation_mode!r}")
        if self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")
        if not 0 < self.nccl_port < 65536:
            raise ConfigError(f"nccl_port must be a port number, got {self.nccl_port}")
        if self.max_queue_size is not None and self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.max_body_size < 1024:
            raise ConfigError(f"max_body_size must be >= 1024 bytes, got {self.max_body_size}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.max_batch_embeddings < 1:
            raise ConfigError(f"max_batch_embeddings must be >= 1, got {self.max_batch_embeddings}")
        if self.max_image_pixels < 1 or self.limit_mm_per_prompt < 0:
            raise ConfigError("max_image_pixels must be >= 1 and limit_mm_per_prompt >= 0")
        if self.eos_id is not None and isinstance(self.eos_id, int):
            self.eos_id = [self.eos_id]

    def model_name(self) -> str:
        """The name clients address the model by: --served_model_name, else the model
        folder's name or the GGUF file's name without its suffix."""
        if self.served_model_name:
            return self.served_model_name
        path = (self.resolved_model_path or self.model_dir or "").rstrip("/\\")
        if not path:
            return "default"
        name = os.path.basename(path)
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name

    def replace(self, **changes) -> "EngineConfig":
        """A copy with some fields changed; run-time fields are carried over."""
        new = dataclasses.replace(self, **changes)
        for f in dataclasses.fields(self):
            if not f.init:
                setattr(new, f.name, getattr(self, f.name))
        return new
