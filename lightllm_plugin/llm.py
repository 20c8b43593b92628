"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, params)` and `.chat(...)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from tqdm import tqdm

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.core import EngineCore
from lightllm_plugin.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: chosen id and top-k alternatives


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


@dataclass
class _Pending:
    """One sub-request (one of n) while it runs."""

    parent: int
    index: int
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None


class LLM:
    """An engine in this process. `LLM()` loads the default model (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, progress: bool = True, **overrides: Any):
        if config is None:
            config = EngineConfig(model_dir=model, **overrides)
        elif model is not None or overrides:
            config = config.replace(**({"model_dir": model} if model is not None else {}), **overrides)
        self.config = config
        self._ranks = None  # tp > 1: the processes of ranks 1..tp-1, rank 0's group and plan sender
        if config.tp > 1:
            from lightllm_plugin.engine.tp_worker import OfflineRanks, join_as_rank_zero

            ranks = OfflineRanks(config)
            try:
                group, sender = join_as_rank_zero(config, ranks.run_dir)
                self.engine = EngineCore(config, progress=progress, tp_group=group, plan_sender=sender)
            except BaseException:
                ranks.close()
                raise
            self._ranks = (ranks, group, sender)
        else:
            self.engine = EngineCore(config, progress=progress)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (tp > 1); nothing to do otherwise."""
        if self._ranks is not None:
            ranks, group, sender = self._ranks
            self._ranks = None
            ranks.close()
            group.close()
            sender.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- public API --------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        texts, id_lists = self._normalize_prompts(prompts)
        return self._run(texts, id_lists, sampling_params, use_tqdm)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a prompt")
        texts = [
            self.tokenizer.apply_chat_template(
                list(conv), tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            for conv in conversations
        ]
        # the template already holds any bos token; don't add special tokens twice
        id_lists = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return self._run(texts, id_lists, sampling_params, use_tqdm)

    # ---- internals ---------------------------------------------------------------------
    def _normalize_prompts(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [list(prompts)]
        texts: list[str | None] = []
        id_lists: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                id_lists.append(self.tokenizer.encode(p))
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                texts.append(None)
                id_lists.append(list(p["prompt_token_ids"]))
            elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
                texts.append(None)
                id_lists.append(list(p))
            else:
                raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
        return texts, id_lists

    def _run(self, texts, id_lists, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(id_lists) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(id_lists):
            raise ValueError(f"{len(params_list)} sampling params for {len(id_lists)} prompts")
        engine = self.engine
        # check everything first so a bad prompt leaves nothing queued
        for ids, params in zip(id_lists, params_list):
            engine.validate(ids, _single(params, 0))

        pending: dict[int, _Pending] = {}
        results = [RequestOutput(request_id=i, prompt=t, prompt_token_ids=ids) for i, (t, ids) in enumerate(zip(texts, id_lists))]
        for i, (ids, params) in enumerate(zip(id_lists, params_list)):
            for k in range(params.n):
                sub = _single(params, k)
                rid = engine.new_request_id()
                engine.add_request(rid, ids, sub)
                pending[rid] = _Pending(parent=i, index=k, params=sub, logprobs=[] if sub.logprobs is not None else None)

        done: list[_Pending] = []
        bar = tqdm(total=len(pending), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while engine.has_unfinished():
                for event in engine.step():
                    p = pending[event.req_id]
                    p.token_ids.append(event.token_id)
                    if p.logprobs is not None and event.logprob is not None:
                        entry = {event.token_id: event.logprob}
                        entry.update({tid: lp for tid, lp in event.top_logprobs or []})
                        p.logprobs.append(entry)
                        p.cumulative += event.logprob
                    if event.finish_reason is not None:
                        p.finish_reason = event.finish_reason
                        if event.finish_reason == "stop" and event.token_id in p.params.stop_token_ids:
                            p.stop_reason = event.token_id
                    elif p.params.stop and self._cut_at_stop_string(p):
                        engine.finish(event.req_id)
                    if p.finish_reason is not None:
                        done.append(pending.pop(event.req_id))
                        bar.update(1)
        finally:
            bar.close()
            for rid in list(pending):  # an exception mid-run must not leak slots
                engine.abort(rid)

        for p in done:
            if p.text is None:
                p.text = self.tokenizer.decode(p.token_ids, skip_special_tokens=p.params.skip_special_tokens)
                if p.params.stop:
                    self._cut_at_stop_string(p)
            results[p.parent].outputs.append(
                CompletionOutput(
                    index=p.index,
                    text=p.text,
                    token_ids=p.token_ids,
                    finish_reason=p.finish_reason,
                    stop_reason=p.stop_reason,
                    cumulative_logprob=p.cumulative if p.logprobs is not None else None,
                    logprobs=p.logprobs,
                )
            )
        for r in results:
            r.outputs.sort(key=lambda o: o.index)
        return results

    def _cut_at_stop_string(self, p: _Pending) -> bool:
        """If the text so far holds a stop string, cut it there and mark the request finished."""
        text = p.text if p.text is not None else self.tokenizer.decode(p.token_ids, skip_special_tokens=p.params.skip_special_tokens)
        hits = [(text.find(s), s) for s in p.params.stop if s in text]
        if not hits:
            return False
        pos, stop = min(hits)
        p.text = text[:pos]
        p.finish_reason, p.stop_reason = "stop", stop
        return True


def _single(params: SamplingParams, index: int) -> SamplingParams:
    """The k-th of n samples: n=1, and a distinct seed derived from the request's seed."""
    seed = None if params.seed is None else params.seed + index
    return msgspec.structs.replace(params, n=1, seed=seed)
