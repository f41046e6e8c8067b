"""The Nomad job files parse, have the structure Nomad needs, and agree with the demo's service definitions
and with the flags the Weft processes really take."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path
from typing import Any

import hcl2
import pytest

from catalog.servicedef import parse, upstreams_of
from tests.support import REPO

NOMAD = REPO / "nomad"
DEMO = REPO / "weft" / "demo" / "services"
JOBS = sorted(NOMAD.glob("*.nomad.hcl"))


def load(path: Path) -> dict[str, Any]:
    options = hcl2.SerializationOptions(with_comments=False, strip_string_quotes=True, preserve_heredocs=True)
    data: dict[str, Any] = _clean(hcl2.loads(path.read_text(), serialization_options=options))
    return data


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and value.startswith("<<"):  # heredoc: drop the markers, dedent
        body = value.split("\n", 1)[1].rsplit("\n", 1)[0]
        return textwrap.dedent(body) + "\n"
    return value


def named(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`group "x" { ... }` blocks -> {"x": {...}}."""
    return {name: body for block in blocks for name, body in block.items()}


def one(body: dict[str, Any], key: str) -> dict[str, Any]:
    [block] = body[key]
    return dict(block)


def job_of(path: Path) -> tuple[str, dict[str, Any]]:
    [(name, body)] = named(load(path)["job"]).items()
    return name, body


def definitions() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(DEMO.iterdir()):
        if path.suffix in (".hcl", ".json"):
            for payload in parse(path.read_text(), source=str(path)):
                out[payload["Name"]] = payload
    return out


