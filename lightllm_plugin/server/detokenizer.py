"""The detokenizer process: token ids in, text pieces out (lightllm_plugin/text_stream.py),
stop strings enforced: a request that reaches one is reported to the router to be finished."""

from __future__ import annotations

import logging
import os

import zmq

from lightllm_plugin import ipc
from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.outputs import TokenEvent
from lightllm_plugin.server import child_process
from lightllm_plugin.server.protocol import (
    Addresses,
    DetokenizeForget,
    DetokenizerInbox,
    DetokenizeStart,
    FinishRequest,
    OutputBatch,
    Ready,
    TokenBatch,
    TokenOutput,
    decoder_for,
    encoder,
)
from lightllm_plugin.text_stream import TextStream

logger = logging.getLogger(__name__)



class RequestRenderer:
    """One request's outputs: its text stream, and each token's id, logprobs and flags."""

    def __init__(self, tokenizer, start: DetokenizeStart, special_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.text = TextStream(tokenizer, start.prompt_tail, start.skip_special_tokens, start.stop)
        self.special_ids = special_ids

    def render(self, event: TokenEvent) -> tuple[TokenOutput, bool]:
        """The output for one token, and whether it hit a stop string (the router must be told)."""
        text, stopped = self.text.push(event.token_id, final=event.finish_reason is not None)
        finish_reason = "stop" if stopped else event.finish_reason
        output = TokenOutput(
            req_id=event.req_id,
            token_id=event.token_id,
            text=text,
            logprob=event.logprob,
            top_logprobs=event.top_logprobs,
            special=event.token_id in self.special_ids,
            finish_reason=finish_reason,
            output_len=event.output_len,
            prompt_len=event.prompt_len,
            logprob_tokens=self._token_strings(event),
            cached_len=event.cached_len,
        )
        return output, stopped

    def _token_strings(self, event: TokenEvent) -> list[str] | None:
        if event.top_logprobs is None:
            return None
        decode = self.tokenizer.decode
        return [decode([event.token_id])] + [decode([token_id]) for token_id, _ in event.top_logprobs]


class Detokenizer:
    """All live requests' renderers; turns inbox messages into outputs and finish orders."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self.requests: dict[int, RequestRenderer] = {}

    def handle(self, msg, outputs: list[TokenOutput], finished_by_stop: list[int]) -> None:
        if isinstance(msg, TokenBatch):
            for event in msg.events:
                renderer = self.requests.get(event.req_id)
                if renderer is None:
                    continue  # a request already cut at a stop string: the router had more in flight
                output, stopped = renderer.render(event)
                outputs.append(output)
                if output.finish_reason is not None:
                    del self.requests[event.req_id]
                if stopped:
                    finished_by_stop.append(event.req_id)
        elif isinstance(msg, DetokenizeStart):
            self.requests[msg.req_id] = RequestRenderer(self.tokenizer, msg, self.special_ids)
        elif isinstance(msg, DetokenizeForget):
            for req_id in msg.req_ids:
                self.requests.pop(req_id, None)


def run_detokenizer(config: EngineConfig, addresses: Addresses, parent_pid: int) -> None:
    """Process entry point."""
    child_process.bootstrap("detokenizer", parent_pid)
    detokenizer = Detokenizer(child_process.load_tokenizer_for(config))
    # a context left with open sockets would block the exit once the parent is gone
    with ipc.zmq_context() as ctx:
        inbox = ipc.open_socket(ctx, zmq.PULL, addresses.detokenizer, bind=True)
        to_router = ipc.open_socket(ctx, zmq.PUSH, addresses.router, bind=False)
        to_api = ipc.open_socket(ctx, zmq.PUSH, addresses.api, bind=False)
        control = ipc.open_socket(ctx, zmq.PUSH, addresses.control, bind=False)
        control.send(encoder.encode(Ready(role="detokenizer", pid=os.getpid())))
        decoder = decoder_for(DetokenizerInbox)
        while child_process.parent_alive(parent_pid):
            if not inbox.poll(1000):
                continue
            outputs: list[TokenOutput] = []
            finished_by_stop: list[int] = []
            # drain everything queued so one api message carries many tokens
            for msg in ipc.drain(inbox, decoder, "detokenizer"):
                detokenizer.handle(msg, outputs, finished_by_stop)
            for req_id in finished_by_stop:
                to_router.send(encoder.encode(FinishRequest(req_id=req_id)))
            if outputs:
                to_api.send(encoder.encode(OutputBatch(outputs=outputs)))
