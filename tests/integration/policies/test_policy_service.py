"""The policy service and `weft intention` as real processes against the dev agent.

One dev agent and one policy service (the leader) are shared by the module; the failover test starts
its own pair. Every wait polls; no timing is asserted.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from policies.compile import loads_table
from policies.evaluate import authorize
from policies.model import TCP, CompiledTable, GrpcRequest, table_key
from policies.v1 import policy_pb2, policy_pb2_grpc
from tests.support import WEFT, DevAgent, Proc, free_port, wait_for
from weft import cli

pytestmark = pytest.mark.integration


def http(agent: DevAgent, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, int]:
    req = urllib.request.Request(agent.url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), int(resp.headers.get("X-Consul-Index", "0"))
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), int(exc.headers.get("X-Consul-Index", "0") or 0)


def put_doc(agent: DevAgent, dest: str, sources: list[dict[str, Any]] | str) -> None:
    body = sources if isinstance(sources, str) else json.dumps(
        {"Kind": "service-intentions", "Name": dest, "Sources": sources})
    status, out, _ = http(agent, "PUT", f"/v1/kv/weft/intentions/{dest}", body.encode())
    assert status == 200 and out.strip() == b"true", out


def table(agent: DevAgent, dest: str) -> CompiledTable | None:
    status, body, _ = http(agent, "GET", f"/v1/kv/{table_key(dest)}?raw")
    if status == 404:
        return None
    assert status == 200, body
    return loads_table(body)


def native_supported(agent: DevAgent) -> bool:
    status, _, _ = http(agent, "GET", "/v1/config/service-intentions")
    return status == 200


def start_policy(agent: DevAgent, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc([*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{port}", "-lock-ttl", "10s", "-lock-delay",
                 "1s", "-log-level", "debug", *extra], env=agent.env)
    return proc, port


def weft(agent: DevAgent, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `weft ARGS` in this process (a process per command costs seconds on a busy machine); the
    console entry point itself is exercised by `weft_process`."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in agent.env}
    os.environ.update(agent.env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["weft", *args], code, out.getvalue(), err.getvalue())


def weft_process(agent: DevAgent, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **agent.env}
    return subprocess.run([*WEFT, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[DevAgent, Proc, int]]:
    agent = DevAgent()
    proc, port = start_policy(agent)
    try:
        wait_for(lambda: table(agent, "*") is not None, timeout=30, what="the wildcard table")
        yield agent, proc, port
    except BaseException:
        print(proc.output())
        raise
    finally:
        proc.stop()
        agent.stop()


def test_kv_document_is_compiled_and_enforceable(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, _ = stack
    put_doc(agent, "orders", [{"Name": "web", "Action": "allow"},
                              {"Name": "admin", "Permissions": [{"Action": "allow",
                                                                 "HTTP": {"PathPrefix": "/shop.Orders/"}}]}])
    wait_for(lambda: table(agent, "orders") is not None, timeout=15, what="compiled orders table")
    t = table(agent, "orders")
    assert t is not None and t.default_policy == "deny"
    assert authorize(t, "web", TCP).allowed
    assert authorize(t, "admin", GrpcRequest("/shop.Orders/Get")).allowed
    assert not authorize(t, "admin", GrpcRequest("/shop.Users/Get")).allowed
    first = t.version
    # a change replaces the table; the version follows the content
    put_doc(agent, "orders", [{"Name": "web", "Action": "deny"}])
    wait_for(lambda: (table(agent, "orders") or t).version != first, timeout=15, what="new version")
    assert not authorize(table(agent, "orders"), "web", TCP).allowed  # type: ignore[arg-type]
    # deleting the last intention deletes the table; the wildcard table governs the destination
    http(agent, "DELETE", "/v1/kv/weft/intentions/orders")
    wait_for(lambda: table(agent, "orders") is None, timeout=15, what="orders table deleted")


def test_bad_document_is_rejected_and_last_good_stays(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, proc, _ = stack
    put_doc(agent, "billing", [{"Name": "web", "Action": "allow"}])
    wait_for(lambda: table(agent, "billing") is not None, timeout=15, what="billing table")
    good = table(agent, "billing")
    put_doc(agent, "billing", [{"Name": "web", "Action": "allow"},
                               {"Name": "api", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "v1"}}]}])
    wait_for(lambda: "Sources[1].Permissions[0].HTTP.PathPrefix" in proc.output(), timeout=15,
             what="the rejection in the log")
    out = proc.output()
    assert "weft/intentions/billing" in out and "doesn't start with '/'" in out
    time.sleep(0.5)
    assert table(agent, "billing") == good


def test_cli_allow_deny_list_check_delete(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, _ = stack
    r = weft(agent, "intention", "allow", "web", "ledger", "--description", "front end")
    assert r.returncode == 0, r.stderr
    r = weft(agent, "intention", "deny", "*", "ledger")
    assert r.returncode == 0, r.stderr
    _, raw, _ = http(agent, "GET", "/v1/kv/weft/intentions/ledger?raw")
    doc = json.loads(raw)
    assert [s["Name"] for s in doc["Sources"]] == ["web", "*"]
    wait_for(lambda: table(agent, "ledger") is not None and len(table(agent, "ledger").rules) == 2,  # type: ignore[union-attr]
             timeout=15, what="ledger table")
    r = weft(agent, "intention", "check", "web", "ledger")
    assert r.returncode == 0 and "ALLOWED" in r.stdout and "web -> ledger" in r.stdout, r.stdout + r.stderr
    r = weft_process(agent, "intention", "check", "api", "ledger", "--grpc-method", "/l.Ledger/Post")
    assert r.returncode == 1 and "DENIED" in r.stdout and "* -> ledger" in r.stdout, r.stdout + r.stderr
    r = weft(agent, "intention", "list", "ledger")
    assert r.returncode == 0 and "web" in r.stdout and "KV weft/intentions/ledger" in r.stdout, r.stdout
    r = weft(agent, "intention", "delete", "web", "ledger", "--kv")
    assert r.returncode == 0, r.stderr
    r = weft(agent, "intention", "delete", "web", "ledger", "--kv")
    assert r.returncode == 1 and "no intention" in r.stderr
    r = weft(agent, "intention", "check", "web", "ledger", "--grpc-method", "nope")
    assert r.returncode == 2 and "/pkg.Service/Method" in r.stderr
    # audit mode: a would-be denial is allowed and says so
    r = weft(agent, "intention", "deny", "batch", "ledger", "--mode", "audit")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(x.source == "batch" for x in table(agent, "ledger").rules),  # type: ignore[union-attr]
             timeout=15, what="batch rule")
    r = weft(agent, "intention", "check", "batch", "ledger", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["Allowed"] and out["Audited"] and "would deny" in out["Reason"], r.stdout


def test_validate_command(tmp_path: Any, stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, _ = stack
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"Kind": "service-intentions", "Name": "db",
                                "Sources": [{"Name": "web", "Action": "allow"}]}))
    r = weft(agent, "intention", "validate", str(good))
    assert r.returncode == 0 and "valid" in r.stdout
    r = weft(agent, "intention", "validate", str(good), "--key", "weft/intentions/cache")
    assert r.returncode == 1 and "Name" in r.stderr and "'cache'" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Kind": "service-intentions", "Name": "*",
                               "Sources": [{"Name": "web", "Permissions": [{"Action": "allow",
                                                                             "HTTP": {"PathExact": "/x"}}]}]}))
    r = weft(agent, "intention", "validate", str(bad))
    assert r.returncode == 1 and "wildcarded destinations" in r.stderr


def test_grpc_check_and_validate(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, port = stack
    put_doc(agent, "search", [{"Name": "web", "Permissions": [
        {"Action": "deny", "HTTP": {"PathExact": "/s.Search/Reindex"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/s.Search/"}}]}])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = policy_pb2_grpc.PolicyStub(channel)  # type: ignore[no-untyped-call]

        def reindex() -> Any:
            return stub.Check(policy_pb2.CheckRequest(source="web", destination="search",
                                                      grpc=policy_pb2.GrpcRequest(method="/s.Search/Reindex")),
                              timeout=10)

        wait_for(lambda: "Permissions[0]" in reindex().rule, timeout=15, what="search compiled in the service")
        resp = reindex()
        assert not resp.allowed and "KV weft/intentions/search" in resp.reason and resp.table == "search"
        resp = stub.Check(policy_pb2.CheckRequest(source="web", destination="search",
                                                  grpc=policy_pb2.GrpcRequest(method="/s.Search/Query")), timeout=10)
        assert resp.allowed and resp.per_request
        resp = stub.Check(policy_pb2.CheckRequest(source="spiffe://c.consul/ns/default/dc/dc1/svc/x",
                                                  destination="nothing-here", tcp=True), timeout=10)
        assert not resp.allowed and resp.rule == "default-policy" and resp.table == "*"
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(policy_pb2.CheckRequest(source="web", destination="search",
                                               http=policy_pb2.HttpRequest(method="GET", path="no-slash")), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        v = stub.Validate(policy_pb2.ValidateRequest(document='{"Kind":"service-intentions","Name":"a","Sources":[]}',
                                                     key="weft/intentions/a"), timeout=10)
        assert not v.valid and any("at least one source" in e for e in v.errors)


def test_tables_are_never_half_written(stack: tuple[DevAgent, Proc, int]) -> None:
    """A reader polling every compiled table while 40 destinations change over and over only ever sees
    complete tables whose version matches their content."""
    agent, _, _ = stack
    fleet = [f"fleet-{i}" for i in range(40)]
    for dest in fleet:
        put_doc(agent, dest, [{"Name": "web", "Action": "allow"}])
    wait_for(lambda: all(table(agent, d) is not None for d in fleet), timeout=30, what="fleet tables")
    reads: list[int] = []
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            _, body, _ = http(agent, "GET", "/v1/kv/weft/policy/compiled/?recurse")
            items = json.loads(body or b"[]")
            for item in items:
                try:
                    loads_table(base64.b64decode(item["Value"] or ""))
                except Exception as exc:
                    problems.append(f"{item['Key']}: {exc!r}")
            reads.append(len(items))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for round_ in range(5):
            for dest in fleet:
                put_doc(agent, dest, [{"Name": "web", "Action": "allow"},
                                      *({"Name": f"probe-{k}", "Action": "deny"} for k in range(round_ + 1))])
        wait_for(lambda: all(len(table(agent, d).rules) == 6 for d in fleet),  # type: ignore[union-attr]
                 timeout=60, what="the last round everywhere")
    finally:
        stop.set()
        t.join(30)
        for dest in fleet:
            http(agent, "DELETE", f"/v1/kv/weft/intentions/{dest}")
    assert reads and max(reads) >= 40 and not problems, problems[:3]


def test_native_intentions_are_merged(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, _ = stack
    assert native_supported(agent)
    put_doc(agent, "vault", [{"Name": "web", "Action": "allow"}, {"Name": "api", "Action": "allow"}])
    r = weft(agent, "intention", "deny", "web", "vault", "--native")
    assert r.returncode == 0, r.stderr
    r = weft(agent, "intention", "allow", "batch", "vault", "--native")
    assert r.returncode == 0, r.stderr

    def merged() -> bool:
        t = table(agent, "vault")
        return t is not None and {r.source for r in t.rules} >= {"web", "api", "batch"}

    wait_for(merged, timeout=15, what="native intentions in the vault table")
    t = table(agent, "vault")
    assert t is not None
    d = authorize(t, "web", TCP)
    assert not d.allowed and d.rule is not None and d.rule.origin.kind == "native"  # deny wins
    assert authorize(t, "api", TCP).allowed and authorize(t, "batch", TCP).allowed
    assert any("defined in both" in w for w in t.warnings)
    r = weft(agent, "intention", "list", "vault")
    assert "native service-intentions/vault" in r.stdout and "defined in both" in r.stderr, r.stdout + r.stderr
    # deleting the native deny leaves the KV allow in force
    r = weft(agent, "intention", "delete", "web", "vault", "--native")
    assert r.returncode == 0 and "native" in r.stdout, r.stderr
    wait_for(lambda: authorize(table(agent, "vault"), "web", TCP).allowed,  # type: ignore[arg-type]
             timeout=15, what="web allowed again")


def test_failover_between_two_policy_services() -> None:
    agent = DevAgent()
    first, _ = start_policy(agent, "-no-register")
    second: Proc | None = None
    try:
        wait_for(lambda: table(agent, "*") is not None, timeout=30, what="first leader's table")
        second, _ = start_policy(agent, "-no-register")
        wait_for(lambda: "intentions compiled" in second.output(), timeout=30, what="standby compiled")
        put_doc(agent, "ha", [{"Name": "web", "Action": "allow"}])
        wait_for(lambda: table(agent, "ha") is not None, timeout=15, what="ha table from the leader")
        leader, standby = (first, second) if "now the leader" in first.output() else (second, first)
        assert "now the leader" not in standby.output()
        leader.kill()  # no clean hand-over
        # The dead leader's session would expire after its TTL (10s, reaped up to 2x later); invalidate
        # it now, as that expiry does, so the test does not sit out the TTL.
        _, raw, _ = http(agent, "GET", "/v1/kv/weft/policy/leader")
        session = json.loads(raw)[0]["Session"]
        assert http(agent, "PUT", f"/v1/session/destroy/{session}")[0] == 200
        put_doc(agent, "ha", [{"Name": "web", "Action": "deny"}])
        wait_for(lambda: "now the leader" in standby.output(), timeout=60, what="standby takes over")
        wait_for(lambda: not authorize(table(agent, "ha"), "web", TCP).allowed,  # type: ignore[arg-type]
                 timeout=15, what="the new leader publishes the change")
    except BaseException:
        print("FIRST:\n" + first.output() + "\nSECOND:\n" + (second.output() if second else ""))
        raise
    finally:
        first.stop()
        if second is not None:
            second.stop()
        agent.stop()


def test_registers_itself_as_weft_policy(stack: tuple[DevAgent, Proc, int]) -> None:
    agent, _, port = stack

    def registered() -> bool:
        _, body, _ = http(agent, "GET", "/v1/agent/services")
        return any(s.get("Service") == "weft-policy" and s.get("Port") == port for s in json.loads(body).values())

    wait_for(registered, timeout=15, what="weft-policy in the agent's services")

    def passing_as_leader() -> bool:
        _, body, _ = http(agent, "GET", "/v1/agent/checks")
        checks = [c for c in json.loads(body).values() if c.get("ServiceName") == "weft-policy"]
        return any(c.get("Status") == "passing" and "leader" in c.get("Output", "") for c in checks)

    wait_for(passing_as_leader, timeout=30, what="weft-policy's TTL check passing with note 'leader'")
