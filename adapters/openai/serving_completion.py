"""/v1/completions: prompts in (text or token ids, several at once), text choices out."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lightllm_plugin.server.protocol import TokenOutput

from .protocol import ApiError, CompletionRequest, sampling_params, token_strings, value_or
from .serving import OpenAIServer
from .streaming import Job, Outputs, collect, respond
from .structured import request_constraint

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def completion_prompts(prompt: Any) -> list[dict[str, Any]]:
    """The prompt field as one generate() input per prompt."""
    if isinstance(prompt, str):
        return [{"prompt": prompt, "field": "prompt"}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [{"prompt": p, "field": f"prompt[{i}]"} for i, p in enumerate(prompt)]
        if all(type(t) is int for t in prompt):
            return [{"prompt_ids": prompt, "field": "prompt"}]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return [{"prompt_ids": p, "field": f"prompt[{i}]"} for i, p in enumerate(prompt)]
    raise ApiError(
        400, "prompt must be a non-empty string, list of strings, list of token ids or list of token-id lists", "prompt"
    )


def completion_job(req: CompletionRequest) -> Job:
    prompts = completion_prompts(req.prompt)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != value_or(req.n, 1):
        raise ApiError(400, "best_of must equal n (best-of ranking is not supported)", "best_of")
    echo: list[str] = []
    if req.echo:
        if req.logprobs is not None:
            raise ApiError(400, "echo with logprobs needs prompt logprobs, which this server does not compute", "echo")
        if any("prompt" not in p for p in prompts):
            raise ApiError(400, "echo is supported for text prompts only", "echo")
        echo = [p["prompt"] for p in prompts]
    renames = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
    max_tokens = value_or(req.max_tokens, DEFAULT_MAX_TOKENS)
    params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, renames=renames,
                             constraint=request_constraint(req))
    return Job(
        prompts=prompts,
        params=params,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=req.logprobs,
        renames=renames,
        echo=echo,
    )


def completion_logprobs(tokens: list[TokenOutput], k: int, offset: int) -> dict[str, Any]:
    """The legacy shape: parallel lists; each top dict holds the top k and the chosen token."""
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for out in tokens:
        strings = token_strings(out)
        top = {s: lp for s, (_, lp) in zip(strings[1 : k + 1], (out.top_logprobs or [])[:k])}
        top.setdefault(strings[0], out.logprob)
        result["tokens"].append(strings[0])
        result["token_logprobs"].append(out.logprob)
        result["top_logprobs"].append(top)
        result["text_offset"].append(offset)
        offset += len(strings[0])
    return result


class CompletionAnswer:
    """/v1/completions' shapes of a job's outputs; choice k * n + i is prompt k's sample i."""

    def __init__(self, job: Job, head: dict[str, Any]):
        self.job = job
        self.head = head
        self.chunk_head = head
        # streaming: where each sample's next token starts in its text (text_offset of logprobs)
        self.offsets: dict[tuple[int, int], int] = {}

    def choice(
        self, k: int, i: int, text: str, tokens: list[TokenOutput], finish: str | None, offset: int
    ) -> dict[str, Any]:
        logprobs = None if self.job.logprobs is None else completion_logprobs(tokens, self.job.logprobs, offset)
        return {"index": k * self.job.params.n + i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def whole(self, outputs: Outputs) -> dict[str, Any]:
        job = self.job
        samples, usage = await collect(outputs, job.logprobs is not None)
        choices = []
        for k in range(len(job.prompts)):
            echo = job.echo[k] if job.echo else ""
            for i in range(job.params.n):
                s = samples[(k, i)]
                choices.append(self.choice(k, i, echo + s.text, s.tokens, s.finish_reason, len(echo)))
        return {**self.head, "choices": choices, "usage": usage.body()}

    def opening_choices(self) -> list[dict[str, Any]]:
        return []

    def chunk_choice(self, k: int, i: int, out: TokenOutput) -> dict[str, Any] | None:
        job = self.job
        text = out.text
        if (k, i) not in self.offsets and job.echo:
            text = job.echo[k] + text
        offset = self.offsets.get((k, i), len(job.echo[k]) if job.echo else 0)
        self.offsets[(k, i)] = offset + len(token_strings(out)[0])
        if not text and job.logprobs is None and out.finish_reason is None:
            return None
        tokens = [out] if job.logprobs is not None else []
        return self.choice(k, i, text, tokens, out.finish_reason, offset)


async def create_completion(server: OpenAIServer, request: Request) -> Response:
    try:
        req = await server.read(request, CompletionRequest)
        server.check_model(req.model)
        job = completion_job(req)
    except ApiError as exc:
        return server.refused(exc)
    return await respond(server.client, CompletionAnswer(job, server.head("cmpl", "text_completion")))
