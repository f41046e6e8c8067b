"""Circuit breaking on the outbound HTTP/1.1 path of a routed upstream (``sidecar.http_routing``).

The counts and decisions are ``sidecar.circuit.RequestCircuit``'s; this module waits (a request that
finds every allowed connection busy waits for one, ``MaxPendingRequests`` bounding how many wait) and
answers a refused request with 503 naming the limit. Only used when the upstream sets a limit.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sidecar.circuit import Overflow, RequestCircuit

# a condition per circuit, for the requests waiting for a connection (no strong reference: a circuit
# replaced by a settings change goes with its last request)
_conditions: weakref.WeakKeyDictionary[RequestCircuit, asyncio.Condition] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def held(circuit: RequestCircuit, wait_limit: float) -> AsyncIterator[Overflow | None]:
    """Inside: the request holds a connection slot of ``circuit`` (the value is None), or it was
    refused (the value is the limit it would pass; nothing is held). A request waits for a slot at most
    ``wait_limit`` seconds (0: no bound but its caller's), else TimeoutError."""
    admission = circuit.admit()
    if admission.overflow is not None:
        yield admission.overflow
        return
    if admission.waits:
        cond = _conditions.get(circuit)
        if cond is None:
            cond = _conditions[circuit] = asyncio.Condition()
        try:
            async with cond:
                async with asyncio.timeout(wait_limit or None):
                    await cond.wait_for(circuit.can_acquire)
                circuit.acquired()
        except BaseException:
            circuit.gave_up()
            raise
    try:
        yield None
    finally:
        circuit.released()
        cond = _conditions.get(circuit)
        if cond is not None and circuit.pending:
            async with cond:
                cond.notify()


def refusal(pool: Any, overflow: Overflow) -> str:
    """Counts a refused request; the text of its 503."""
    pool.metrics.circuit_open.labels(pool.name, overflow.limit).inc()
    return overflow.message(pool.name) + "\n"
