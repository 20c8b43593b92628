"""`lightllm-plugin serve | generate | bench | plugins`, and the commands plugins add.

Engine flags are generated from EngineConfig's fields, so `--flag` and `config.flag` can
never drift apart; their names are LightLLM's. LightLLM flags that mean nothing here are
accepted with a one-line warning, so a LightLLM command line runs unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types
import typing

from lightllm_plugin.config import ConfigError, EngineConfig
from lightllm_plugin.plugins import SKIP_BROKEN_FLAG, PluginError, hookimpl, skip_broken_requested

HELP = {
    "model_dir": "Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct, fetched once)",
    "tokenizer_mode": "tokenizer loading mode (auto: the fast tokenizer)",
    "trust_remote_code": "allow the model folder's own tokenizer code to run",
    "data_type": "auto, float32, float16, bfloat16; on CPU, below float32 means quantized weights for decode "
                 "and a bfloat16 KV cache (see README: Engine settings)",
    "device": "auto, cpu or cuda",
    "task": "generate, reward, embed, classify or score; auto: a score head serves reward (one label) or "
    "classify, a sentence-transformers folder embed, anything else generate",
    "max_batch_embeddings": "most inputs of one /v1/embeddings, /pooling, /classify, /score or /v1/rerank request",
    "eos_id": "extra end-of-sequence token ids, added to the model's own",
    "max_total_token_num": "KV cache size in tokens (default: measured from free memory and --mem_fraction)",
    "mem_fraction": "share of free accelerator memory the KV cache may take",
    "max_req_total_len": "most tokens (prompt + output) of one request",
    "max_req_input_len": "most prompt tokens of one request",
    "batch_max_tokens": "most new tokens in one forward (default: max_req_total_len)",
    "running_max_req_size": "most requests in the running batch",
    "long_truncation_mode": "what to do with a prompt over max_req_input_len: refuse it (default), "
    "head (cut its beginning) or tail (cut its end)",
    "seed": "seed of the engine's sampler",
    "kv_cache_dtype": "KV cache storage: auto (the model dtype) or int8 (per-token-per-head scales, "
    "about twice the tokens; LightLLM's --mode triton_int8kv)",
    "disable_dynamic_prompt_cache": "turn the prefix cache off: every prompt is computed in full, "
    "even one the engine has just seen",
    "disable_chunked_prefill": "prefill every prompt in one step (a long one then stalls the running streams)",
    "chunked_prefill_size": "most prompt tokens prefilled in one step, beside the running decodes",
    "enforce_eager": "run every decode step eagerly instead of replaying CUDA graphs (CUDA only)",
    "host": "address to listen on",
    "port": "port to listen on",
    "tp": "tensor parallel degree: the model is split over this many ranks, one process each "
    "(GPUs 0..N-1 with NCCL, or CPU processes with gloo)",
    "nccl_port": "port on 127.0.0.1 where the tensor-parallel ranks meet (used when --tp > 1)",
    "tokenizer_workers": "number of tokenizer processes",
    "served_model_name": "the model's name as reported to clients (default: the model folder's or file's name)",
    "api_key": "require `Authorization: Bearer KEY` on every route but /health and /healthz "
    "(default: $LIGHTLLM_API_KEY, else no key)",
    "max_queue_size": "most requests waiting for their first token; more are refused with 503 and "
    "Retry-After (default: no bound)",
    "max_body_size": "most bytes of one HTTP request body; more is refused with 413",
    "request_timeout": "seconds one request may take before it is aborted (its KV slots freed) and "
    "answered 504 (default: no limit)",
    "allowed_media_domains": "hosts (and their subdomains) whose http(s) image URLs the server may fetch "
    "(default: none; images come as data: URLs or base64)",
    "max_image_pixels": "most pixels (width x height) of one image; a larger one is refused with 400",
    "limit_mm_per_prompt": "most images in one prompt; more are refused with 400",
    "drain_timeout": "on SIGTERM, seconds the running requests get to finish while new ones are refused "
    "with 503 and Retry-After and /health answers 503; a second signal stops at once (0: stop at once)",
    "skip_broken_plugins": "start without a plugin that fails to load, with a warning naming it "
    "(default: such a plugin stops the server; also $LIGHTLLM_PLUGINS_SKIP_BROKEN=1)",
}
# vLLM's spellings of flags, accepted as well
ALIASES = {"served_model_name": "--served-model-name", "api_key": "--api-key"}
API_KEY_ENV = "LIGHTLLM_API_KEY"

# fields only the HTTP server uses
SERVER_FIELDS = {
    "host", "port", "tokenizer_workers", "served_model_name", "api_key",
    "max_queue_size", "max_body_size", "request_timeout", "max_batch_embeddings", "drain_timeout",
}
# fields whose flag takes any text: LazyLLM writes "--nccl_port=None" when it has no port to give
TEXT_OR_NONE_FIELDS = {"nccl_port"}
# LightLLM flags with no counterpart here: (name, takes a value)
LIGHTLLM_ONLY_FLAGS = [
    ("mode", True),
    ("router_token_ratio", True),
    ("router_max_new_token_len", True),
    ("router_max_wait_tokens", True),
    ("log_stats_interval", True),
    ("splitfuse_block_size", True),
    ("graph_max_batch_size", True),
    ("graph_max_len_in_batch", True),
    ("quant_type", True),
    ("dp", True),
    ("disable_log_stats", False),
    ("splitfuse_mode", False),
    ("disable_cudagraph", False),
]


def _unwrap_optional(tp) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_engine_flags(parser: argparse.ArgumentParser, include_server: bool = True) -> None:
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine" if not include_server else "engine and server")
    for f in dataclasses.fields(EngineConfig):
        if not f.init or (not include_server and f.name in SERVER_FIELDS):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        flags = [f"--{f.name}"] + ([ALIASES[f.name]] if f.name in ALIASES else [])
        help_text = HELP.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            action = "store_true" if not default else argparse.BooleanOptionalAction
            group.add_argument(*flags, action=action, default=default, help=help_text)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            group.add_argument(*flags, nargs="+", type=item, default=default, help=help_text)
        elif f.name in TEXT_OR_NONE_FIELDS:
            group.add_argument(*flags, type=str, default=None, help=f"{help_text} (default: {default})")
        else:
            shown = help_text if "default" in help_text else f"{help_text} (default: {default})"
            group.add_argument(*flags, type=tp, default=default, help=shown)


def add_lightllm_only_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for LightLLM compatibility, no effect")
    for name, takes_value in LIGHTLLM_ONLY_FLAGS:
        if takes_value:
            group.add_argument(f"--{name}", nargs="*", default=None, help=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{name}", action="store_true", default=None, help=argparse.SUPPRESS)


# LightLLM's --mode values that map onto an EngineConfig field here: mode -> (field, value)
MODE_FIELDS = {"triton_int8kv": ("kv_cache_dtype", "int8")}


def _modes_to_fields(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """LightLLM's `--mode a b ...`: the modes this engine implements become field values; the
    others are warned about and ignored. An explicit flag that contradicts a mode is an error."""
    modes = getattr(args, "mode", None)
    args.mode = None  # handled here, not by the generic LightLLM-only warning
    values: dict = {}
    if modes is None:
        return values
    ignored = []
    for mode in modes:
        if mode not in MODE_FIELDS:
            ignored.append(mode)
            continue
        name, value = MODE_FIELDS[mode]
        given = getattr(args, name, None)
        default = EngineConfig.__dataclass_fields__[name].default
        if given not in (None, default, value):
            parser.error(f"--mode {mode} sets {name}={value}, but --{name} {given} was also given")
        values[name] = value
    if ignored or not modes:
        _warn(f"--mode {' '.join(ignored)} is a LightLLM setting with no effect here; ignored")
    return values


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineConfig:
    from_modes = _modes_to_fields(args, parser)
    for name, _ in LIGHTLLM_ONLY_FLAGS:
        if getattr(args, name, None) is not None:
            _warn(f"--{name} is a LightLLM flag with no effect here; ignored")
    values = {}
    for f in dataclasses.fields(EngineConfig):
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.name in TEXT_OR_NONE_FIELDS:
            if value is None or value.strip().lower() in ("", "none"):
                continue
            if not value.strip().isdigit():
                parser.error(f"--{f.name} must be a port number, got {value!r}")
            value = int(value)
        values[f.name] = value
    values.update(from_modes)
    if "api_key" in values and values["api_key"] is None:
        values["api_key"] = os.environ.get(API_KEY_ENV) or None
    try:
        return EngineConfig(**values)
    except ConfigError as exc:
        parser.error(str(exc))


def _warn(message: str) -> None:
    print(f"lightllm-plugin: warning: {message}", file=sys.stderr, flush=True)


# ---- commands ---------------------------------------------------------------------------
def build_serve_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over HTTP (LightLLM's native API).")
    add_engine_flags(parser)
    add_lightllm_only_flags(parser)
    return parser


def serve_main(argv: list[str], prog: str | None = None) -> int:
    parser = build_serve_parser(prog)
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    from lightllm_plugin.plugins import load_plugins
    from lightllm_plugin.server.launcher import fail, serve

    try:
        plugins = load_plugins(skip_broken=config.skip_broken_plugins or skip_broken_requested())
    except PluginError as exc:
        fail(f"{exc} ({SKIP_BROKEN_FLAG} starts the server without it)")
        return 1
    return serve(config, plugins=plugins)


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    group.add_argument("--top_p", type=float, default=1.0)
    group.add_argument("--top_k", type=int, default=-1)


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightllm-plugin generate", description="Answer one prompt and print the text.")
    parser.add_argument("prompt")
    parser.add_argument("--no_chat_template", action="store_true", help="send the prompt as raw text")
    _add_sampling_flags(parser, max_new_tokens=128)
    add_engine_flags(parser, include_server=False)
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)

    from lightllm_plugin.llm import LLM
    from lightllm_plugin.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens
        )
    except ValueError as exc:
        parser.error(str(exc))
    with LLM(config=config) as llm:
        if not args.no_chat_template and getattr(llm.tokenizer, "chat_template", None):
            result = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            result = llm.generate([args.prompt], params, use_tqdm=False)
    print(result[0].outputs[0].text)
    return 0


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightllm-plugin bench", description="Offline throughput: a batch of prompts, tokens/s.")
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt length in tokens")
    _add_sampling_flags(parser, max_new_tokens=64)
    add_engine_flags(parser, include_server=False)
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)

    from lightllm_plugin.llm import LLM
    from lightllm_plugin.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, ignore_eos=True)
    with LLM(config=config) as llm:
        vocab = len(llm.tokenizer)
        # distinct synthetic prompts: no two requests share a prefix
        prompts = [[(1000 + 7 * i + 13 * j) % vocab for j in range(args.prompt_len)] for i in range(args.num_prompts)]
        llm.generate(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = args.num_prompts * args.prompt_len
    print(
        f"{args.num_prompts} requests, {prompt_tokens} prompt + {generated} generated tokens in {elapsed:.2f} s: "
        f"{generated / elapsed:.1f} generated tokens/s, {(prompt_tokens + generated) / elapsed:.1f} total tokens/s "
        f"({config.resolved_device}, {config.resolved_dtype})"
    )
    return 0


def plugins_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightllm-plugin plugins",
                                     description="List the loaded plugins, their versions and the hooks each implements.")
    parser.add_argument(SKIP_BROKEN_FLAG, action="store_true", help="list the others when a plugin fails to load")
    args = parser.parse_args(argv)
    from lightllm_plugin.plugins import collect_adapters, collect_commands, collect_models, load_plugins

    try:
        pm = load_plugins(skip_broken=args.skip_broken_plugins or skip_broken_requested())
        commands = collect_commands(pm)
        models = collect_models(pm)
        adapters = collect_adapters(pm)
    except PluginError as exc:
        print(f"lightllm-plugin: error: {exc}", file=sys.stderr)
        return 1
    rows = [(i.name, i.version, i.source, i.value, ", ".join(i.hooks) or "-") for i in pm.infos.values()]
    header = ("name", "version", "source", "module", "hooks")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    for name, error in pm.broken.items():
        print(f"{name}: BROKEN, skipped: {error}")
    print("commands: " + ", ".join(f"{c.name} ({c.plugin})" for c in commands.values()))
    print("model architectures: " + ", ".join(models))
    # client-side adapters: whether their library is installed, read from metadata (not imported)
    print("adapters:" + ("" if adapters else " -"))
    for a in adapters.values():
        print(f"  {a.name} ({a.plugin}): {a.status()}; import {a.module}" + (f": {a.summary}" if a.summary else ""))
    return 0


def _serve_command(argv: list[str]) -> int:
    return serve_main(argv, prog="lightllm-plugin serve")


@hookimpl(tryfirst=True)
def register_cli(cli) -> None:
    """The built-in plugin "cli": the commands every install has."""
    cli.add_command("serve", _serve_command, "serve a model over HTTP")
    cli.add_command("generate", generate_main, "answer one prompt and print the text")
    cli.add_command("bench", bench_main, "offline throughput")
    cli.add_command("plugins", plugins_main, "list the loaded plugins and their hooks")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lightllm_plugin.plugins import collect_commands, load_plugins

    try:
        commands = collect_commands(load_plugins(skip_broken=skip_broken_requested(argv)))
    except PluginError as exc:
        print(f"lightllm-plugin: error: {exc} ({SKIP_BROKEN_FLAG} goes on without it)", file=sys.stderr)
        return 1
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: lightllm-plugin {{{','.join(commands)}}} [flags]   (each takes --help)", file=sys.stderr)
        for c in commands.values():
            print(f"  {c.name:<10} {c.help}" + (f"  [plugin {c.plugin}]" if c.plugin != "cli" else ""), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]].main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
