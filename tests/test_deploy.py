"""Deploy files: compose, Kubernetes manifests, Dockerfile, Prometheus rules, Grafana dashboard.

Everything is parsed and cross-checked against the code that will run it:
- every container command is parsed by the real `moshi-grpc` argument parser;
- every metric named in alert rules, dashboard queries and prometheus-adapter rules is
  checked against a LIVE /metrics scrape of the three services (echo models, loopback);
- `promtool` (when on PATH) checks the rules, the config and every dashboard expression,
  and unit-tests the alerts; without it those checks skip with the reason and the parse
  tests still run.
The image itself cannot be built here (no Docker engine); see test_docker_build.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FIXTURES, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
MOSHI_SERVICES = {"codec", "lm", "gateway"}
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = (
    "promtool not on PATH (Debian package `prometheus` ships it); YAML parse tests still run"
)


# --------------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _parse_cli(argv: list[str]):
    """Parse a container command with the real `moshi-grpc` parser (flags must exist)."""
    from moshi_grpc.cli import build_parser

    return build_parser(argv).parse_args(argv)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"(?<![A-Za-z0-9_:])[A-Za-z_:][A-Za-z0-9_:]*")
_BRACES = re.compile(r"\{[^{}]*\}")


def metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (ours, the gRPC ones, and `up`).

    Strings and label matchers are removed first, so label names and values never count.
    """
    expr = _BRACES.sub("", _STRING.sub('""', expr))
    return {
        tok
        for tok in _IDENT.findall(expr)
        if tok.startswith(("moshi_", "grpc_server_")) or tok == "up"
    }


def _exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus scrape of `text` can produce (histogram/counter parts)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.update({fam.name + "_total", fam.name + "_created"})
        elif fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        else:
            names.add(fam.name)
    return names


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "moshi-grpc.json").read_text())


def _dashboard_exprs() -> list[str]:
    return [
        t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []) if t.get("expr")
    ]


def _adapter_rules() -> list[dict]:
    (cm,) = _load_all(K8S / "prometheus-adapter.yaml")
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def _k8s_docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        docs.extend(_load_all(K8S / res))
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == kind}


# --------------------------------------------------------------------------- live services


@pytest.fixture(scope="module")
def live_metric_names() -> Iterator[set[str]]:
    """Start codec + LM (echo) + gateway with /metrics, hold one conversation, scrape all."""
    import urllib.request

    from svc_harness import LoopThread

    from moshi_grpc.clients import ConverseClient
    from moshi_grpc.services.codec.engine import CodecOptions
    from moshi_grpc.services.codec.startup import start_codec_server
    from moshi_grpc.services.common.server import ServerConfig
    from moshi_grpc.services.gateway.cli import start_gateway
    from moshi_grpc.services.gateway.config import GatewaySettings
    from moshi_grpc.services.lm.engine import LmOptions
    from moshi_grpc.services.lm.startup import start_lm_server

    def cfg() -> ServerConfig:
        return ServerConfig(host="127.0.0.1", port=0, metrics_port=0)

    async def start():
        codec = await start_codec_server(cfg(), CodecOptions(model="echo", max_sessions=2))
        lm = await start_lm_server(cfg(), LmOptions(model="echo", max_sessions=2))
        gw = await start_gateway(
            cfg(), codec.address, lm.address, GatewaySettings(refresh_interval_s=0.1)
        )
        return codec, lm, gw

    loop = LoopThread()
    codec, lm, gw = loop.run(start(), timeout=120)
    try:
        with ConverseClient(gw.address) as client:
            result = client.converse_array(
                np.zeros(4800, np.float32), 24000, window_frames=2, budget_ms=5000
            ).collect()
        assert result.frames == 3
        names: set[str] = {"up"}  # Prometheus' own per-target series
        for url in (codec.metrics_url, lm.metrics_url, gw.server.metrics_url):
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
                names |= _exposed_names(r.read().decode())
        yield names
    finally:

        async def stop():
            for s in (gw, lm, codec):
                await s.stop(0)

        loop.run(stop(), timeout=60)
        loop.close()


def test_metric_name_extraction_finds_names_and_skips_labels() -> None:
    expr = (
        'sum by (grpc_code) (rate(grpc_server_handled_total{job=~"moshi_x|y"}[5m])) '
        "/ histogram_quantile(0.99, sum by (le) (rate(moshi_gateway_frame_latency_seconds_bucket"
        '[5m]))) + up{job="moshi-lm"}'
    )
    assert metric_names(expr) == {
        "grpc_server_handled_total",
        "moshi_gateway_frame_latency_seconds_bucket",
        "up",
    }


def test_live_scrape_covers_the_documented_metrics(live_metric_names) -> None:
    """The scrape really is the services' metrics (and agrees with metrics.py's list)."""
    from moshi_grpc.services.common.metrics import METRIC_NAMES

    missing = []
    for name in METRIC_NAMES:
        variants = {name, name + "_bucket", name + "_total"}
        if not variants & live_metric_names:
            missing.append(name)
    assert not missing, f"documented in metrics.py but not exported: {missing}"
    assert "moshi_nope_total" not in live_metric_names


