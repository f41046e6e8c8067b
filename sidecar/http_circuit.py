"""Circuit breaking on the outbound HTTP/1.1 path of a routed upstream (``sidecar.http_routing``).

The counts and decisions are ``sidecar.circuit.RequestCircuit``'s; this module waits (a request that
finds every allowed connection busy waits for one, ``MaxPendingRequests`` bounding how many wait, the
route's timeout bounding how long) and words the answer of a request that cannot go: 503 naming the
limit (counted in ``weft_circuit_open_total``), or 504 when no connection became free in time. Only
used when the upstream sets a limit.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from sidecar.circuit import RequestCircuit

if TYPE_CHECKING:
    from sidecar.seams import UpstreamPool

# a condition per circuit, for the requests waiting for a connection (no strong reference: a circuit
# replaced by a settings change goes with its last request)
_conditions: weakref.WeakKeyDictionary[RequestCircuit, asyncio.Condition] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def held(circuit: RequestCircuit, pool: UpstreamPool, wait_limit: float) -> AsyncIterator[tuple[int, str] | None]:
    """Inside: the request holds a connection slot of ``circuit`` (the value is None), or it may not go
    (the value is the (HTTP status, text) to answer; nothing is held). A request waits for a slot at
    most ``wait_limit`` seconds (0: as long as its caller waits)."""
    admission = circuit.admit()
    if admission.overflow is not None:
        pool.metrics.circuit_open.labels(pool.name, admission.overflow.limit).inc()
        yield 503, admission.overflow.message(pool.name) + "\n"
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
        except TimeoutError:
            circuit.gave_up()
            yield 504, (f"weft: no connection to upstream {pool.name} became free within the route's timeout of "
                        f"{wait_limit:g}s (MaxConnections {circuit.limits.max_connections})\n")
            return
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
