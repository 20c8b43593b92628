"""The output constraint of a /v1 request, from each shape clients send it in: OpenAI's
`response_format` (json_object, json_schema), vLLM's `structured_outputs` body field and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields.

At most one may be given. What needs no grammar library (the shape, a schema that is not a
JSON object, two constraints at once) is refused here; a schema, regex or grammar the library
cannot parse is refused by the engine before the request is queued, naming the same field."""

from __future__ import annotations

from typing import Any

from lightllm_plugin.structured_outputs import StructuredOutputs, one_constraint

from .protocol import ApiError, invalid

# vLLM's structured_outputs keys -> ours
_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _spec(field: str, **constraint: Any) -> StructuredOutputs:
    try:
        return StructuredOutputs(field=field, **constraint)
    except ValueError as exc:
        raise invalid(str(exc)) from None


def response_format_constraint(response_format: dict[str, Any] | None) -> StructuredOutputs | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _spec("response_format", json_object=True)
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict) or not isinstance(body.get("schema", {}), (dict, bool)):
            raise ApiError(400, "response_format.json_schema must be {'name': ..., 'schema': {...}, 'strict': ...}",
                           "response_format")
        # a schema left out is any JSON value (OpenAI treats it so)
        return _spec("response_format.json_schema.schema", json=body.get("schema", {}))
    raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   "response_format")


def vllm_constraint(structured_outputs: dict[str, Any] | None) -> StructuredOutputs | None:
    if structured_outputs is None:
        return None
    if not isinstance(structured_outputs, dict):
        raise ApiError(400, "structured_outputs must be an object", "structured_outputs")
    given = {k: v for k, v in structured_outputs.items() if k in _VLLM_KEYS and v not in (None, False)}
    return _spec("structured_outputs", **given)


def request_constraint(req, *more: tuple[str, StructuredOutputs | None]) -> StructuredOutputs | None:
    """The one constraint of a chat or completion request (with `more`: the route's own, such
    as a forced tool call), None when it has none."""
    try:
        return one_constraint(
            *more,
            ("response_format", response_format_constraint(req.response_format)),
            ("structured_outputs", vllm_constraint(req.structured_outputs)),
            ("guided_json", None if req.guided_json is None else _spec("guided_json", json=req.guided_json)),
            ("guided_regex", None if req.guided_regex is None else _spec("guided_regex", regex=req.guided_regex)),
            ("guided_choice", None if req.guided_choice is None else _spec("guided_choice", choice=req.guided_choice)),
            ("guided_grammar", None if req.guided_grammar is None else _spec("guided_grammar", grammar=req.guided_grammar)),
        )
    except ValueError as exc:
        raise invalid(str(exc)) from None
