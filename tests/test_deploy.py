"""Deployment files, checked without a cluster: Kubernetes schemas, promtool, dashboards
that query existing metrics, a compose file whose commands exist, the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from forecast.cli import main
from forecast.metrics import REGISTRY

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = "1.30.0"


def manifests() -> list[dict]:
    return [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_manifests_match_the_kubernetes_schemas() -> None:
    docs = manifests()
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = {doc["kind"] for doc in docs}
    assert {
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    } <= kinds


def test_deployments_have_probes_resources_and_run_existing_commands() -> None:
    for doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] in main.commands
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"requests", "limits"} <= container["resources"].keys()
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_a_bad_manifest_is_caught() -> None:
    deployment = next(d for d in manifests() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus")
def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    for args in (["check", "config"], ["check", "rules"]):
        target = "prometheus.yml" if args[1] == "config" else "alerts.yml"
        checked = subprocess.run(
            ["promtool", *args, str(DEPLOY / "prometheus" / target)],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def known_series() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
        }.get(family.type, [])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bforecast_[a-z_]+\b", expr))


def test_dashboards_and_alerts_query_metrics_that_exist() -> None:
    known = known_series()
    dashboards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert {d.stem for d in dashboards} == {"pipeline", "models-and-drift", "gateway"}
    exprs = []
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["panels"], path
        exprs += [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = set().union(*(queried_metrics(e) for e in exprs))
    assert used and not used - known, f"unknown metrics: {sorted(used - known)}"


def test_compose_services_run_existing_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    engine = {n: s for n, s in services.items() if s.get("image", "").startswith("forecast")}
    assert {"worker-1", "worker-2", "gateway"} <= engine.keys()
    for service in engine.values():
        assert service["command"][0] in main.commands
        assert service["environment"]["FORECAST_CLICKHOUSE_URL"].startswith("http://")
    assert {"redpanda", "clickhouse", "prometheus", "grafana"} <= services.keys()
    assert (DEPLOY / "prometheus" / "alerts.yml").exists()


def test_dockerfile_is_multi_stage_non_root_with_a_health_check() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    assert sum(line.startswith("FROM ") for line in lines) >= 2
    assert any(re.match(r"USER (?!root|0\b)", line) for line in lines)
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "/healthz" in "\n".join(lines[lines.index(health) :])
    assert 'ENTRYPOINT ["forecast"]' in lines


def test_exactly_one_sink_runs_the_retraining_loop_and_workers_never_do() -> None:
    def retrains(env: dict) -> bool:
        return str(env.get("FORECAST_RETRAIN", "true")).lower() != "false"

    sinks = []
    for doc in manifests():
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            if container["args"] == ["sink"] and retrains(env):
                sinks.append(doc["spec"]["replicas"])
    assert sinks == [1]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert [s.get("command") for s in compose.values()].count(["sink"]) == 1
    assert [s.get("command") for s in compose.values()].count(["worker"]) >= 2
