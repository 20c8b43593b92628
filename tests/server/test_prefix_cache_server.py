"""The prefix cache seen from outside: cached tokens in OpenAI's usage, the Prometheus counters,
cache_salt on both APIs, POST /flush_cache. Most tests run on the session's shared default
server (the cache on), greedy and a few tokens long; the router, client and route pieces also
run alone, without a model.

Each test makes its prompts unique (a uuid in the text) or takes a fresh salt, so what earlier
tests cached cannot change its counts. Counters are read as deltas around a test's own requests:
the tests of a session run one at a time, so the deltas are exact.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import types
import uuid

import httpx
import openai
import pytest
import zmq
import zmq.asyncio
from support.live_server import metric

from lightllm_plugin.server.protocol import (
    Addresses,
    ApiInbox,
    CacheFlushed,
    EngineStats,
    FlushCache,
    RouterInbox,
    decoder_for,
    encoder,
)

QUERIES = "lightllm_prefix_cache_queries_total"
HITS = "lightllm_prefix_cache_hits_total"
CACHED_SLOTS = "lightllm_kv_slots_cached"
TIMEOUT = httpx.Timeout(120.0)


# ---- the pieces alone --------------------------------------------------------------------
class _Sink:
    def __init__(self):
        self.messages = []

    def send(self, frame: bytes) -> None:
        self.messages.append(decoder_for(ApiInbox).decode(frame))


class _CachingCore:
    """A stand-in engine whose cache holds 5 slots, 2 of them under a running request."""

    num_running = 1
    num_waiting = 0
    total_slots = 100
    cache_query_tokens = 40
    cache_hit_tokens = 30

    def __init__(self):
        self.prefix_cache = types.SimpleNamespace(evictable_slots=3)
        self.cached_slots = 5
        self.used_slots = 9  # 4 private to the running request, 5 the cache's

    def flush_cache(self):
        self.prefix_cache.evictable_slots, self.cached_slots, self.used_slots = 0, 2, 6
        return 3


def test_the_router_reports_the_cache_and_answers_a_flush_after_the_emptied_figures():
    from lightllm_plugin.server.router import Router

    api = _Sink()
    router = Router(_CachingCore(), _Sink(), api)
    router.report_stats(force=True)
    router.handle(FlushCache(id=7))
    # evictable entries count as free in used_slots; the cache's own slots are cached_slots
    assert api.messages == [
        EngineStats(1, 0, 6, 100, cache_query_tokens=40, cache_hit_tokens=30, cached_slots=5),
        EngineStats(1, 0, 6, 100, cache_query_tokens=40, cache_hit_tokens=30, cached_slots=2),
        CacheFlushed(id=7, freed_slots=3),
    ]


def test_the_client_turns_cumulative_figures_into_counters_and_a_gauge():
    from lightllm_plugin.server.engine_client import AsyncEngineClient

    client = AsyncEngineClient(Addresses("/nonexistent"))
    for queries, hits, cached in ((10, 0, 12), (25, 9, 20), (25, 9, 0)):
        client._record_stats(EngineStats(0, 0, 0, 100, cache_query_tokens=queries, cache_hit_tokens=hits,
                                         cached_slots=cached))
    m = client.metrics
    assert (m.prefix_cache_queries.get(), m.prefix_cache_hits.get(), m.kv_slots_cached.value) == (25, 9, 0)
    text = m.render()
    assert f"# TYPE {QUERIES} counter" in text and f"# TYPE {CACHED_SLOTS} gauge" in text


async def test_the_client_flush_waits_for_its_answer_and_gives_up_after_its_bound():
    from lightllm_plugin.server.engine_client import AsyncEngineClient, RequestRejected

    with tempfile.TemporaryDirectory(dir="/tmp") as run_dir:  # ipc paths must stay short
        addresses = Addresses(run_dir)
        client = AsyncEngineClient(addresses)
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.PULL)
        router.bind(addresses.router)
        await client.start()
        to_api = ctx.socket(zmq.PUSH)
        to_api.connect(addresses.api)
        try:
            async def answer_one():
                msg = decoder_for(RouterInbox).decode(await router.recv())
                assert isinstance(msg, FlushCache)
                await to_api.send(encoder.encode(CacheFlushed(id=msg.id, freed_slots=42)))

            answering = asyncio.create_task(answer_one())
            assert await client.flush_cache(timeout=10) == 42
            await answering
            with pytest.raises(RequestRejected) as info:
                await client.flush_cache(timeout=0.2)  # nobody answers this one
            assert info.value.status == 504 and not client._flushes
        finally:
            await client.close()
            ctx.destroy(linger=0)


class _FlushingEngine:
    def __init__(self, result):
        from lightllm_plugin.server.metrics import ServerMetrics

        self.metrics = ServerMetrics()
        self.result = result

    async def flush_cache(self):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _app_client(engine, api_key=None):
    from fastapi.testclient import TestClient

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.server.api import create_app

    return TestClient(create_app(engine, EngineConfig(api_key=api_key)))


def test_flush_cache_needs_the_api_key_and_answers_in_lightllms_shape():
    http = _app_client(_FlushingEngine(7), api_key="sk-flush")
    for method in ("POST", "GET"):  # LightLLM serves both
        assert http.request(method, "/flush_cache").status_code == 401
        wrong = http.request(method, "/flush_cache", headers={"Authorization": "Bearer sk-other"})
        assert wrong.status_code == 401
        r = http.request(method, "/flush_cache", headers={"Authorization": "Bearer sk-flush"})
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["freed_slots"] == 7
        assert isinstance(r.json()["message"], str)


def test_a_flush_the_router_does_not_answer_is_an_error_in_lightllms_shape():
    from lightllm_plugin.server.engine_client import RequestRejected

    r = _app_client(_FlushingEngine(RequestRejected("the router did not answer", 504))).post("/flush_cache")
    assert r.status_code == 504 and r.json() == {"error": "the router did not answer"}


# ---- against the default server ----------------------------------------------------------
@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def unique(text: str) -> str:
    return f"[{uuid.uuid4().hex}] {text}"


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def settled(server, name: str, want: float, timeout: float = 10.0) -> float:
    """The metric once it reads `want` (the router reports its figures every 0.1 s at most, on a
    path of its own), or whatever it reads after `timeout`."""
    deadline = time.monotonic() + timeout
    while (value := metric(server, name)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def complete(client, model, prompt, **extra):
    return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, **extra)


def test_a_repeated_prompt_reads_all_but_its_last_token_from_the_cache(server, client, model):
    prompt = unique("The quick brown fox jumps over the lazy dog, and then")
    queries, hits = metric(server, QUERIES), metric(server, HITS)
    first = complete(client, model, prompt)
    second = complete(client, model, prompt)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == n and cached(first.usage) < n - 1
    assert cached(second.usage) == n - 1  # the last prompt token is always computed
    assert second.choices[0].text == first.choices[0].text
    assert settled(server, QUERIES, queries + 2 * n) == queries + 2 * n
    want_hits = hits + cached(first.usage) + cached(second.usage)
    assert settled(server, HITS, want_hits) == want_hits


def test_the_streamed_usage_chunk_carries_the_cached_tokens(server, client, model):
    question = [{"role": "user", "content": unique("Name a colour.")}]
    whole = client.chat.completions.create(model=model, messages=question, max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=question, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
    assert cached(usage) == usage.prompt_tokens - 1


def test_a_prompt_is_counted_once_whatever_its_samples_and_prompts_add_up(client, model):
    salt = uuid.uuid4().hex  # a tree of its own: nothing is cached under it yet
    prompts = [unique("Apples are"), "Bananas grow " + uuid.uuid4().hex]  # no first token in common
    first = complete(client, model, prompts, n=2, extra_body={"cache_salt": salt})
    second = complete(client, model, prompts, n=2, extra_body={"cache_salt": salt})
    assert len(second.choices) == 4 and second.usage.prompt_tokens == first.usage.prompt_tokens
    assert cached(first.usage) == 0
    # each prompt counts its sample 0's cached tokens, all of its prompt but the last token
    assert cached(second.usage) == second.usage.prompt_tokens - 2


def test_different_salts_never_share_entries_and_the_same_salt_does(client, model):
    prompt = unique("Once upon a time in a small village")
    plain = complete(client, model, prompt)
    n = plain.usage.prompt_tokens
    salt_a, salt_b = uuid.uuid4().hex, uuid.uuid4().hex
    assert cached(complete(client, model, prompt, extra_body={"cache_salt": salt_a}).usage) == 0
    assert cached(complete(client, model, prompt, extra_body={"cache_salt": salt_b}).usage) == 0
    assert cached(complete(client, model, prompt, extra_body={"cache_salt": salt_a}).usage) == n - 1
    assert cached(complete(client, model, prompt).usage) == n - 1  # the unsalted entry is still there
    question = [{"role": "user", "content": prompt}]
    for _ in range(2):  # the chat route takes it too
        chat = client.chat.completions.create(model=model, messages=question, max_tokens=4, temperature=0,
                                              extra_body={"cache_salt": salt_b})
    assert cached(chat.usage) == chat.usage.prompt_tokens - 1


def test_an_empty_salt_is_refused_naming_the_field(server, client, model):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, model, "hi", extra_body={"cache_salt": ""})
    assert info.value.body["param"] == "cache_salt"
    r = httpx.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"cache_salt": ""}}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"].startswith("parameters.cache_salt")


def test_the_next_chat_turn_reads_the_history_from_the_cache(client, model):
    turn1 = [
        {"role": "system", "content": unique("You are a terse assistant.")},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first = client.chat.completions.create(model=model, messages=turn1, max_tokens=4, temperature=0)
    turn2 = turn1 + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.chat.completions.create(model=model, messages=turn2, max_tokens=4, temperature=0)
    # at least the whole first prompt: system prompt, first question and the assistant's header
    assert cached(second.usage) >= first.usage.prompt_tokens > cached(first.usage)
    assert cached(second.usage) < second.usage.prompt_tokens


def flush(server) -> dict:
    r = httpx.post(server.url + "/flush_cache", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    return r.json()


def test_flush_cache_empties_the_cache(server, client, model):
    flush(server)
    prompt = unique("A flush test: the cache holds this prompt until")
    n = complete(client, model, prompt).usage.prompt_tokens
    deadline = time.monotonic() + 10
    while metric(server, CACHED_SLOTS) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, CACHED_SLOTS) >= n  # the prompt, and what was computed of the answer
    assert flush(server)["freed_slots"] >= n
    # the router reports its figures before it answers: the gauge already reads the empty cache
    assert metric(server, CACHED_SLOTS) == 0 and metric(server, "lightllm_kv_slots_used") == 0
    assert cached(complete(client, model, prompt).usage) == 0


def test_native_generate_takes_a_cache_salt(server, client, model):
    salt = uuid.uuid4().hex
    text = unique("Native salted prompt about rivers and")
    body = {"inputs": text, "parameters": {"max_new_tokens": 4, "do_sample": False, "cache_salt": salt}}
    hits = metric(server, HITS)
    first = httpx.post(server.url + "/generate", json=body, timeout=TIMEOUT)
    second = httpx.post(server.url + "/generate", json=body, timeout=TIMEOUT)
    assert first.status_code == second.status_code == 200, first.text
    n = first.json()["prompt_tokens"]
    assert settled(server, HITS, hits + n - 1) == hits + n - 1  # the first nothing, the second all but one
    # the same entries through the OpenAI route: the salt, not the route, keys them
    assert cached(complete(client, model, text, extra_body={"cache_salt": salt}).usage) == n - 1
    assert cached(complete(client, model, text, extra_body={"cache_salt": uuid.uuid4().hex}).usage) == 0
