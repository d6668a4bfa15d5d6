"""Session-affine routing on Ray Serve: a session's requests go to the replica that holds its cache.

Ray Serve already has the two halves of this. Model multiplexing tracks, per replica, the ids it
has "loaded" (an LRU per replica, reported to every router), and routes a request carrying
``multiplexed_model_id`` to a replica that has that id. But its default router treats that as a
*preference*: when the holders are busy, or after a matching timeout of about a second, it
falls back to the replica with the fewest ids, which would move a session's state mid-way
through a conversation. :class:`SessionAffinityRouter` is a custom request router (Ray Serve's
pluggable ``RequestRouter``) over the same bookkeeping that makes the preference strict:

* a session held by a live replica goes to that replica only, waiting (with the router's
  backoff) while it is at its ``max_ongoing_requests``, never to another one;
* a session no live replica holds (a new one, or one whose replica died) goes to the replica
  holding the fewest sessions (as reported, plus those this router chose it for since, counted
  when chosen, so that sessions created at once are spread), or the next fewest when it is full;
* a request without a session (text completions, ``/health``) goes by the power of two choices.

The router also remembers where it sent each session (``sticky``), so the turn right after a
session is created goes where it was created even before the replica's report of its ids has
reached the router. The routing key is :func:`routing_key` of the session id, never the id:
multiplexed ids appear in Ray's metrics and dashboard, and a session id is what reaches a
conversation.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

STICKY_SESSIONS = 65536  # routing decisions a router remembers (least recently routed forgotten first)


def routing_key(session_id: str) -> str:
    """The key a session's requests are routed by: a hash of its id (32 hex digits)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    """Ray Serve request router: strict session affinity over multiplexing's bookkeeping."""

    def initialize_state(self, **kwargs) -> None:
        self.sticky: OrderedDict[str, ReplicaID] = OrderedDict()  # routing key -> replica last sent to

    def holders(self, key: str) -> set[ReplicaID]:
        """The live replicas holding the session of routing ``key``."""
        held = set(self._multiplexed_model_id_to_replica_ids.get(key, ()))
        if key in self.sticky:
            held.add(self.sticky[key])
        return held & self._replica_id_set

    def session_counts(self) -> dict[ReplicaID, int]:
        """Sessions per live replica: those it reported holding, and those this router sent it since
        (its report lags behind by up to a few seconds)."""
        held: dict[ReplicaID, set[str]] = {r: set(self._replicas[r].multiplexed_model_ids) for r in self._replica_id_set}
        for key, replica in self.sticky.items():
            if replica in held:
                held[replica].add(key)
        return {r: len(keys) for r, keys in held.items()}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # wait between rounds, not spin
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if key:
            held = self.holders(key)
            if held:
                return [[r for r in candidate_replicas if r.replica_id in held]]
            counts = self.session_counts()
            ranked = sorted(candidate_replicas, key=lambda r: (counts.get(r.replica_id, 0), random.random()))
            if ranked:  # counted at once, so that sessions created together are spread
                self.remember(key, ranked[0].replica_id)
            return [[r] for r in ranked]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = pending_request.metadata.multiplexed_model_id
        if key:
            self.remember(key, replica_id)

    def remember(self, key: str, replica_id: ReplicaID) -> None:
        """The session of routing ``key`` is (about to be) on ``replica_id``."""
        self.sticky[key] = replica_id
        self.sticky.move_to_end(key)
        while len(self.sticky) > STICKY_SESSIONS:
            self.sticky.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.sticky.items() if r == replica_id]:
            del self.sticky[key]
