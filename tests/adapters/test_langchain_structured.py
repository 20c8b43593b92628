"""ChatLightLLM.with_structured_output on the default model (whose template takes no tools), by
both methods, returns an instance of the pydantic schema."""

from __future__ import annotations

import pydantic
import pytest

pytest.importorskip("langchain_core")

from lightllm_plugin.adapters.langchain import ChatLightLLM  # noqa: E402


class Capital(pydantic.BaseModel):
    """The capital of a country."""

    # bounded, so that the answer always ends within max_tokens
    country: str = pydantic.Field(max_length=12)
    capital: str = pydantic.Field(max_length=12)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_schema(default_server, method):
    chat = ChatLightLLM(base_url=default_server.url + "/v1", temperature=0, max_tokens=48)
    structured = chat.with_structured_output(Capital, method=method, include_raw=True)
    answer = structured.invoke("What is the capital of France?")
    assert isinstance(answer["parsed"], Capital), answer["raw"]
    assert answer["parsing_error"] is None
    if method == "function_calling":
        assert answer["raw"].tool_calls[0]["name"] == "Capital"
        assert answer["raw"].response_metadata["finish_reason"] == "tool_calls"
