"""Text from a growing token sequence: incremental decoding and stop strings, shared by the
detokenizer process and the offline `LLM`, so both release the same text for the same tokens.

Text is released one piece per token, and the pieces of a request concatenate to exactly its
final text: bytes of an unfinished UTF-8 character and the start of a possible stop string are
held back until the next token settles them.
"""

from __future__ import annotations

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
        self.reached: str | None = None  # the stop string found, once one is

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text to release now, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, self.reached = min(hits)
            return text[:at], True
        keep = partial_suffix_length(text, self.stops)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def partial_suffix_length(text: str, candidates: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `candidates`:
    the part of a stream that must be held back because the next piece may complete a match."""
    best = 0
    for candidate in candidates:
        for k in range(min(len(candidate) - 1, len(text)), best, -1):
            if text.endswith(candidate[:k]):
                best = k
                break
    return best


class TextStream:
    """One request's text: incremental decoding, then stop strings."""

    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool, stop: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer, context_ids, skip_special_tokens)
        self.stops = StopStringMatcher(stop)

    def push(self, token_id: int, final: bool) -> tuple[str, bool]:
        """The text one token releases, and whether it reached a stop string (the text is cut
        before it). On the last token (`final`) whatever was held back comes out too."""
        text, stopped = self.stops.feed(self.detok.push(token_id, final=final))
        if final and not stopped:
            text += self.stops.flush()
        return text, stopped
