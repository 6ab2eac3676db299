"""Which ready replica gets a request: least outstanding, with prefix affinity while balanced.

- Candidates are the model's ready replicas below their concurrency cap; in-flight counts are the
  router's own (incremented at dispatch), never scraped.
- Prefix affinity: a request's leading text is cut in blocks and hashed as a chain, so equal
  prefixes give equal leading keys. A table remembers which replica last served each key. When
  the candidates' in-flight counts differ by at most `imbalance`, the replica holding the longest
  matching chain wins (its KV cache likely has the prefix). Otherwise, or without a match, the
  least-outstanding replica wins, ties broken round-robin (deterministic, never random: llm-d
  PR #2515 saw random tie-breaks send whole bursts to one replica).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

HIT, MISS, IMBALANCED = "hit", "miss", "imbalanced"


class Routable(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def inflight(self) -> int: ...


R = TypeVar("R", bound=Routable)


def prompt_text(doc: Mapping[str, Any], limit: int) -> str:
    """The leading `limit` characters of the request's rendered input (chat, completion, embedding).

    Chat messages are joined as role and content, which is what the chat template puts first,
    so requests with the same system prompt and history share a prefix.
    """
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            piece = f"{message.get('role', '')}\x00{content or ''}\x00"
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                break
        return "".join(parts)[:limit]
    value = doc.get("prompt", doc.get("input"))
    if isinstance(value, list) and value:
        value = value[0] if isinstance(value[0], str | list) else value
    if isinstance(value, list):
        value = ",".join(map(str, value[: limit // 2]))
    return value[:limit] if isinstance(value, str) else ""


class Balancer:
    """Routing decisions for one router (its prefix table is shared by all models)."""

    def __init__(
        self,
        block_chars: int = 256,
        blocks: int = 8,
        imbalance: int = 8,
        ttl_s: float = 120.0,
        entries: int = 100_000,
    ) -> None:
        self.block_chars = block_chars
        self.blocks = blocks
        self.imbalance = imbalance
        self.ttl_s = ttl_s
        self.entries = entries
        self._table: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._turn = 0

    @property
    def text_limit(self) -> int:
        return self.block_chars * self.blocks

    def prefix_keys(self, text: str) -> list[int]:
        """Chained hashes of the text's whole leading blocks (a partial last block is ignored)."""
        keys: list[int] = []
        chain = 0
        size = self.block_chars
        for start in range(0, min(len(text), self.text_limit) - size + 1, size):
            chain = hash((chain, text[start : start + size]))
            keys.append(chain)
        return keys

    def choose(self, candidates: Sequence[R], keys: Sequence[int], now: float) -> tuple[R, str]:
        """Pick one of `candidates` (non-empty) and say how: hit, miss or imbalanced."""
        decision = MISS
        chosen: R | None = None
        if len(candidates) > 1 and keys:
            loads = [c.inflight for c in candidates]
            if max(loads) - min(loads) > self.imbalance:
                decision = IMBALANCED
            else:
                chosen = self._lookup(candidates, keys, now)
                if chosen is not None:
                    decision = HIT
        if chosen is None:
            least = min(c.inflight for c in candidates)
            ties = [c for c in candidates if c.inflight == least]
            chosen = ties[self._turn % len(ties)]
            self._turn += 1
        if keys:
            self._remember(keys, chosen.id, now)
        return chosen, decision

    def _lookup(self, candidates: Sequence[R], keys: Sequence[int], now: float) -> R | None:
        by_id = {c.id: c for c in candidates}
        for key in reversed(keys):
            entry = self._table.get(key)
            if entry is None:
                continue
            replica_id, seen = entry
            if now - seen > self.ttl_s:
                continue
            if (replica := by_id.get(replica_id)) is not None:
                return replica
        return None

    def _remember(self, keys: Sequence[int], replica_id: str, now: float) -> None:
        table = self._table
        for key in keys:
            table[key] = (replica_id, now)
            table.move_to_end(key)
        while len(table) > self.entries:
            table.popitem(last=False)
