"""Which engine replica gets a request: the one whose prefix cache most likely holds its prompt.

Serve's default (power of two choices) spreads requests without regard to their prompts, so
two turns of one chat, or two chats with one system prompt, land on different replicas and
each prefills the prefix again. `PrefixHashRouter` ranks the replicas by rendezvous hashing
of the prompt's first `prefix_tokens` token ids (the system prompt, the first turns): every
request with that opening prefers the same replica, and when replicas come or go only the
openings of the changed replica move. The other replicas follow in hash order as fallbacks,
which Serve tries when the preferred one is at `max_ongoing_requests`, so a hot prefix
cannot pile more on one replica than it takes.

Ray Serve LLM's prefix-aware router needs vLLM or SGLang installed, and matches text; this
one works on the token ids the ingress already has (the engine's `generate` call carries them
as its second argument).
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

PREFIX_TOKENS = 64


def prefix_key(token_ids, prefix_tokens: int = PREFIX_TOKENS) -> bytes:
    return repr(list(token_ids[:prefix_tokens])).encode()


def rank(key: bytes, replica_ids: list[str]) -> list[str]:
    """Replica ids from most to least preferred for this key (highest random weight first)."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(key + b"|" + rid.encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixHashRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, prefix_tokens: int = PREFIX_TOKENS) -> None:
        self.prefix_tokens = prefix_tokens

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ids = _token_ids(pending_request)
        if ids is None or not candidate_replicas:  # not a generate call: any replica
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = rank(prefix_key(ids, self.prefix_tokens), list(by_id))
        return [[by_id[rid]] for rid in order]


def _token_ids(pending_request: PendingRequest | None):
    args = getattr(pending_request, "args", None) or ()
    if len(args) >= 2 and isinstance(args[1], list) and args[1] and isinstance(args[1][0], int):
        return args[1]
    return None
