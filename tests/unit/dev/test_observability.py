"""The Prometheus scrape configuration and the Grafana dashboard in deploy/observability: the relabeling
finds every sidecar's metrics port as the sidecars publish it, and every metric the dashboard queries
is one the sidecars export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sidecar.telemetry import Telemetry
from weft.cmd_top import ADMIN_META_KEYS

ROOT = Path(__file__).resolve().parents[3] / "deploy" / "observability"


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabeling (replace and keep actions; regexes anchored; missing labels empty)."""
    out = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(out.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                out[rule["target_label"]] = match.expand(re.sub(r"\$(\d+)", r"\\g<\1>",
                                                                rule.get("replacement", "$1")))
        else:
            raise AssertionError(f"unexpected action {action}")
    return out


def _sidecar(meta: str | None, address: str = "10.0.0.5") -> dict[str, str]:
    labels = {"__address__": f"{address}:21000", "__meta_consul_address": "10.0.0.1",
              "__meta_consul_service_address": address, "__meta_consul_service": "greeter-sidecar-proxy",
              "__meta_consul_service_id": "greeter-1-sidecar-proxy", "__meta_consul_node": "n1",
              "__meta_consul_dc": "dc1"}
    if meta is not None:  # Prometheus turns the Meta key's '-' into '_'
        labels["__meta_consul_service_metadata_" + ADMIN_META_KEYS[0].replace("-", "_")] = meta
    return labels


def test_scrape_config_finds_the_admin_port_the_sidecars_publish() -> None:
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["consul_sd_configs"] and job["metrics_path"] == "/metrics"
    rules = job["relabel_configs"]
    hostport = _relabel(rules, _sidecar("127.0.0.1:19000"))
    assert hostport is not None and hostport["__address__"] == "127.0.0.1:19000"
    assert hostport["weft_service"] == "greeter" and hostport["weft_sidecar"] == "greeter-1-sidecar-proxy"
    bare = _relabel(rules, _sidecar("19000"))
    assert bare is not None and bare["__address__"] == "10.0.0.5:19000"
    no_service_address = _relabel(rules, _sidecar("19000", address=""))
    assert no_service_address is not None and no_service_address["__address__"] == "10.0.0.1:19000"
    assert _relabel(rules, _sidecar(None)) is None  # not a Weft sidecar: not scraped


def _exported() -> set[str]:
    names: set[str] = set()
    for family in Telemetry().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_every_metric_on_the_dashboard_is_exported() -> None:
    dashboard = json.loads((ROOT / "grafana-weft.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    used = {m for e in exprs for m in re.findall(r"\bweft_[a-z0-9_]+\b", e)} - {"weft_service", "weft_sidecar"}
    exported = _exported()
    assert used and used <= exported, used - exported
    # the golden metrics per edge are all there
    assert {"weft_requests_total", "weft_request_duration_seconds_bucket"} <= used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