def services_of(group: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(group.get("service", []))
    for task in named(group.get("task", [])).values():
        found += task.get("service", [])
    return found


def port_labels(group: dict[str, Any]) -> set[str]:
    network = one(group, "network")
    return {label for port in network.get("port", []) for label in port}


def sidecar_task(group: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for name, task in named(group.get("task", [])).items():
        lifecycle = task.get("lifecycle", [{}])[0]
        args = one(task, "config").get("args", [])
        if lifecycle.get("hook") == "prestart" and lifecycle.get("sidecar") is True and args[:1] == ["sidecar"]:
            return name, task
    return None


def flag(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]


def rendered_env(task: dict[str, Any]) -> set[str]:
    """Variables the task's env templates define."""
    names = set()
    for template in task.get("template", []):
        if template.get("env"):
            names |= set(re.findall(r"([A-Z_][A-Z0-9_]*)=", template["data"]))
    return names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_files_parse_and_use_raw_exec(path: Path) -> None:
    name, job = job_of(path)
    assert job["type"] == "service"
    for group_name, group in named(job["group"]).items():
        for task_name, task in named(group["task"]).items():
            assert task["driver"] == "raw_exec", f"{name}.{group_name}.{task_name}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_service_blocks_use_consul_and_no_ttl_checks(path: Path) -> None:
    _, job = job_of(path)
    for group_name, group in named(job["group"]).items():
        for service in services_of(group):
            where = f"{path.name}: group {group_name}, service {service['name']}"
            assert service["provider"] == "consul", where
            assert service["port"] in port_labels(group), where
            assert service.get("check"), f"{where} has no check"
            for check in service["check"]:
                assert check["type"] != "ttl" and "ttl" not in check, f"{where}: TTL checks are not allowed"
                assert check.get("port", service["port"]) in port_labels(group), where


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_templates_never_block_on_a_missing_key(path: Path) -> None:
    text = path.read_text()
    assert "keyOrDefault" in text
    assert not re.search(r"{{-?\s*key\s", text), "use keyOrDefault: `key` blocks the task until the key exists"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_runtime_variables_in_args_are_defined(path: Path) -> None:
    _, job = job_of(path)
    for group_name, group in named(job["group"]).items():
        labels = port_labels(group) if group.get("network") else set()
        for task_name, task in named(group["task"]).items():
            config = one(task, "config")
            defined = rendered_env(task) | set(one(task, "env")) if task.get("env") else rendered_env(task)
            for arg in config.get("args", []):
                for var in re.findall(r"\$\{([^}]+)\}", arg):
                    if var.startswith(("NOMAD_PORT_", "NOMAD_IP_")):
                        assert var.split("_", 2)[2] in labels, f"{group_name}.{task_name}: {arg}"
                    elif var.startswith(("NOMAD_", "var.", "attr.", "node.", "meta.")):
                        continue
                    else:
                        assert var in defined, f"{group_name}.{task_name}: ${{{var}}} is set by no env or template"


def test_control_plane_runs_two_replicas_of_the_ca_and_the_policy_service() -> None:
    _, job = job_of(NOMAD / "control-plane.nomad.hcl")
    groups = named(job["group"])
    assert set(groups) == {"ca", "policy"}
    for group_name, command in (("ca", ["ca", "serve"]), ("policy", ["policy", "serve"])):
        group = groups[group_name]
        assert group["count"] == 2
        assert one(group, "constraint")["operator"] == "distinct_hosts"
        [(_, task)] = named(group["task"]).items()
        args = one(task, "config")["args"]
        assert args[:2] == command
        # each replica registers itself with its leader/standby TTL check (a Nomad service block cannot
        # carry a TTL check), advertising the address Nomad gave it
        assert not services_of(group), "the process registers itself; a service block would duplicate it"
        assert "--no-register" not in args and "-no-register" not in args
        assert any(a.startswith("${NOMAD_IP_grpc}") for a in args), "advertise the client's address"
    ca_task = named(groups["ca"]["task"])["ca"]
    kek = [t for t in ca_task["template"] if t["destination"] == "secrets/kek"]
    assert kek and kek[0]["perms"] == "0600", "the KEK comes from a Nomad variable into secrets/, mode 0600"


def test_control_plane_args_are_accepted_by_the_real_commands() -> None:
    from weft import cmd_ca, cmd_policy

    _, job = job_of(NOMAD / "control-plane.nomad.hcl")
    for group_name, module in (("ca", cmd_ca), ("policy", cmd_policy)):
        [(_, task)] = named(named(job["group"])[group_name]["task"]).items()
        args = [_placeholder(a) for a in one(task, "config")["args"]]
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        _parse(parser, args[1:])  # after the command's own name


def _placeholder(arg: str) -> str:
    if "${" not in arg:
        return arg
    if "PORT" in arg or "IP" in arg:
        return re.sub(r"\$\{[^}]+\}", "1", arg).replace("1:1", "127.0.0.1:1")
    if "TTL" in arg:
        return "72h"
    if "DEFAULT_POLICY" in arg:
        return "deny"
    if "LOG_LEVEL" in arg:
        return "info"
    return re.sub(r"\$\{[^}]+\}", "x", arg)


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit as exc:  # argparse exits on unknown flags
        raise AssertionError(f"rejected arguments {args}") from exc


def test_every_demo_group_has_a_sidecar_that_agrees_with_the_service_definition() -> None:
    _, job = job_of(NOMAD / "demo.nomad.hcl")
    defs = definitions()
    seen = set()
    for group_name, group in named(job["group"]).items():
        services = services_of(group)
        if not services:
            continue
        [service] = services
        name = service["name"]
        seen.add(name)
        definition = defs[name]
        where = f"group {group_name}"
        # the app's registration: protocol and check kind as in the definition file
        assert service["meta"]["protocol"] == definition["Meta"]["protocol"], where
        [check] = service["check"]
        [def_check] = definition["Checks"]
        assert check["type"] == ("grpc" if "GRPC" in def_check else "http"), where
        assert service.get("address") == "127.0.0.1", f"{where}: the app is reachable only through its sidecar"
        # a prestart sidecar task next to the app
        found = sidecar_task(group)
        assert found is not None, f"{where} has a service but no prestart sidecar task running `weft sidecar`"
        _, task = found
        args = one(task, "config")["args"]
        assert flag(args, "--sidecar-for") == ["${SIDECAR_FOR}"]
        assert "SIDECAR_FOR" in rendered_env(task)
        assert f'service "{name}|any"' in "".join(t["data"] for t in task["template"])
        assert flag(args, "--public-port") == ["${NOMAD_PORT_sidecar}"]
        assert flag(args, "--admin-port") == ["${NOMAD_PORT_admin}"]
        # upstreams and their local ports as in the definition, and the app pointed at them
        declared = sorted(f"{u['DestinationName']}:{u['LocalBindPort']}" for u in upstreams_of(definition))
        assert sorted(flag(args, "--upstream")) == declared, where
        app = named(group["task"])["app"]
        app_args = one(app, "config")["args"]
        assert app_args[:2] == ["-m", f"weft.demo.{name}"]
        assert flag(app_args, "-port") == [f"${{NOMAD_PORT_{service['port']}}}"], where
        env = one(app, "env") if app.get("env") else {}
        for up in upstreams_of(definition):
            assert env[f"{up['DestinationName'].upper()}_ADDR"] == f"127.0.0.1:{up['LocalBindPort']}", where
    assert seen == set(defs), "every demo service runs on Nomad"


def test_demo_sidecar_args_are_accepted_by_weft_sidecar() -> None:
    from weft import cmd_sidecar

    _, job = job_of(NOMAD / "demo.nomad.hcl")
    for group_name, group in named(job["group"]).items():
        found = sidecar_task(group)
        assert found is not None, group_name
        args = [_placeholder(a) for a in one(found[1], "config")["args"]]
        parser = argparse.ArgumentParser()
        cmd_sidecar.add_arguments(parser)
        ns = _parse(parser, args[1:])
        assert ns.sidecar_for == "x"


def _tasks(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    _, job = job_of(path)
    return [(gname, tname, task) for gname, group in named(job["group"]).items()
            for tname, task in named(group.get("task", [])).items()]


_CONSUL_TEMPLATE = re.compile(r"\{\{[^}]*\b(key|keyOrDefault|ls|tree|service|services|connect|caRoots|caLeaf)\b")


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_tasks_whose_templates_read_consul_have_a_consul_workload_identity(path: Path) -> None:
    """With ACLs on (and from Nomad 1.10 always), a template reads Consul with the task's workload identity."""
    checked = 0
    for gname, tname, task in _tasks(path):
        if not any(_CONSUL_TEMPLATE.search(t.get("data", "")) for t in task.get("template", [])):
            continue
        identities = {i.get("name", "default"): i for i in task.get("identity", [])}
        assert "consul_default" in identities, f"{gname}.{tname}: no identity \"consul_default\""
        assert identities["consul_default"].get("aud") == ["consul.io"], f"{gname}.{tname}"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_weft_process_gets_a_consul_token_of_its_own(path: Path) -> None:
    """Each CA, policy service and sidecar task runs with CONSUL_HTTP_TOKEN from a Nomad variable its task can
    read, rendered into secrets/ with mode 0600 (never into the job file or local/)."""
    job_name, _ = job_of(path)
    tokens_used: list[tuple[str, str]] = []
    for gname, tname, task in _tasks(path):
        if one(task, "config").get("command") != "${var.weft}":
            continue
        tokens = [t for t in task.get("template", []) if "CONSUL_HTTP_TOKEN=" in t.get("data", "")]
        assert len(tokens) == 1, f"{gname}.{tname}: no CONSUL_HTTP_TOKEN template"
        [t] = tokens
        assert t["destination"].startswith("secrets/") and t["perms"] == "0600" and t["env"] is True
        [var_path] = re.findall(r'nomadVar "([^"]+)"', t["data"])
        # a task may read its job's, its group's and its own variables (Nomad's implicit workload policy)
        assert var_path in (f"nomad/jobs/{job_name}", f"nomad/jobs/{job_name}/{gname}",
                            f"nomad/jobs/{job_name}/{gname}/{tname}"), var_path
        [field] = re.findall(r"CONSUL_HTTP_TOKEN=\{\{ \.(\w+) \}\}", t["data"])
        tokens_used.append((var_path, field))
    assert tokens_used, "no Weft process in the job"
    assert len(set(tokens_used)) == len(tokens_used), f"processes share a token: {tokens_used}"


def test_demo_services_are_registered_with_their_workload_identity() -> None:
    _, job = job_of(NOMAD / "demo.nomad.hcl")
    for gname, group in named(job["group"]).items():
        for service in services_of(group):
            [identity] = service.get("identity", [{}])
            assert identity.get("aud") == ["consul.io"], gname
