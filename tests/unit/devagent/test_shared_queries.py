"""blocking_query(share=True): one computation per query and store index, for first runs as for
woken waiters; a write, another query or another token computes afresh (mocked requests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiohttp.test_utils import make_mocked_request

from devagent import http, kv
from devagent.agent import Agent, AgentConfig
from devagent.http import QueryResult, Req, blocking_query


def test_first_runs_and_wakeups_share_one_result_per_index() -> None:
    agent = Agent(AgentConfig(node_name="n"))
    store = agent.store
    runs: list[str] = []

    def req(query: str, token: str = "") -> Req:
        headers = {"X-Consul-Token": token} if token else {}
        return Req(make_mocked_request("GET", "/v1/kv/k" + query, headers=headers), agent)

    def runner(r: Req) -> Callable[[], QueryResult]:
        def run() -> QueryResult:
            runs.append(r.raw.path_qs)
            return QueryResult(store.topic_index("kvs"), [store.index], ["kvs"])
        return run

    async def main() -> None:
        with store.write() as tx:
            tx.put("kvs", "first", kv.entry("first", None, 0, tx.index, tx.index))
        a, b = req("?stale"), req("?stale&index=0")
        ra = await blocking_query(a, runner(a), share=True)
        rb = await blocking_query(b, runner(b), share=True)
        assert ra is rb and len(runs) == 1  # same query at the same index: computed once
        await blocking_query(req("?stale", token="other"), runner(a), share=True)
        await blocking_query(req("?stale&separator=/"), runner(a), share=True)
        assert len(runs) == 3  # another token, another query
        waiters = [req(f"?stale&index={ra.index}&wait=5s") for _ in range(50)]
        tasks = [asyncio.ensure_future(blocking_query(w, runner(w), share=True)) for w in waiters]
        await asyncio.sleep(0.05)
        assert len(runs) == 3  # the 50 waiters' first runs reuse a's result (same query, same index)
        with store.write() as tx:
            tx.put("kvs", "k", kv.entry("k", None, 0, tx.index, tx.index))
        results = await asyncio.gather(*tasks)
        assert len(runs) == 4 and all(res is results[0] for res in results)
        assert results[0].value == [store.index]
        again = await blocking_query(req("?stale"), runner(a), share=True)
        assert again is results[0] and len(runs) == 4
        unshared = await blocking_query(req("?stale"), runner(a))
        assert unshared is not results[0] and len(runs) == 5

    asyncio.run(main())


def test_reuse_keeps_a_result_until_one_of_its_topics_or_the_acls_move() -> None:
    agent = Agent(AgentConfig(node_name="n"))
    store = agent.store
    runs: list[int] = []

    def put(key: str, table: str = "kvs") -> None:
        with store.write() as tx:
            row = kv.entry(key, None, 0, tx.index, tx.index) if table == "kvs" else {"ID": key, "Name": key}
            tx.put(table, key, row)
            tx.touch(("key", key))  # a topic that remembers its index (as the registry's do)

    def run() -> QueryResult:
        runs.append(store.index)
        return QueryResult(store.topic_index(("key", "a")), [len(runs)], [("key", "a")])

    async def read(query: str = "") -> QueryResult:
        r = Req(make_mocked_request("GET", "/v1/kv/a" + query), agent)
        return await blocking_query(r, run, share=True, reuse=True)

    async def main() -> None:
        put("a")
        first = await read()
        put("b")  # another topic: the index moves, the kept result stays valid
        assert await read() is first and len(runs) == 1
        put("a")
        second = await read()
        assert second is not first and len(runs) == 2
        put("p", table="acl_policies")  # an ACL change may change what a token sees
        assert await read() is not second and len(runs) == 3
        waiter = asyncio.ensure_future(read(f"?index={store.index}&wait=5s"))
        await asyncio.sleep(0.05)
        put("a")
        woken = await waiter
        assert woken.index == store.index and len(runs) == 4
        assert (await read()).value == [4] and len(runs) == 4  # the woken result, kept
        put("b")
        assert (await read()).value == [4] and len(runs) == 4

    asyncio.run(main())


def test_kept_results_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "_KEPT_MAX", 25)
    agent = Agent(AgentConfig(node_name="n"))
    store = agent.store

    def run() -> QueryResult:
        return QueryResult(1, list(range(10)), ["kvs"])

    async def main() -> None:
        for i in range(20):
            r = Req(make_mocked_request("GET", f"/v1/health/service/s{i}"), agent)
            await blocking_query(r, run, share=True, reuse=True)
            kept = http._KEPT[store]
            assert kept.size == sum(len(k.result.value) for k in kept.results.values()) <= 25

    asyncio.run(main())
