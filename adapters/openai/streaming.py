"""Running a job on the engine and writing its outputs back, the same way for both routes:
whole, or as server-sent events. A route says only how its choices look (an `Answer`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from fastapi.responses import Response

from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.server.engine_client import AsyncEngineClient, RequestRejected
from lightllm_plugin.server.http_util import DisconnectAbortingStream
from lightllm_plugin.server.protocol import TokenOutput

from .protocol import invalid

DONE = b"data: [DONE]\n\n"


@dataclass
class Job:
    prompts: list[dict[str, Any]]  # generate() keyword arguments, one per prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token the client asked for; None: no logprobs
    renames: dict[str, str]  # engine field name -> the client's
    echo: list[str] = field(default_factory=list)  # completions: text put before each prompt's answers
    tools: bool = False  # parse tool calls out of the answers


@dataclass
class Sample:
    text: str = ""
    finish_reason: str | None = None
    tokens: list[TokenOutput] = field(default_factory=list)


class TokenUsage:
    """OpenAI's usage object, from the latest counts of each prompt and each sample."""

    def __init__(self):
        self.prompt_lens: dict[int, int] = {}
        self.cached_lens: dict[int, int] = {}
        self.output_lens: dict[tuple[int, int], int] = {}

    def count(self, k: int, i: int, out: TokenOutput) -> None:
        self.prompt_lens[k] = out.prompt_len
        self.output_lens[(k, i)] = out.output_len
        # a prompt is counted once however many samples it has: its samples are engine requests
        # of their own, and a later one may hit what an earlier one put in the cache
        if i == 0:
            self.cached_lens[k] = out.cached_len

    def body(self) -> dict[str, Any]:
        prompt_tokens = sum(self.prompt_lens.values())
        completion_tokens = sum(self.output_lens.values())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_lens.values())},
        }


class Answer(Protocol):
    """A route's shapes for one job's outputs."""

    job: Job
    chunk_head: dict[str, Any]  # the fields every stream chunk starts with

    async def whole(self, outputs: Outputs) -> dict[str, Any]:
        """The response body once every output is in."""

    def opening_choices(self) -> list[dict[str, Any]]:
        """Chunk choices sent before the first output."""

    def chunk_choice(self, k: int, i: int, out: TokenOutput) -> dict[str, Any] | None:
        """The chunk choice for one output of prompt k's sample i; None sends nothing."""


async def _pump(k: int, stream, queue: asyncio.Queue) -> None:
    try:
        async for index, out in stream:
            queue.put_nowait((k, index, out))
    except Exception as exc:  # noqa: BLE001  RequestRejected, or the pipeline's failure: the reader raises it
        queue.put_nowait(exc)
    queue.put_nowait(None)


async def merged(client: AsyncEngineClient, job: Job) -> AsyncIterator[tuple[int, int, TokenOutput]]:
    """(prompt index, sample index, output) for all prompts, as the tokens come. Closing
    this closes every prompt's stream, which aborts what is still running."""
    # OpenAI clients expect prompt + max_tokens over the context to be refused, not shortened
    streams = [client.generate(job.params, lower_max_new_tokens=False, **p) for p in job.prompts]
    if len(streams) == 1:
        try:
            async for index, out in streams[0]:
                yield 0, index, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(k, s, queue)) for k, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


class Outputs:
    """A job's merged outputs, the first already taken (so a refusal is known before any
    response starts) and given back first."""

    def __init__(self, first: tuple[int, int, TokenOutput], rest: AsyncIterator[tuple[int, int, TokenOutput]]):
        self.first = first
        self.rest = rest

    async def __aiter__(self) -> AsyncIterator[tuple[int, int, TokenOutput]]:
        yield self.first
        async for item in self.rest:
            yield item

    async def aclose(self) -> None:
        await self.rest.aclose()


async def start(client: AsyncEngineClient, job: Job) -> Outputs:
    """Raises RequestRejected when the job is refused before its first output."""
    rest = merged(client, job)
    try:
        first = await anext(rest)
    except RequestRejected:
        await rest.aclose()
        raise
    return Outputs(first, rest)


async def collect(outputs: Outputs, keep_tokens: bool) -> tuple[dict[tuple[int, int], Sample], TokenUsage]:
    samples: dict[tuple[int, int], Sample] = {}
    usage = TokenUsage()
    async for k, i, out in outputs:
        sample = samples.setdefault((k, i), Sample())
        sample.text += out.text
        sample.finish_reason = out.finish_reason
        usage.count(k, i, out)
        if keep_tokens:
            sample.tokens.append(out)
    return samples, usage


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def _rejected(exc: RequestRejected, job: Job) -> Response:
    return invalid(exc.message, exc.status, job.renames).response(exc.headers)


async def respond(client: AsyncEngineClient, answer: Answer) -> Response:
    """Run the answer's job; a refusal before the first token is an error response, not a broken stream."""
    job = answer.job
    try:
        outputs = await start(client, job)
    except RequestRejected as exc:
        return _rejected(exc, job)
    if job.stream:
        return DisconnectAbortingStream(events(outputs, answer), media_type="text/event-stream")
    try:
        body = await answer.whole(outputs)
    except RequestRejected as exc:
        return _rejected(exc, job)
    finally:
        await outputs.aclose()
    return Response(msgspec.json.encode(body), media_type="application/json")


async def events(outputs: Outputs, answer: Answer) -> AsyncIterator[bytes]:
    head = answer.chunk_head
    usage = TokenUsage()
    try:
        for choice in answer.opening_choices():
            yield sse({**head, "choices": [choice], "usage": None})
        async for k, i, out in outputs:
            usage.count(k, i, out)
            choice = answer.chunk_choice(k, i, out)
            if choice is not None:
                yield sse({**head, "choices": [choice], "usage": None})
        if answer.job.include_usage:
            yield sse({**head, "choices": [], "usage": usage.body()})
    except RequestRejected as exc:  # the pipeline stopped mid-answer
        yield sse(invalid(exc.message, exc.status, answer.job.renames).body())
    finally:
        await outputs.aclose()
    yield DONE