def test_alerts_reference_only_exported_metrics(live_metric_names) -> None:
    used = set().union(*(metric_names(r["expr"]) for r in _alert_rules()))
    assert len(used) >= 6
    assert used <= live_metric_names, sorted(used - live_metric_names)


def test_dashboard_queries_reference_only_exported_metrics(live_metric_names) -> None:
    used = set().union(*(metric_names(e) for e in _dashboard_exprs()))
    assert len(used) >= 15
    assert used <= live_metric_names, sorted(used - live_metric_names)


def test_hpa_metrics_come_from_adapter_rules_over_exported_metrics(live_metric_names) -> None:
    rules = _adapter_rules()
    served = {r["name"]["as"] for r in rules}
    for rule in rules:
        used = metric_names(rule["seriesQuery"]) | metric_names(
            rule["metricsQuery"].replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "pod")
        )
        assert used and used <= live_metric_names, sorted(used - live_metric_names)
        assert re.fullmatch(
            rule["name"]["matches"].strip("^$"), next(iter(metric_names(rule["seriesQuery"])))
        )
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    hpas = _by_kind("HorizontalPodAutoscaler")
    assert set(hpas) == {"moshi-lm", "moshi-codec", "moshi-gateway"}
    deployments = _by_kind("Deployment")
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        for m in hpa["spec"]["metrics"]:
            assert m["type"] == "Pods", f"{name}: scale on slots, not CPU"
            assert m["pods"]["metric"]["name"] in served
    assert hpas["moshi-lm"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
        "moshi_lm_slots_used_ratio"
    )


# --------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _host_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


