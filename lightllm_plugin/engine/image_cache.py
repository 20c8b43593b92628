"""An LRU cache of image embeddings (the vision tower's output) by the image's content hash, so an
image sent again (the next turn of a chat, the same picture to many users) skips the tower.
Bounded in bytes; the tensors stay on the model's device. A request holds its own references, so
an eviction never takes an embedding a prefill still needs."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
