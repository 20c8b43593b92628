"""The detokenizer process: token ids in, text pieces out, stop strings enforced.

Text is released one piece per token, and the pieces of a request concatenate to exactly
its final text: bytes of an unfinished UTF-8 character and the start of a possible stop
string are held back until the next token settles them.
"""

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

logger = logging.getLogger(__name__)

# how many prompt tokens to decode along with the output, so that a tokenizer which drops
# the leading space of the first token of a string (SentencePiece) renders the first word right
PROMPT_CONTEXT_TOKENS = 4
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing token sequence a window at a time (prefix/read offsets), so the
    cost per token stays constant and a multi-byte character is never split."""

    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids)
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = len(self.ids)  # everything before this is already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int, final: bool = False) -> str:
        """Add one token; return the text it releases ("" while it ends mid-character)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""  # the character's remaining bytes come with the next token
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back any tail that could still
    grow into one, so no released text ever has to be taken back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text to release now, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = self._longest_partial_match(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


class RequestRenderer:
    """One request's text state: incremental decoding, then stop strings."""

    def __init__(self, tokenizer, start: DetokenizeStart, special_ids: frozenset[int]):
        self.detok = IncrementalDetokenizer(tokenizer, start.prompt_tail, start.skip_special_tokens)
        self.stops = StopStringMatcher(start.stop)
        self.special_ids = special_ids

    def render(self, event: TokenEvent) -> tuple[TokenOutput, bool]:
        """The output for one token, and whether it hit a stop string (the router must be told)."""
        final = event.finish_reason is not None
        text, stopped = self.stops.feed(self.detok.push(event.token_id, final=final))
        finish_reason = event.finish_reason
        if stopped:
            finish_reason = "stop"
        elif final:
            text += self.stops.flush()
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
        )
        return output, stopped

    def _token_strings(self, event: TokenEvent) -> list[str] | None:
        if event.top_logprobs is None:
            return None
        decode = self.detok.tokenizer.decode
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
            while True:
                try:
                    frame = inbox.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = ipc.decode_or_drop(decoder, frame, "detokenizer")
                if msg is not None:
                    detokenizer.handle(msg, outputs, finished_by_stop)
            for req_id in finished_by_stop:
                to_router.send(encoder.encode(FinishRequest(req_id=req_id)))
            if outputs:
                to_api.send(encoder.encode(OutputBatch(outputs=outputs)))
