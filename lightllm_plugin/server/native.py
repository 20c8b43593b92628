"""LightLLM's native HTTP API: POST /generate and POST /generate_stream, field for field.

Request: {"inputs": str, "parameters": {...}} (or "messages" instead of "inputs", with the
chat template applied). Unknown keys are ignored, as LightLLM ignores them, and a null
parameter means its default (LazyLLM sends "stop_sequences": null). POST /flush_cache
empties the prefix cache, as LightLLM's does.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lightllm_plugin.plugins import hookimpl
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.engine_client import AsyncEngineClient, RequestRejected
from lightllm_plugin.server.http_util import (
    BadRequest,
    DisconnectAbortingStream,
    error_response,
    json_body_openapi,
    nullable,
    read_json_body,
)
from lightllm_plugin.server.protocol import TokenOutput
from lightllm_plugin.structured_outputs import StructuredOutputs, one_constraint


class NativeParameters(msgspec.Struct, kw_only=True):
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_sequences: list[str] | str | None = None
    seed: int | None = None
    n: int | None = None
    return_details: bool | None = None
    skip_special_tokens: bool | None = None
    cache_salt: str | None = None  # requests with different salts never share prefix-cache KV
    # LightLLM's output constraints: at most one
    guided_json: Any = None  # a JSON schema (object or its text)
    regular_constraint: str | None = None  # a regex
    guided_grammar: str | None = None  # EBNF
    allowed_token_ids: list[int] | None = None


class NativeImage(msgspec.Struct, kw_only=True):
    type: str  # "base64" or "url"
    data: str


class NativeMultimodal(msgspec.Struct, kw_only=True):
    images: list[NativeImage] = []


class NativeRequest(msgspec.Struct, kw_only=True):
    inputs: str | None = None
    messages: list[dict[str, Any]] | None = None
    parameters: NativeParameters | None = None
    # LightLLM's images, one per placeholder of the prompt (after any image parts of messages)
    multimodal_params: NativeMultimodal | None = None


# LightLLM's defaults where they differ from SamplingParams'
_DEFAULT_MAX_NEW_TOKENS = 16
_DEFAULT_MIN_NEW_TOKENS = 1


def to_sampling_params(p: NativeParameters) -> SamplingParams:
    """ValueError names the bad field. do_sample=false is greedy whatever the temperature,
    as in LightLLM, but a negative temperature is refused either way."""

    def pick(value, default):
        return default if value is None else value

    stops = p.stop_sequences
    constraint = one_constraint(
        ("guided_json", None if p.guided_json is None
         else StructuredOutputs(json=p.guided_json, field="parameters.guided_json")),
        ("regular_constraint", None if p.regular_constraint is None
         else StructuredOutputs(regex=p.regular_constraint, field="parameters.regular_constraint")),
        ("guided_grammar", None if p.guided_grammar is None
         else StructuredOutputs(grammar=p.guided_grammar, field="parameters.guided_grammar")),
    )
    params = SamplingParams(
        n=pick(p.n, 1),
        temperature=pick(p.temperature, 1.0),
        top_p=pick(p.top_p, 1.0),
        top_k=pick(p.top_k, -1),
        repetition_penalty=pick(p.repetition_penalty, 1.0),
        presence_penalty=pick(p.presence_penalty, 0.0),
        frequency_penalty=pick(p.frequency_penalty, 0.0),
        max_new_tokens=pick(p.max_new_tokens, _DEFAULT_MAX_NEW_TOKENS),
        min_new_tokens=min(pick(p.min_new_tokens, _DEFAULT_MIN_NEW_TOKENS), pick(p.max_new_tokens, _DEFAULT_MAX_NEW_TOKENS)),
        ignore_eos=pick(p.ignore_eos, False),
        stop=[stops] if isinstance(stops, str) else list(stops or []),
        seed=p.seed,
        logprobs=0,  # LightLLM reports each token's logprob
        skip_special_tokens=pick(p.skip_special_tokens, True),
        cache_salt=p.cache_salt,
        structured_outputs=constraint,
        allowed_token_ids=p.allowed_token_ids,
    )
    if not p.do_sample:
        params = msgspec.structs.replace(params, temperature=0.0)
    return params


def token_details(out: TokenOutput) -> dict[str, Any]:
    return {
        "id": out.token_id,
        "text": out.text,
        "logprob": out.logprob,
        "special": out.special,
        "count_output_tokens": out.output_len,
        "prompt_tokens": out.prompt_len,
    }


def stream_event(out: TokenOutput) -> str:
    event = {
        "token": token_details(out),
        "generated_text": None,
        "finished": out.finish_reason is not None,
        "finish_reason": out.finish_reason,
        "details": None,
    }
    # LightLLM's framing: "data:" without a space, and no closing [DONE] line
    return "data:" + json.dumps(event, ensure_ascii=False) + "\n\n"


async def _parse(request: Request) -> tuple[dict[str, Any], SamplingParams, bool]:
    body = await read_json_body(request, NativeRequest)
    if body.inputs is not None and body.messages is not None:
        raise BadRequest(400, "give either inputs or messages, not both")
    if body.inputs is None and body.messages is None:
        raise BadRequest(400, "inputs is required (or messages, for a chat)")
    if body.inputs == "":
        raise BadRequest(400, "inputs must not be empty")
    if body.messages is not None and not body.messages:
        raise BadRequest(400, "messages must not be empty")
    parameters = body.parameters or NativeParameters()
    try:
        params = to_sampling_params(parameters)
    except ValueError as exc:
        message = str(exc)
        raise BadRequest(400, message if message.startswith("parameters.") else f"parameters.{message}") from None
    prompt = {"prompt": body.inputs} if body.inputs is not None else {"messages": body.messages}
    if body.multimodal_params is not None and body.multimodal_params.images:
        prompt["images"] = [_image_source(image, i) for i, image in enumerate(body.multimodal_params.images)]
    return prompt, params, bool(parameters.return_details)


def _image_source(image: NativeImage, index: int) -> str:
    if image.type not in ("base64", "url"):
        raise BadRequest(400, f"multimodal_params.images[{index}].type must be base64 or url, got {image.type!r}")
    if image.type == "url" and not image.data.startswith(("http://", "https://", "data:")):
        raise BadRequest(400, f"multimodal_params.images[{index}].data must be an http(s) or data: URL")
    if image.type == "base64" and image.data.startswith(("http://", "https://")):
        raise BadRequest(400, f"multimodal_params.images[{index}].data is a URL: give it type url")
    return image.data


def request_body_doc() -> dict[str, Any]:
    """openapi_extra of /generate and /generate_stream: the body's struct, with the values
    the checks after decoding accept. Documentation only."""
    from lightllm_plugin.sampling_params import ACCEPTED
    from lightllm_plugin.server.engine_client import MAX_SAMPLES

    parameters = {name: nullable(ACCEPTED[name]) for name in (
        "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "max_new_tokens", "min_new_tokens", "seed", "cache_salt")}
    parameters["stop_sequences"] = nullable(ACCEPTED["stop"])
    parameters["n"] = nullable({"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES,
                                "description": "1 on /generate_stream"})
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}
    return json_body_openapi(
        NativeRequest,
        "LightLLM's request: `inputs` (text) or `messages` (a chat), and `parameters`",
        documented={
            "NativeRequest": {
                "inputs": {"type": "string", "minLength": 1},
                "messages": {"type": "array", "minItems": 1, "items": message},
            },
            "NativeParameters": parameters,
        },
        # one of the two, never both
        constraints={"oneOf": [{"required": ["inputs"], "not": {"required": ["messages"]}},
                               {"required": ["messages"], "not": {"required": ["inputs"]}}]},
    )


def native_routes(client: AsyncEngineClient) -> APIRouter:
    router = APIRouter()
    body_doc = request_body_doc()

    @router.post("/generate", openapi_extra=body_doc)
    async def generate(request: Request):
        try:
            prompt, params, return_details = await _parse(request)
        except BadRequest as exc:
            client.metrics.requests_rejected.inc(status=str(exc.status))
            return error_response(exc.status, exc.message)
        n = params.n
        texts = [""] * n
        details: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        finish_reasons: list[str | None] = [None] * n
        counts = [0] * n
        prompt_tokens = 0
        try:
            async for index, out in client.generate(params, **prompt):
                texts[index] += out.text
                counts[index] = out.output_len
                finish_reasons[index] = out.finish_reason
                prompt_tokens = out.prompt_len
                if return_details:
                    details[index].append(token_details(out))
        except RequestRejected as exc:
            return error_response(exc.status, exc.message, exc.headers)
        result: dict[str, Any] = {
            "generated_text": texts,
            "count_output_tokens": sum(counts),
            "finish_reason": finish_reasons[0],
            "prompt_tokens": prompt_tokens,
        }
        if n > 1:
            result["finish_reasons"] = finish_reasons
        if return_details:
            result["tokens"] = details[0] if n == 1 else details
        return JSONResponse(result)

    @router.post("/generate_stream", openapi_extra=body_doc)
    async def generate_stream(request: Request):
        try:
            prompt, params, _ = await _parse(request)
            if params.n != 1:
                raise BadRequest(400, "parameters.n must be 1 for /generate_stream")
        except BadRequest as exc:
            client.metrics.requests_rejected.inc(status=str(exc.status))
            return error_response(exc.status, exc.message)
        outputs = client.generate(params, **prompt)
        try:
            # wait for the first token so a refused input still gets a 400, not a broken stream
            first = await anext(outputs)
        except RequestRejected as exc:
            await outputs.aclose()
            return error_response(exc.status, exc.message, exc.headers)

        async def events():
            try:
                yield stream_event(first[1])
                async for _, out in outputs:
                    yield stream_event(out)
            except RequestRejected:
                pass  # the pipeline stopped mid-answer: the stream ends without a finished event
            finally:
                await outputs.aclose()

        return DisconnectAbortingStream(events(), media_type="text/event-stream")

    # LightLLM answers GET as POST; its body is {"success", "message"}, freed_slots is ours
    @router.post("/flush_cache")
    @router.get("/flush_cache")
    async def flush_cache():
        try:
            freed = await client.flush_cache()
        except RequestRejected as exc:
            return error_response(exc.status, exc.message, exc.headers)
        message = f"the prefix cache was flushed: {freed} KV slots freed (entries running requests use stay)"
        return JSONResponse({"success": True, "message": message, "freed_slots": freed})

    return router


@hookimpl(tryfirst=True)
def register_routes(app, engine) -> None:
    """The built-in plugin "native": LightLLM's /generate, /generate_stream, /flush_cache and
    (server/native_pooling.py) /get_score."""
    from lightllm_plugin.server.native_pooling import pooling_routes

    app.include_router(native_routes(engine))
    app.include_router(pooling_routes(engine))
