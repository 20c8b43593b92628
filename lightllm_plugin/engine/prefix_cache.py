"""The prefix cache: a radix tree over token ids whose nodes own KV slots (page size 1).

A request reuses the slots of the longest prefix of its prompt that the tree holds and is
prefilled only from there; what it computes goes back into the tree, so the next request with
the same system prompt, tool list or chat history skips those tokens. Matching is at token
granularity: a prefix that ends in the middle of an edge splits the edge, nothing is rounded
down to a block.

Live requests lock the node their tokens end at (and so every node above it). Unlocked nodes
are evictable: their slots count as free for admission, and leaves are evicted least recently
used only when the slot free-list cannot serve an allocation.

Each `cache_salt` has its own tree, so requests with different salts never share KV.

Pure Python on purpose, like the scheduler: it is unit-tested without torch.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Sequence

__all__ = ["CacheNode", "PrefixCache", "common_prefix_length"]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists. Halving slices compares in C: a few
    dozen slice comparisons instead of a Python loop over thousands of tokens."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class CacheNode:
    """One edge of the tree: the tokens from its parent down to it, and their KV slots."""

    __slots__ = ("parent", "tokens", "slots", "children", "refs", "last_used", "depth")

    def __init__(self, parent: CacheNode | None, tokens: list[int], slots: list[int], last_used: int):
        self.parent = parent
        self.tokens = tokens
        self.slots = slots
        self.children: dict[int, CacheNode] = {}  # by first token
        self.refs = 0  # live requests whose tokens end at or below this node
        self.last_used = last_used
        self.depth = (parent.depth if parent is not None else 0) + len(tokens)  # tokens from the root

    def path_slots(self) -> list[int]:
        """The slots of every token from the root down to this node's end."""
        parts = []
        node = self
        while node is not None:
            parts.append(node.slots)
            node = node.parent
        return [s for part in reversed(parts) for s in part]


class PrefixCache:
    def __init__(self) -> None:
        self._roots: dict[str | None, CacheNode] = {}
        self._clock = itertools.count(1)
        self.cached_slots = 0  # slots the tree owns
        self.locked_slots = 0  # of those, the ones live requests use (not evictable)

    @property
    def evictable_slots(self) -> int:
        return self.cached_slots - self.locked_slots

    def root(self, salt: str | None) -> CacheNode:
        node = self._roots.get(salt)
        if node is None:
            node = self._roots[salt] = CacheNode(None, [], [], 0)
        return node

    # ---- lookup ------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], salt: str | None = None) -> CacheNode:
        """The node where the longest cached prefix of `tokens` ends (its `depth` is the match
        length; a root of depth 0 when nothing matches). An edge the prefix ends inside is split
        there, so the node can be locked. Nothing is locked here."""
        node = self.root(salt)
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = common_prefix_length(child.tokens, tokens[pos : pos + len(child.tokens)])
            if n < len(child.tokens):
                node = self._split(child, n)
                break
            node = child
            pos += n
        return node

    def _split(self, node: CacheNode, n: int) -> CacheNode:
        """Cut `node`'s edge after n tokens (0 < n < its length); returns the new upper node."""
        upper = CacheNode(node.parent, node.tokens[:n], node.slots[:n], node.last_used)
        upper.refs = node.refs  # whatever locks the lower part locks its ancestors too
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.slots = node.tokens[n:], node.slots[n:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def unlocked_slots_above(self, node: CacheNode) -> int:
        """Slots that locking `node` would take out of the evictable ones."""
        total = 0
        while node is not None and node.refs == 0:
            total += len(node.slots)
            node = node.parent
        return total

    # ---- references --------------------------------------------------------------------
    def lock(self, node: CacheNode) -> None:
        now = next(self._clock)
        while node is not None:
            if node.refs == 0:
                self.locked_slots += len(node.slots)
            node.refs += 1
            node.last_used = now
            node = node.parent

    def unlock(self, node: CacheNode) -> None:
        now = next(self._clock)
        while node is not None:
            if node.refs <= 0:
                raise RuntimeError("prefix cache: a node was unlocked more often than locked")
            node.refs -= 1
            if node.refs == 0:
                self.locked_slots -= len(node.slots)
            node.last_used = now
            node = node.parent

    # ---- insertion ---------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], slots: Sequence[int], salt: str | None = None) -> tuple[CacheNode, int]:
        """Put tokens and their slots into the tree. Returns the node where they end and how many
        leading tokens the tree held already: the tree keeps its own slots for those, and the
        caller's slots for them (where they differ) are the caller's to free. The tree takes
        ownership of slots[present:]."""
        if len(tokens) != len(slots):
            raise ValueError(f"prefix cache insert: {len(tokens)} tokens but {len(slots)} slots")
        tokens = list(tokens)
        node = self.match(tokens, salt)
        present = node.depth
        if present < len(tokens):
            child = CacheNode(node, tokens[present:], list(slots[present:]), next(self._clock))
            node.children[tokens[present]] = child
            self.cached_slots += len(child.slots)  # a new leaf is born unlocked
            node = child
        return node, present

    # ---- eviction ----------------------------------------------------------------------
    def evict(self, num_slots: int) -> list[int]:
        """Free at least num_slots slots (fewer only when fewer are evictable), taking unlocked
        leaves least recently used first. Returns the freed slots."""
        if num_slots <= 0:
            return []
        heap = [(leaf.last_used, id(leaf), leaf) for leaf in self._unlocked_leaves()]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_slots:
            _, _, leaf = heapq.heappop(heap)
            freed.extend(leaf.slots)
            parent = self._remove_leaf(leaf)
            if parent is not None and parent.parent is not None and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def flush(self) -> list[int]:
        """Evict every unlocked entry; returns the freed slots."""
        return self.evict(self.evictable_slots)

    def _unlocked_leaves(self) -> list[CacheNode]:
        leaves = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None and node.refs == 0:
                leaves.append(node)
        return leaves

    def _remove_leaf(self, leaf: CacheNode) -> CacheNode | None:
        parent = leaf.parent
        del parent.children[leaf.tokens[0]]
        self.cached_slots -= len(leaf.slots)
        if parent.parent is None and not parent.children:
            # an empty salt's root goes too, so a stream of one-off salts leaves nothing behind
            for salt, root in list(self._roots.items()):
                if root is parent:
                    del self._roots[salt]
            return None
        return parent

    # ---- checks --------------------------------------------------------------------------
    def all_slots(self) -> list[int]:
        """Every slot the tree owns (for invariant checks)."""
        out: list[int] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            out.extend(node.slots)
            stack.extend(node.children.values())
        return out
