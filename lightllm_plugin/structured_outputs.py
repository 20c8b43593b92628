"""StructuredOutputs: the one constraint a request puts on its output (a JSON schema, any JSON
object, a regex, a choice of strings, an EBNF grammar or a structural tag).

Pure python (no torch, no grammar library) like SamplingParams, which carries it across the
sockets: the HTTP front end builds it and checks what can be checked without a tokenizer; the
engine parses it with the grammar library before the request is queued (a bad schema, regex or
grammar is refused there) and compiles it once per distinct spec.
"""

from __future__ import annotations

import json

import msgspec

_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class StructuredOutputs(msgspec.Struct, kw_only=True, omit_defaults=True):
    """vLLM's StructuredOutputsParams: exactly one of the constraint fields is set."""

    json: str | None = None  # a JSON schema; a dict given here is kept as its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (the GBNF dialect vLLM and xgrammar read)
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text
    # False: JSON schemas are read as OpenAI's strict mode does (no properties beyond those listed)
    disable_additional_properties: bool = True
    # the request field the constraint came from, so an error names what the client sent
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            try:
                self.json = json.dumps(self.json)
            except (TypeError, ValueError):
                raise ValueError(f"{self.field}: the JSON schema is not JSON") from None
        if isinstance(self.structural_tag, dict):
            try:
                self.structural_tag = json.dumps(self.structural_tag)
            except (TypeError, ValueError):
                raise ValueError(f"{self.field}: the structural tag is not JSON") from None
        self.validate()

    def kinds(self) -> list[str]:
        return [k for k in _KINDS if getattr(self, k) is not None and getattr(self, k) is not False]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    def key(self) -> tuple:
        """Identifies the compiled grammar: requests with equal keys share one compilation."""
        value = getattr(self, self.kind)
        return (self.kind, tuple(value) if isinstance(value, list) else value, self.disable_additional_properties)

    def validate(self) -> None:
        """The checks that need no grammar library; raise ValueError naming the field."""
        if not isinstance(self.json_object, bool):
            raise ValueError(f"{self.field}: json_object must be true or false")
        kinds = self.kinds()
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"{self.field}: exactly one of {', '.join(_KINDS)} must be given, got {found}")
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError(f"{self.field}: the JSON schema must be an object or its JSON text")
            try:
                schema = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"{self.field}: the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{self.field}: a JSON schema must be an object, got {type(schema).__name__}")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{self.field}: {name} must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or any(
                    not isinstance(c, str) or not c for c in self.choice):
                raise ValueError(f"{self.field}: choice must be a non-empty list of non-empty strings")


def one_constraint(*candidates: tuple[str, StructuredOutputs | None]) -> StructuredOutputs | None:
    """The one constraint among those a request's fields gave (name, spec); two is an error
    naming both fields."""
    given = [(name, spec) for name, spec in candidates if spec is not None]
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise ValueError(f"{names}: a request takes one output constraint, got {len(given)}")
    return given[0][1] if given else None
