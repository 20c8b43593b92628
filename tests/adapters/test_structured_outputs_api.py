"""Structured outputs through every API shape, on the shared default-model server: the official
`openai` SDK's parse() and raw json_schema (validated by pydantic), vLLM's structured_outputs
and guided_* fields, LightLLM's native parameters, and the 400s for bad constraints."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pydantic
import pytest


class City(pydantic.BaseModel):
    # bounded, so a sampled answer always ends within max_tokens
    name: str = pydantic.Field(max_length=16)
    country: str = pydantic.Field(max_length=16)
    population_millions: int = pydantic.Field(ge=0, le=99)


PROMPTS = [
    "Tell me about Paris.", "Describe Tokyo.", "What do you know about Rome?", "Give facts about Cairo.",
    "Describe a big city in Brazil.", "Tell me about London.", "What is Berlin like?", "Describe Madrid.",
    "Tell me about a city in India.", "Describe New York.",
]
# the schema bounds each string to 16 characters; an escaped character costs several tokens
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def client(default_server):
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def _in_parallel(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.mark.slow
def test_sdk_parse_and_raw_json_schema_validate_on_ten_prompts_greedy_and_sampled(client):
    model = client.models.list().data[0].id
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True}}

    def ask(job):
        i, prompt = job
        messages = [{"role": "user", "content": prompt}]
        sampled = {"temperature": 1.0, "top_p": 0.95, "seed": i} if i % 2 else {"temperature": 0}
        if i < 5:  # the SDK builds the json_schema from the pydantic model and parses the answer
            done = client.chat.completions.parse(model=model, messages=messages, response_format=City,
                                                 max_tokens=MAX_TOKENS, **sampled)
            choice = done.choices[0]
            assert isinstance(choice.message.parsed, City), choice.message.content
            return choice.finish_reason
        done = client.chat.completions.create(model=model, messages=messages, response_format=schema,
                                              max_tokens=MAX_TOKENS, **sampled)
        City.model_validate_json(done.choices[0].message.content)
        return done.choices[0].finish_reason

    assert _in_parallel(ask, list(enumerate(PROMPTS))) == ["stop"] * 10


def test_vllm_fields_regex_choice_grammar_and_json_object(client):
    model = client.models.list().data[0].id
    grammar = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]*\nop ::= "+" | "-" | "*"'

    def ask(kind):
        if kind == "regex":
            out = client.completions.create(model=model, prompt="My phone number is", max_tokens=12,
                                            extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
            assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text), out.choices[0].text
        elif kind == "choice":
            out = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8,
                temperature=0, extra_body={"guided_choice": ["yes", "no"]})
            assert out.choices[0].message.content in ("yes", "no")
        elif kind == "grammar":
            out = client.completions.create(model=model, prompt="An arithmetic expression:", max_tokens=16,
                                            temperature=0, extra_body={"guided_grammar": grammar})
            text = out.choices[0].text
            match = re.fullmatch(r"\(([1-9]\d*) ([+*-]) ([1-9]\d*)\)", text)
            assert match and out.choices[0].finish_reason == "stop", text
        else:
            out = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Give me a JSON object about a dog."}],
                max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"})
            if out.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(out.choices[0].message.content), dict)
            else:  # cut by max_tokens: still a prefix of an object
                assert out.choices[0].message.content.startswith("{")

    _in_parallel(ask, ["regex", "choice", "grammar", "json_object"])


def test_native_parameters_hold_the_output(default_server):
    url = default_server.url + "/generate"
    schema = City.model_json_schema()
    tokens = httpx.post(url, json={"inputs": "yes", "parameters": {"max_new_tokens": 1}}, timeout=60).json()

    def ask(parameters):
        body = {"messages": [{"role": "user", "content": "Tell me about Paris."}],
                "parameters": {"max_new_tokens": MAX_TOKENS, **parameters}}
        return httpx.post(url, json=body, timeout=120)

    answers = _in_parallel(ask, [{"guided_json": schema}, {"regular_constraint": "[A-Z][a-z]{2,8}"},
                                 {"guided_grammar": 'root ::= "It is " ("big" | "small") "."'},
                                 {"allowed_token_ids": [28, 29], "ignore_eos": True, "max_new_tokens": 4,
                                  "do_sample": True, "return_details": True}])
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    City.model_validate_json(answers[0].json()["generated_text"][0])
    assert re.fullmatch("[A-Z][a-z]{2,8}", answers[1].json()["generated_text"][0])
    assert answers[2].json()["generated_text"][0] in ("It is big.", "It is small.")
    assert {t["id"] for t in answers[3].json()["tokens"]} <= {28, 29}
    assert tokens["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("body, param, problem", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "invalid JSON schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs", "invalid grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "one output constraint"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one of"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
])
def test_bad_constraints_are_400s_naming_the_field(default_server, body, param, problem):
    model = httpx.get(default_server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    for route, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                         ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(default_server.url + route, json={"model": model, "max_tokens": 4, **extra, **body}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert problem in error["message"] and error["param"] == param, error


@pytest.mark.parametrize("parameters, problem", [
    ({"guided_json": {"type": "nonsense"}}, "parameters.guided_json: invalid JSON schema"),
    ({"regular_constraint": "[a-"}, "parameters.regular_constraint: invalid regex"),
    ({"guided_grammar": "root ::= "}, "parameters.guided_grammar: invalid grammar"),
    ({"guided_json": {}, "regular_constraint": "a"}, "one output constraint"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
])
def test_bad_native_constraints_are_400s_in_lightllm_shape(default_server, parameters, problem):
    r = httpx.post(default_server.url + "/generate", json={"inputs": "hi", "parameters": parameters}, timeout=60)
    assert r.status_code == 400, r.text
    assert problem in r.text
