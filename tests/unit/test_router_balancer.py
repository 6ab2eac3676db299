"""Least outstanding requests, with prefix affinity only while load is balanced."""

from __future__ import annotations

from dataclasses import dataclass

from fastboot.router.balancer import HIT, IMBALANCED, MISS, Balancer, prompt_text


@dataclass
class R:
    id: str
    inflight: int = 0


def test_least_outstanding_wins_and_ties_rotate_deterministically() -> None:
    balancer = Balancer()
    a, b, c = R("a", 3), R("b", 1), R("c", 1)
    picks = [balancer.choose([a, b, c], [], now=0)[0].id for _ in range(4)]
    assert picks == ["b", "c", "b", "c"]
    assert balancer.choose([a, R("d", 0)], [], now=0)[0].id == "d"


def test_prefix_keys_are_chained_per_whole_block() -> None:
    balancer = Balancer(block_chars=4, blocks=3)
    assert balancer.prefix_keys("abc") == []
    keys = balancer.prefix_keys("abcdefghijklmnop")
    assert len(keys) == 3  # capped at `blocks`
    assert balancer.prefix_keys("abcdefgh") == keys[:2]
    assert balancer.prefix_keys("abcdXXXX")[0] == keys[0]
    assert balancer.prefix_keys("abcdXXXX")[1] != keys[1]


def test_same_prefix_goes_to_the_same_replica_while_balanced() -> None:
    balancer = Balancer(block_chars=4, imbalance=2)
    a, b = R("a"), R("b")
    keys = balancer.prefix_keys("system prompt, then a question")
    first, decision = balancer.choose([a, b], keys, now=0)
    assert decision == MISS
    first.inflight += 1  # the other replica is now the least loaded ...
    again, decision = balancer.choose([a, b], keys, now=1)
    assert (again.id, decision) == (first.id, HIT)  # ... but affinity wins while balanced
    other = balancer.prefix_keys("something else entirely, longer")
    assert balancer.choose([a, b], other, now=1)[0].id != first.id


def test_affinity_is_skipped_when_load_is_uneven() -> None:
    balancer = Balancer(block_chars=4, imbalance=2)
    a, b = R("a"), R("b")
    keys = balancer.prefix_keys("shared prefix text")
    chosen, _ = balancer.choose([a, b], keys, now=0)
    chosen.inflight = 10
    picked, decision = balancer.choose([a, b], keys, now=1)
    assert decision == IMBALANCED and picked is not chosen


def test_affinity_expires_after_the_ttl_and_ignores_unavailable_replicas() -> None:
    balancer = Balancer(block_chars=4, ttl_s=10)
    a, b = R("a"), R("b")
    keys = balancer.prefix_keys("shared prefix text")
    chosen, _ = balancer.choose([a, b], keys, now=0)
    assert balancer.choose([a, b], keys, now=20)[1] == MISS
    other = b if chosen is a else a
    # The remembered replica is not a candidate (full or gone): no hit, no error.
    assert balancer.choose([other], keys, now=21)[0] is other


def test_prompt_text_for_chat_completion_and_embedding_bodies() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert prompt_text(chat, 100) == "system\x00be brief\x00user\x00hi\x00"
    assert prompt_text({"prompt": "abcdef"}, 3) == "abc"
    assert prompt_text({"prompt": ["first", "second"]}, 100) == "first"
    assert prompt_text({"input": [1, 2, 3]}, 100) == "1,2,3"
    assert prompt_text({"model": "m"}, 100) == ""