def test_compose_services_ports_and_health_checks() -> None:
    services = _compose()["services"]
    assert set(services) == MOSHI_SERVICES | {"prometheus", "grafana"}
    expected = {"gateway": 50051, "codec": 50052, "lm": 50053}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert hc.get("interval") and hc.get("retries")
    for name, port in expected.items():
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        args = _parse_cli(list(svc["command"]))
        assert args.command == name and args.host == "0.0.0.0" and args.port == port
        assert {port, args.metrics_port} <= _host_ports(svc)
        probe = svc["healthcheck"]["test"]
        assert "moshi_grpc.clients.health_probe" in probe
        assert probe[probe.index("--addr") + 1] == f"127.0.0.1:{port}"
        assert "start_period" in svc["healthcheck"]  # model loading
    gw = _parse_cli(list(services["gateway"]["command"]))
    assert gw.codec_addr == ["dns:///codec:50052"] and gw.lm_addr == ["dns:///lm:50053"]
    assert services["gateway"]["depends_on"]["lm"]["condition"] == "service_healthy"
    assert 9090 in _host_ports(services["prometheus"]) and 3000 in _host_ports(services["grafana"])
    for svc in (services["prometheus"], services["grafana"]):
        for vol in svc["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (REPO_ROOT / src).exists(), f"compose mounts missing {src}"


def test_compose_gpu_override_reserves_gpus_and_parses() -> None:
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())["services"]
    for name in ("codec", "lm"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        args = _parse_cli(
            [a.replace("${MOSHI_HF_REPO:-", "").rstrip("}") for a in gpu[name]["command"]]
        )
        assert args.device == "cuda" and args.hf_repo.startswith("kyutai/")
        assert gpu[name]["build"]["args"]["VARIANT"] == "cuda"


def test_prometheus_scrapes_all_three_services() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    services = _compose()["services"]
    targets = {
        job["job_name"]: t for job in cfg["scrape_configs"] for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }  # fmt: skip
    for name in MOSHI_SERVICES:
        args = _parse_cli(list(services[name]["command"]))
        assert targets[f"moshi-{name}"] == f"{name}:{args.metrics_port}"
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml" in mounts


def test_compose_schema_when_checker_available() -> None:
    # The [test] extra installs it beside the interpreter, which need not be on PATH.
    exe = shutil.which("check-jsonschema", path=os.path.dirname(sys.executable)) or shutil.which(
        "check-jsonschema"
    )
    if exe is None:
        pytest.skip("check-jsonschema not installed (validates against the compose spec)")
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml",
         "deploy/compose.gpu.yml"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- kubernetes


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_k8s_backends_gpu_probes_drain_and_headless_services() -> None:
    deployments = _by_kind("Deployment")
    services = _by_kind("Service")
    for name in ("codec", "lm"):
        dep = deployments[f"moshi-{name}"]
        pod = dep["spec"]["template"]["spec"]
        c = _container(dep)
        args = _parse_cli(list(c["args"]))
        assert args.command == name and args.device == "cuda" and args.port == _port(c, "grpc")
        assert args.metrics_port == _port(c, "metrics")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and any(
            t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
        )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == args.port, f"{name} {probe}"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > args.grace  # drain != dead
        svc = services[f"moshi-{name}"]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= pod_labels(dep).items()


def pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def test_k8s_every_deployment_drains_within_its_grace_and_runs_non_root() -> None:
    for name, dep in _by_kind("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        c = _container(dep)
        args = _parse_cli(list(c["args"]))
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep"
        pre_stop = float(cmd[1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + args.grace, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels(dep).items()


def test_k8s_gateway_resolves_headless_services_by_dns() -> None:
    deployments = _by_kind("Deployment")
    services = _by_kind("Service")
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    gw = _container(deployments["moshi-gateway"])
    args = _parse_cli(list(gw["args"]))
    assert "nvidia.com/gpu" not in gw["resources"].get("limits", {})
    for flag, name in ((args.codec_addr, "moshi-codec"), (args.lm_addr, "moshi-lm")):
        (target,) = flag
        m = re.fullmatch(r"dns:///([^.:]+)\.([^.:]+)\.svc\.cluster\.local:(\d+)", target)
        assert m, target
        assert m.group(1) == name and m.group(2) == namespace
        ports = {p["port"] for p in services[name]["spec"]["ports"]}
        assert int(m.group(3)) in ports
    # The services' own DNS-resolver format is what the gateway accepts.
    from moshi_grpc.services.gateway.discovery import parse_specs

    assert len(parse_specs(args.codec_addr + args.lm_addr)) == 2


def test_k8s_pdbs_select_existing_deployments() -> None:
    deployments = _by_kind("Deployment")
    pdbs = _by_kind("PodDisruptionBudget")
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        assert (
            pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployments[name]).items()
        )
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def test_k8s_manifests_validate_against_the_api_schema(tmp_path) -> None:
    """Strict OpenAPI validation (Kubernetes 1.31) with kubernetes-validate, module or CLI."""
    docs = _k8s_docs()
    try:
        import kubernetes_validate
    except ImportError:
        exe = shutil.which("kubernetes-validate")
        if exe is None:
            pytest.skip("kubernetes-validate not installed (offline OpenAPI schema validation)")
        path = tmp_path / "all.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        proc = subprocess.run(
            [exe, "--strict", "-k", "1.31.0", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("passed") + proc.stderr.count("passed") == len(docs)
        return
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_stages_user_healthcheck_entrypoint() -> None:
    import tomllib

    text = _dockerfile()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert {"os-cpu", "os-cuda", "build", "runtime"} <= set(stages)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM os-\$\{VARIANT\} AS runtime$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.M | re.S)
    assert health and "moshi_grpc.clients.health_probe" in health.group(1)
    entry = re.search(r"^ENTRYPOINT (.*)$", text, re.M)
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entry.group(1)) == ["moshi-grpc"] and "moshi-grpc" in scripts
    for line in re.findall(r"^COPY (?!--from)(.*)$", text, re.M):
        for src in shlex.split(line)[:-1]:
            assert (REPO_ROOT / src).exists(), f"COPY source missing: {src}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!clients/**" in ignore and "!services/**" in ignore


def test_health_probe_module_runs_as_in_the_image() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_grpc.clients.health_probe", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--addr" in proc.stdout


def test_docker_build() -> None:
    if os.environ.get("MOSHI_DOCKER_BUILD") != "1":
        pytest.skip("image build is opt-in: MOSHI_DOCKER_BUILD=1 (needs a Docker engine)")
    proc = subprocess.run(
        ["docker", "build", "-f", "deploy/Dockerfile", "-t", "moshi-grpc:test", "."],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


# --------------------------------------------------------------------------- alerts, dashboard


def test_alert_rules_shape() -> None:
    rules = _alert_rules()
    names = {r["alert"] for r in rules}
    assert {"MoshiBudgetMissRateHigh", "MoshiSessionRefusalRateHigh", "MoshiReplicaDown"} <= names
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", r.get("for", "0s"))


def test_dashboard_panels_and_datasource() -> None:
    dash = _dashboard()
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090"
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("sessions", "refusals", "latency", "budget", "batch size", "slots"):
        assert topic in titles, topic
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == source["uid"] and p["targets"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "moshi-grpc.yml").read_text()
    )
    mount = " ".join(_compose()["services"]["grafana"]["volumes"])
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}" in mount


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_checks_rules_config_and_dashboard_queries(tmp_path) -> None:
    def promtool(*args: str) -> None:
        proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    promtool("check", "rules", str(PROM / "alerts.yml"))
    cfg = (PROM / "prometheus.yml").read_text()
    local = tmp_path / "prometheus.yml"
    local.write_text(cfg.replace("/etc/prometheus/alerts.yml", str(PROM / "alerts.yml")))
    promtool("check", "config", str(local))
    # Dashboard expressions parse as PromQL: check them as recording rules.
    rules = [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(_dashboard_exprs())
    ]
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    promtool("check", "rules", str(tmp_path / "dash.yml"))


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_alert_unit_tests(tmp_path) -> None:
    """The alerts fire on synthetic series (budget misses, refusals, a replica down)."""
    spec = yaml.safe_load((FIXTURES / "deploy" / "alerts_test.yml").read_text())
    spec["rule_files"] = [str(PROM / "alerts.yml")]
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
