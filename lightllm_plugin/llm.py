"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, params)` and `.chat(...)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from lightllm_plugin.chat_template import render_chat
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.core import EngineCore
from lightllm_plugin.images import ImageInputs, split_images
from lightllm_plugin.sampling_params import SamplingParams
from lightllm_plugin.text_stream import PROMPT_CONTEXT_TOKENS, TextStream


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: chosen id and top-k alternatives
    num_cached_tokens: int = 0  # prompt tokens this sample read from the prefix cache


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # vLLM's field: the prompt tokens sample 0 read from the prefix cache


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
    stream: TextStream | None = None  # its text, released piece by piece
    pieces: list[str] = field(default_factory=list)
    cached_len: int = 0


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
            import torch

            from lightllm_plugin.engine.tp_worker import OfflineRanks, join_as_rank_zero

            # rank 0 is this process: on CPU it takes its share of the cores until close()
            self._callers_threads = torch.get_num_threads()
            ranks = OfflineRanks(config)
            try:
                group, sender = join_as_rank_zero(config, ranks.run_dir)
                self.engine = EngineCore(config, progress=progress, tp_group=group, plan_sender=sender)
            except BaseException:
                ranks.close()
                torch.set_num_threads(self._callers_threads)
                raise
            self._ranks = (ranks, group, sender)
        else:
            self.engine = EngineCore(config, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._images: ImageInputs | None = None  # built at the first chat with images

    def close(self) -> None:
        """Stop the engine's worker threads, and the other tensor-parallel ranks (tp > 1) giving
        this process its threads back."""
        self.engine.close()
        if self._ranks is not None:
            ranks, group, sender = self._ranks
            self._ranks = None
            ranks.close()
            group.close()
            sender.close()
            import torch

            torch.set_num_threads(self._callers_threads)

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
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        texts, id_lists, image_lists = [], [], []
        for conv in conversations:
            # image parts (OpenAI's image_url, LangChain's image blocks) as the server takes them
            conv, sources = split_images(list(conv))
            self._image_inputs().check_count(sources)
            text, ids = render_chat(self.tokenizer, conv, chat_template_kwargs=chat_template_kwargs,
                                    add_generation_prompt=add_generation_prompt)
            ids, images = self._image_inputs().prepare(ids, sources, "messages")
            texts.append(text)
            id_lists.append(ids)
            image_lists.append(images)
        return self._run(texts, id_lists, sampling_params, use_tqdm, image_lists)

    def _image_inputs(self) -> ImageInputs:
        if self._images is None:
            c = self.config
            self._images = ImageInputs.for_model(c.resolved_model_path, c.limit_mm_per_prompt, c.max_image_pixels,
                                       c.allowed_media_domains, c.max_body_size)
        return self._images

    # ---- pooling models (lightllm_plugin/offline_pooling.py) ---------------------------
    def embed(self, prompts, *, dimensions: int | None = None, use_tqdm: bool = True):
        """Each prompt's embedding: `outputs.embedding` (truncated to `dimensions` on Matryoshka models)."""
        from lightllm_plugin import offline_pooling

        return offline_pooling.embed(self, prompts, dimensions, use_tqdm)

    def classify(self, prompts, *, use_tqdm: bool = True):
        """Each prompt's class probabilities, `outputs.probs`."""
        from lightllm_plugin import offline_pooling

        return offline_pooling.classify(self, prompts, use_tqdm)

    def reward(self, prompts, *, use_tqdm: bool = True):
        """Each prompt's raw pooled output, `outputs.data` (a reward model's score: `data[0]`)."""
        from lightllm_plugin import offline_pooling

        return offline_pooling.reward(self, prompts, use_tqdm)

    def score(self, text_1, text_2, *, use_tqdm: bool = True):
        """`outputs.score` of text_1 against each text_2 (cosine, or a cross-encoder's sigmoid)."""
        from lightllm_plugin import offline_pooling

        return offline_pooling.score(self, text_1, text_2, use_tqdm)

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

    def _run(self, texts, id_lists, sampling_params, use_tqdm: bool, image_lists=None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(id_lists) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(id_lists):
            raise ValueError(f"{len(params_list)} sampling params for {len(id_lists)} prompts")
        engine = self.engine
        if engine.pooler is not None:
            raise ValueError(f"this model is {engine.pooler.described()}: it does not generate; use "
                             f"LLM.{'embed' if engine.pooler.head == 'embed' else 'classify'} (or reward, score)")
        # check everything first so a bad prompt leaves nothing queued
        for ids, params in zip(id_lists, params_list):
            engine.validate(ids, params.for_sample(0))

        pending: dict[int, _Pending] = {}
        results = [RequestOutput(request_id=i, prompt=t, prompt_token_ids=ids) for i, (t, ids) in enumerate(zip(texts, id_lists))]
        for i, (ids, params) in enumerate(zip(id_lists, params_list)):
            for k in range(params.n):
                sub = params.for_sample(k)
                rid = engine.new_request_id()
                engine.add_request(rid, ids, sub, image_lists[i] if image_lists else None)
                stream = TextStream(self.tokenizer, ids[-PROMPT_CONTEXT_TOKENS:], sub.skip_special_tokens, sub.stop)
                pending[rid] = _Pending(parent=i, index=k, params=sub, stream=stream,
                                        logprobs=[] if sub.logprobs is not None else None)

        done: list[_Pending] = []
        bar = tqdm(total=len(pending), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while True:
                failed = engine.take_failed()  # ended without an event: a grammar that did not compile
                if failed:
                    raise ValueError(failed[0][1])
                if not engine.has_unfinished():
                    break
                for event in engine.step():
                    p = pending[event.req_id]
                    p.token_ids.append(event.token_id)
                    p.cached_len = event.cached_len
                    if p.logprobs is not None and event.logprob is not None:
                        entry = {event.token_id: event.logprob}
                        entry.update({tid: lp for tid, lp in event.top_logprobs or []})
                        p.logprobs.append(entry)
                        p.cumulative += event.logprob
                    piece, stopped = p.stream.push(event.token_id, final=event.finish_reason is not None)
                    p.pieces.append(piece)
                    if stopped:
                        p.finish_reason, p.stop_reason = "stop", p.stream.stops.reached
                        if event.finish_reason is None:
                            engine.finish(event.req_id)
                    elif event.finish_reason is not None:
                        p.finish_reason = event.finish_reason
                        if event.finish_reason == "stop" and event.token_id in p.params.stop_token_ids:
                            p.stop_reason = event.token_id
                    if p.finish_reason is not None:
                        done.append(pending.pop(event.req_id))
                        bar.update(1)
        finally:
            bar.close()
            for rid in list(pending):  # an exception mid-run must not leak slots
                engine.abort(rid)

        for p in done:
            results[p.parent].outputs.append(
                CompletionOutput(
                    index=p.index,
                    text="".join(p.pieces),
                    token_ids=p.token_ids,
                    finish_reason=p.finish_reason,
                    stop_reason=p.stop_reason,
                    cumulative_logprob=p.cumulative if p.logprobs is not None else None,
                    logprobs=p.logprobs,
                    num_cached_tokens=p.cached_len,
                )
            )
        for r in results:
            r.outputs.sort(key=lambda o: o.index)
            r.num_cached_tokens = r.outputs[0].num_cached_tokens if r.outputs else 0
        return results
