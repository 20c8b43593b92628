"""The tokenizer process: text or chat messages in, checked token ids out.

Tokenizing and rendering chat templates are CPU work that would stall the asyncio front
end, so they live here. Several of these processes may pull from the same socket.
"""

from __future__ import annotations

import logging
import os
import sys
from multiprocessing.connection import Connection

import msgspec
import zmq

from lightllm_plugin import ipc
from lightllm_plugin.chat_template import render_chat, template_takes_tools
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.images import ImageData, ImageInputs, split_images
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server import child_process
from lightllm_plugin.server.protocol import (
    AddRequest,
    Addresses,
    Limits,
    Ready,
    RequestError,
    TokenizeRequest,
    decoder_for,
    encoder,
)
from lightllm_plugin.tool_calls import tool_call_constraint

logger = logging.getLogger(__name__)


def encode_prompt(tokenizer, req: TokenizeRequest) -> list[int]:
    """Token ids of the request's prompt, before any length check. ValueError names the field."""
    if req.prompt_ids is not None:
        return list(req.prompt_ids)
    if req.messages is not None:
        _, ids = render_chat(tokenizer, req.messages, tools=req.tools, chat_template_kwargs=req.chat_template_kwargs)
        return ids
    if req.prompt is None or req.prompt == "":
        raise ValueError(f"{req.field} must not be empty")
    if req.text_pair is not None:
        return list(tokenizer(req.prompt, text_pair=req.text_pair, add_special_tokens=req.add_special_tokens)["input_ids"])
    return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)


def fit_prompt(
    ids: list[int], params: SamplingParams, config: EngineConfig, field: str, lower_max_new_tokens: bool = True
) -> tuple[list[int], SamplingParams]:
    """Apply the server's length limits as LightLLM does: a prompt over max_req_input_len is
    refused, or cut per long_truncation_mode; then max_new_tokens is lowered to the room left
    within max_req_total_len. (LazyLLM asks for 8192 new tokens whatever the model's context;
    refusing that would refuse every LazyLLM request to a model of 8192 tokens or fewer.)"""
    if not ids:
        raise ValueError(f"{field} must not be empty")
    limit = config.max_req_input_len
    if len(ids) > limit:
        if config.long_truncation_mode is None:
            raise ValueError(f"{field} is {len(ids)} tokens long, more than max_req_input_len={limit}")
        # LightLLM's naming: "head" cuts the head off (keeps the end), "tail" cuts the tail off
        ids = ids[-limit:] if config.long_truncation_mode == "head" else ids[:limit]
    room = config.max_req_total_len - len(ids)  # >= 1: max_req_input_len < max_req_total_len
    if params.max_new_tokens > room and not lower_max_new_tokens:
        raise ValueError(
            f"max_new_tokens ({params.max_new_tokens}) + {field} ({len(ids)} tokens) exceeds "
            f"max_req_total_len={config.max_req_total_len}"
        )
    if params.max_new_tokens > room:
        params = msgspec.structs.replace(
            params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room)
        )
    return ids, params


def expand_samples(req: TokenizeRequest, ids: list[int], images: list[ImageData] | None = None) -> list[AddRequest]:
    """n samples become n engine requests, each with its own seed (SamplingParams.for_sample)."""
    return [AddRequest(req_id=req_id, prompt_ids=ids, params=req.params.for_sample(i), images=images or None)
            for i, req_id in enumerate(req.req_ids)]


def encode_with_images(tokenizer, req: TokenizeRequest, image_inputs: ImageInputs | None,
                       config: EngineConfig) -> tuple[list[int], list[ImageData]]:
    """The prompt's ids with each image's placeholder expanded to its tokens, and its images:
    the image parts of `messages` first, then `images`."""
    sources: list[str] = []
    if req.messages is not None:
        messages, sources = split_images(req.messages)
        req = msgspec.structs.replace(req, messages=messages)
    sources += list(req.images or [])
    if image_inputs is None:
        if sources:
            raise ValueError("images: this model is text-only; it does not take images")
        return encode_prompt(tokenizer, req), []
    image_inputs.check_count(sources)
    ids = encode_prompt(tokenizer, req)
    ids, images = image_inputs.prepare(ids, sources, req.field)
    if images and len(ids) > config.max_req_input_len:
        # cutting the prompt could cut an image's tokens: refused whatever long_truncation_mode says
        raise ValueError(f"{req.field} is {len(ids)} tokens long with its image tokens, more than "
                         f"max_req_input_len={config.max_req_input_len}")
    return ids, images


def handle(tokenizer, req: TokenizeRequest, config: EngineConfig,
           image_inputs: ImageInputs | None = None) -> list[AddRequest] | RequestError:
    try:
        ids, images = encode_with_images(tokenizer, req, image_inputs, config)
        ids, params = fit_prompt(ids, req.params, config, req.field, req.lower_max_new_tokens)
        if req.tools and req.messages is not None and not template_takes_tools(tokenizer.chat_template) and (
                params.structured_outputs is None and params.allowed_token_ids is None):
            # tool_choice auto, the tools in the system message: free text, or calls in the format it asks for
            params = msgspec.structs.replace(params, structured_outputs=tool_call_constraint(req.tools, "auto"))
        return expand_samples(msgspec.structs.replace(req, params=params), ids, images)
    except ValueError as exc:
        return RequestError(req_ids=req.req_ids, message=str(exc))
    except Exception as exc:  # one odd input must not take the pipeline down
        logger.exception("tokenizing request %s failed", req.req_ids[:1])
        return RequestError(req_ids=req.req_ids, message=f"tokenization failed ({type(exc).__name__})", status=500)


def wait_for_limits(limits_pipe: Connection, parent_pid: int) -> Limits:
    while not limits_pipe.poll(1.0):
        if not child_process.parent_alive(parent_pid):
            sys.exit(1)
    return decoder_for(Limits).decode(limits_pipe.recv_bytes())


def run_tokenizer(
    config: EngineConfig, addresses: Addresses, parent_pid: int, limits_pipe: Connection, index: int = 0
) -> None:
    """Process entry point. Loads the tokenizer while the router loads the model, then
    waits for the length limits the engine settled on (it caps them at the model's context)."""
    child_process.bootstrap(f"tokenizer{index}", parent_pid)
    tokenizer = child_process.load_tokenizer_for(config)
    image_inputs = child_process.load_image_inputs_for(config)
    limits = wait_for_limits(limits_pipe, parent_pid)
    config = config.replace(max_req_total_len=limits.max_req_total_len, max_req_input_len=limits.max_req_input_len)
    # a context left with open sockets would block the exit once the parent is gone
    with ipc.zmq_context() as ctx:
        inbox = ipc.open_socket(ctx, zmq.PULL, addresses.tokenizer, bind=False)
        to_router = ipc.open_socket(ctx, zmq.PUSH, addresses.router, bind=False)
        to_api = ipc.open_socket(ctx, zmq.PUSH, addresses.api, bind=False)
        control = ipc.open_socket(ctx, zmq.PUSH, addresses.control, bind=False)
        control.send(encoder.encode(Ready(role=f"tokenizer{index}", pid=os.getpid())))
        decoder = decoder_for(TokenizeRequest)
        while child_process.parent_alive(parent_pid):
            if not inbox.poll(1000):
                continue
            req = ipc.decode_or_drop(decoder, inbox.recv(), "tokenizer")
            if req is None:
                continue
            result = handle(tokenizer, req, config, image_inputs)
            if isinstance(result, RequestError):
                to_api.send(encoder.encode(result))
            else:
                for add in result:
                    to_router.send(encoder.encode(add))
