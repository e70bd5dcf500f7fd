"""Deployment files: Dockerfile, compose files, start script, health check, Prometheus and Grafana.

Nothing here needs Docker. What runs:
- the compose files (base, and base + CPU override merged as Compose merges them) against the Compose
  Specification's JSON schema (vendored in deploy/schemas/), plus checks of what the schema cannot say;
- the Dockerfile's structure (pinned bases, non-root user, health check, no torch, build context), and
  `dockerfile-utils lint` / `dclint` / `shellcheck` where installed (deploy/install-check-tools.sh);
- `promtool check config`, `promtool check rules`, `promtool test rules` (Debian's `prometheus` package);
- the Grafana dashboard: data source uid, and that every PromQL query names only metrics the service exports;
- deploy/entrypoint.sh with a stand-in `diffad`, and for real: start it on a tiny bundle, wait for /readyz,
  inspect an image, read /metrics, SIGTERM it.
Tests that need a tool skip, naming it, when it is absent; DIFFAD_DEPLOY_STRICT=1 turns those skips into
failures (.ci/run sets it once it has installed the tools).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "diffad.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "diffad.yml"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"  # check-jsonschema 0.39.0
STRICT = os.environ.get("DIFFAD_DEPLOY_STRICT") == "1"
# Tools that must be there (.ci/run names those deploy/install-check-tools.sh installed): their tests fail,
# not skip, when the tool is missing, so CI cannot pass by skipping what it could run.
REQUIRED_TOOLS = {t.strip() for t in os.environ.get("DIFFAD_DEPLOY_REQUIRE", "").split(",") if t.strip()}
TOOLS_DIR = Path(os.environ.get("DIFFAD_DEPLOY_TOOLS") or Path.home() / ".cache" / "diffad-deploy-tools")

# The metric contract of docs/DESIGN.md: name -> type.
CONTRACT_METRICS = {
    "diffad_requests_total": "counter",
    "diffad_request_duration_seconds": "histogram",
    "diffad_queue_duration_seconds": "histogram",
    "diffad_inference_duration_seconds": "histogram",
    "diffad_batch_size": "histogram",
    "diffad_queue_depth": "gauge",
    "diffad_model_ready": "gauge",
}
# Series Prometheus itself makes: the scrape's `up` and the alerts' `ALERTS`.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Images we do not build are pinned by version tag and digest.
PINNED_IMAGE = re.compile(r"^[\w./-]+:[\w.-]*\d[\w.-]*@sha256:[0-9a-f]{64}$")


def missing_tool(name: str, why: str, remedy: str = "; deploy/install-check-tools.sh installs it"):
    """Skip (or, under DIFFAD_DEPLOY_STRICT=1 or DIFFAD_DEPLOY_REQUIRE naming it, fail) a test whose tool is
    not installed."""
    message = f"{name} is not installed ({why}){remedy}"
    if STRICT:
        pytest.fail(message + " [DIFFAD_DEPLOY_STRICT=1]")
    if name in REQUIRED_TOOLS:
        pytest.fail(message + f" [DIFFAD_DEPLOY_REQUIRE names {name}]")
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    """A program on PATH, or one that deploy/install-check-tools.sh put under its tools folder."""
    local = TOOLS_DIR / "node_modules" / ".bin" / name
    return shutil.which(name) or (str(local) if local.is_file() else None)


def need_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        missing_tool(f"the Python package {name}", "make deploy-check installs it")


# ================================================================================================
# Compose files: YAML with Compose's tags, interpolation, merging
# ================================================================================================
class Reset:
    """`!reset`: the override file removes the key (Compose v2.24.4+)."""


class Override:
    """`!override VALUE`: the override file replaces the key's value instead of merging into it."""

    def __init__(self, value):
        self.value = value


def load_compose_yaml(path: Path):
    yaml = need_module("yaml")

    class Loader(yaml.SafeLoader):
        pass

    def reset(loader, node):
        return Reset()

    def override(loader, node):
        if isinstance(node, yaml.MappingNode):
            return Override(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Override(loader.construct_sequence(node, deep=True))
        return Override(loader.construct_scalar(node))

    Loader.add_constructor("!reset", reset)
    Loader.add_constructor("!override", override)
    return yaml.load(path.read_text(), Loader=Loader)


_VARIABLE = re.compile(r"\$(?:(\$)"                                            # $$
                       r"|\{([A-Za-z_]\w*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"  # ${VAR...}
                       r"|([A-Za-z_]\w*))")                                      # $VAR


class MissingVariable(ValueError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return interpolate(arg, env) if unset_or_empty else current
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return current
        if op in (":+", "+"):
            return "" if unset_or_empty else interpolate(arg, env)
        return current or ""

    return _VARIABLE.sub(substitute, value)


# Sequences Compose replaces rather than appends when an override file sets them.
_REPLACED_SEQUENCES = {"command", "entrypoint", "test", "dns", "dns_search", "tmpfs"}


def merge_compose(base, override, key: str = ""):
    """Compose's merge of an override file into a base file (the parts these files use)."""
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                merged.pop(k, None)
            elif k in merged:
                merged[k] = merge_compose(merged[k], v, k)
            else:
                merged[k] = strip_tags(v)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return copy.deepcopy(base) + [v for v in override if v not in base]
    return strip_tags(override)


def strip_tags(value):
    """A single file as Compose reads it alone: !reset keys dropped, !override values kept."""
    if isinstance(value, Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


COMPOSE_ENV = {"GRAFANA_ADMIN_PASSWORD": "not-a-real-password"}


@pytest.fixture(scope="module")
def compose_files():
    base = interpolate(load_compose_yaml(COMPOSE), COMPOSE_ENV)
    cpu = interpolate(load_compose_yaml(COMPOSE_CPU), COMPOSE_ENV)
    return {"base": strip_tags(base), "cpu_override": strip_tags(cpu), "merged_cpu": merge_compose(base, cpu)}


@pytest.fixture(scope="module")
def compose_validator():
    jsonschema = need_module("jsonschema")
    schema_bytes = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(schema_bytes).hexdigest() == COMPOSE_SCHEMA_SHA256, (
        "deploy/schemas/compose-spec.json changed: update deploy/schemas/README.md and COMPOSE_SCHEMA_SHA256")
    schema = json.loads(schema_bytes)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_schema_is_the_vendored_one_with_its_license():
    assert (DEPLOY / "schemas" / "LICENSE.compose-spec").read_text().lstrip().startswith("Apache License")
    assert COMPOSE_SCHEMA_SHA256 in (DEPLOY / "schemas" / "README.md").read_text()


@pytest.mark.parametrize("which", ["base", "cpu_override", "merged_cpu"])
def test_compose_files_match_the_compose_specification(compose_files, compose_validator, which):
    errors = sorted(compose_validator.iter_errors(compose_files[which]), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes(compose_files, compose_validator):
    broken = copy.deepcopy(compose_files["base"])
    broken["services"]["inspector"]["healthcheck"]["intervall"] = "15s"
    broken["services"]["inspector"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = "one"
    assert len(list(compose_validator.iter_errors(broken))) >= 2


def test_compose_requires_a_grafana_password():
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(load_compose_yaml(COMPOSE), {})


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $$SET ${SET:+alt} ${UNSET:+alt}", env) == \
        "x d d  $SET alt "


def test_gpu_compose_reserves_one_nvidia_gpu_and_builds_the_gpu_image(compose_files):
    inspector = compose_files["base"]["services"]["inspector"]
    assert inspector["build"]["target"] == "gpu"
    devices = inspector["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_cpu_override_builds_the_cpu_image_without_a_gpu(compose_files):
    inspector = compose_files["merged_cpu"]["services"]["inspector"]
    assert inspector["build"]["target"] == "cpu"
    assert "deploy" not in inspector, "the CPU override must drop the GPU reservation (!reset)"
    assert inspector["environment"]["DIFFAD_BACKEND"] == "onnxruntime"
    assert inspector["image"] != compose_files["base"]["services"]["inspector"]["image"]
    # everything else is inherited from the base file
    base = compose_files["base"]["services"]["inspector"]
    for key in ("volumes", "healthcheck", "restart", "read_only", "cap_drop", "ports"):
        assert key in inspector, key
    assert inspector["volumes"] == base["volumes"]
    assert inspector["healthcheck"]["test"] == base["healthcheck"]["test"]


def test_inspector_service_runs_as_a_production_service(compose_files):
    compose = compose_files["base"]
    inspector = compose["services"]["inspector"]
    assert inspector["restart"] == "unless-stopped"
    assert inspector["healthcheck"]["test"] == ["CMD", "diffad-healthcheck"]
    assert inspector["read_only"] is True and "/tmp" in inspector["tmpfs"]
    assert inspector["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in inspector["security_opt"]
    volumes = {v["target"]: v for v in inspector["volumes"]}
    assert volumes["/models"]["type"] == "bind" and volumes["/models"]["read_only"] is True
    cache = volumes["/var/cache/diffad/engines"]
    assert cache["type"] == "volume" and cache["source"] in compose["volumes"]
    env = inspector["environment"]
    assert env["DIFFAD_ENGINE_CACHE"] == "/var/cache/diffad/engines"
    assert env["DIFFAD_MODELS_DIR"] == "/models"
    assert env["DIFFAD_HOST"] == "0.0.0.0" and env["DIFFAD_PORT"] == "8000"
    assert any(p.endswith(":8000") for p in inspector["ports"])
    # the grace period outlasts the server's own drain (its 503 grace, then the request timeout + 5 s)
    grace = int(inspector["stop_grace_period"].rstrip("s"))
    assert grace > float(env["DIFFAD_DRAIN_GRACE_S"]) + int(env["DIFFAD_REQUEST_TIMEOUT_S"]) + 5


def test_compose_environment_names_only_real_settings(compose_files):
    """A typo in a DIFFAD_ variable would be silently ignored by the service: compare with its settings."""
    settings = pytest.importorskip("diffad.service.settings")
    known = {f"DIFFAD_{name.upper()}" for name in settings.Settings.model_fields}
    known |= set(re.findall(r"\bDIFFAD_[A-Z_]+\b", ENTRYPOINT.read_text()))  # the start script's own
    for which in ("base", "merged_cpu"):
        env = compose_files[which]["services"]["inspector"]["environment"]
        unknown = sorted(k for k in env if k.startswith("DIFFAD_") and k not in known)
        assert not unknown, f"{which}: not settings of the service nor of deploy/entrypoint.sh: {unknown}"


def test_compose_mounts_files_that_exist_and_images_are_pinned(compose_files):
    compose = compose_files["base"]
    for name, service in compose["services"].items():
        if "build" not in service:
            assert PINNED_IMAGE.match(service["image"]), f"{name}: pin the image by tag and digest"
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and volume["target"] != "/models":
                assert (ROOT / volume["source"]).exists(), f"{name} mounts {volume['source']}, which is missing"
                assert volume.get("read_only") is True, f"{name}: mount {volume['source']} read-only"
            elif volume["type"] == "volume":
                assert volume["source"] in compose["volumes"], volume
    prometheus = compose["services"]["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = compose["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    yaml = need_module("yaml")
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    dashboards_target = providers[0]["options"]["path"]
    assert mounts[dashboards_target] == "./deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_target}/{DASHBOARD.name}"


def test_prometheus_scrapes_the_inspector_service(compose_files):
    yaml = need_module("yaml")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "diffad")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["inspector:8000"]
    assert "inspector" in compose_files["base"]["services"]
    assert config["rule_files"] == ["alerts.yml"]  # beside the config file, in the repo and in the container


def test_docker_compose_config_accepts_the_files():
    """`docker compose config` where a Compose v2 CLI exists (not on the development machine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose (the v2 plugin) is not installed: the JSON-schema tests stand in for it")
    env = {**os.environ, **COMPOSE_ENV}
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_CPU)]):
        result = subprocess.run([docker, "compose", *files, "config", "--quiet"], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_dclint_accepts_the_compose_files():
    dclint = find_tool("dclint")
    if dclint is None:
        missing_tool("dclint", "npm package dclint, a Compose linter")
    # Style rules are off (key order, service order); build+image is deliberate (it tags the built image);
    # the override file has no project name of its own; the port's interface is an ${...} variable, which
    # dclint cannot see through.
    disabled = ["service-keys-order", "services-alphabetical-order", "no-build-and-image",
                "require-project-name-field", "no-unbound-port-interfaces"]
    result = subprocess.run([dclint, str(COMPOSE), str(COMPOSE_CPU), "--color", "false", "--max-warnings", "0",
                             "--disable-rule", *disabled], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# ================================================================================================
# Dockerfile
# ================================================================================================
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        word, _, rest = buffer.partition(" ")
        out.append((word.upper(), rest.strip()))
        buffer = ""
    return out


def dockerfile_stages() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], list[str]]:
    """Global ARG defaults, each stage's instructions by stage name, and the stage names in order."""
    global_args, stages, order, current = {}, {}, [], None
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(2)
            order.append(current)
            stages[current] = [("FROM", m.group(1))]
        elif current is None:
            assert word == "ARG", f"{word} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[current].append((word, rest))
    return global_args, stages, order


def stage_base(stage: list[tuple[str, str]], global_args: dict[str, str]) -> str:
    image = stage[0][1]
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    return global_args[m.group(1)] if m else image


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_runtime_stage(target):
    global_args, stages, order = dockerfile_stages()
    stage = stages[target]
    words = [w for w, _ in stage]
    base = stage_base(stage, global_args)
    assert PINNED_IMAGE.match(base), f"{target}: base image {base} is not pinned by tag and digest"
    if target == "cpu":
        assert base.startswith("python:3.11") and "slim-bookworm" in base
    else:
        assert base.startswith("nvidia/cuda:12.") and "cudnn-runtime" in base
    users = [rest for w, rest in stage if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{target}: runs as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    healthchecks = [rest for w, rest in stage if w == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and '"diffad-healthcheck"' in healthchecks[0]
    assert ("EXPOSE", "8000") in stage
    assert ("ENTRYPOINT", '["diffad-entrypoint"]') in stage
    assert ("VOLUME", '["/var/cache/diffad/engines"]') in stage
    env = " ".join(rest for w, rest in stage if w == "ENV")
    for setting in ("DIFFAD_ENGINE_CACHE=/var/cache/diffad/engines", "DIFFAD_MODELS_DIR=/models",
                    "DIFFAD_HOST=0.0.0.0", "DIFFAD_PORT=8000"):
        assert setting in env, f"{target}: ENV {setting}"
    copies = " ".join(rest for w, rest in stage if w == "COPY")
    assert "deploy/entrypoint.sh /usr/local/bin/diffad-entrypoint" in copies
    assert "deploy/healthcheck.py /usr/local/bin/diffad-healthcheck" in copies
    assert f"--from={target}-build /opt/diffad /opt/diffad" in copies


def test_dockerfile_default_target_is_gpu_and_installs_no_torch():
    _, stages, order = dockerfile_stages()
    assert order[-1] == "gpu", "the last stage is what `docker build .` builds"
    assert {"cpu", "gpu", "cpu-build", "gpu-build"} <= set(order)
    text = DOCKERFILE.read_text()
    installs = {name: " ".join(rest for w, rest in stage if w == "RUN" and "pip install" in rest)
                for name, stage in stages.items()}
    assert '-c deploy/requirements/serve-cpu.txt ".[serve,triton,tracing]"' in installs["cpu-build"]
    assert '-c deploy/requirements/gpu-cu12.txt ".[serve,gpu,triton,tracing]"' in installs["gpu-build"]
    for name, command in installs.items():
        assert "torch" not in command, name
        for extras in re.findall(r'"\.\[([^\]]*)\]"', command):
            assert not {"train", "dev"} & set(extras.split(",")), f"{name} installs the extras [{extras}]"
    assert "deploy/verify_image.py --backend onnxruntime" in installs["cpu-build"]
    assert "deploy/verify_image.py --backend tensorrt" in installs["gpu-build"]
    assert not re.search(r"\btorch\b", re.sub(r"#.*", "", text).replace("PyTorch", ""))


def test_dockerfile_copies_every_package_folder():
    """The image installs the package from the folders it copies: each one pyproject.toml maps must be there."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    _, stages, _ = dockerfile_stages()
    copied = {rest.split()[0].split("/")[0] for word, rest in stages["source"] if word == "COPY"}
    assert folders <= copied, f"the source stage does not copy {sorted(folders - copied)}"
    for name in ("cpu-build", "gpu-build"):
        assert ("COPY", "--from=source /src/ ./") in stages[name], f"{name} does not take the source stage"


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers what is in it."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    allowed = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        rx = regex(pattern)
        if any(rx.fullmatch(p) for p in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_passes_what_the_dockerfile_copies_and_nothing_heavy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    _, stages, _ = dockerfile_stages()
    sources = []
    for stage in stages.values():
        for word, rest in stage:
            if word == "COPY" and "--from=" not in rest:
                args = [a for a in rest.split() if not a.startswith("--")]
                sources += args[:-1]
    assert sources
    for source in sources:
        paths = sorted(ROOT.glob(source))
        assert paths, f"COPY {source}: no such file"
        files = [f for path in paths for f in ([path] if path.is_file() else path.rglob("*"))
                 if f.is_file() and "__pycache__" not in f.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert dockerignore_allows(rel, patterns), f".dockerignore drops {rel}, which the Dockerfile copies"
    for heavy in (".venv/bin/python", "runs/x/model.safetensors", "bundles/x/model.onnx", ".git/HEAD",
                  "tests/test_deploy.py", "diffad/__pycache__/cli.cpython-311.pyc", "bench/results/x.json",
                  "service/__pycache__/app.cpython-311.pyc"):
        assert not dockerignore_allows(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_package_data_reaches_a_non_editable_install():
    """The image installs the project as a wheel: files other than .py must be declared as package data."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config.get("tool", {}).get("setuptools", {}).get("package-data", {})
    manifest = (ROOT / "MANIFEST.in").read_text() if (ROOT / "MANIFEST.in").exists() else ""
    missing = []
    for f in sorted((ROOT / "diffad").rglob("*")):
        if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
            continue
        rel_parts = f.relative_to(ROOT).parts
        covered = False
        for n in range(1, len(rel_parts)):
            package, inside = ".".join(rel_parts[:n]), "/".join(rel_parts[n:])
            globs = package_data.get(package, []) + package_data.get("*", [])
            if any(fnmatch.fnmatch(inside, g) for g in globs):
                covered = True
        if not covered and f.relative_to(ROOT).as_posix() not in manifest:
            missing.append(f.relative_to(ROOT).as_posix())
    assert not missing, ("not installed by `pip install .` (add them to [tool.setuptools.package-data] in "
                         f"pyproject.toml): {missing}")


def test_dockerfile_utils_lint():
    linter = find_tool("dockerfile-utils")
    if linter is None:
        missing_tool("dockerfile-utils", "npm package dockerfile-utils, a Dockerfile linter")
    result = subprocess.run([linter, "lint", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_where_installed():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (its binary is on GitHub only, not reachable from here)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- constraint files --------------------------------------------------------------------------------
def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


@pytest.mark.parametrize("lock, extras", [("serve-cpu.txt", ["serve", "tracing"]),
                                          ("gpu-cu12.txt", ["serve", "gpu", "tracing"])])
def test_constraints_pin_every_serving_requirement_and_no_torch(lock, extras):
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_pins(DEPLOY / "requirements" / lock)
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = list(extras)
    while extras:
        for req in map(Requirement, project["optional-dependencies"][extras.pop()]):
            if req.name == project["name"]:  # an extra made of other extras: `gpu` = `diffad[gpu-cu12]`
                extras += sorted(req.extras)
            else:
                requirements.append(req)
    for req in requirements:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{lock} has no pin for {req.name}: run deploy/requirements/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{lock} pins {name}=={pins[name]}, outside pyproject's {req}: run deploy/requirements/lock.sh"
    for forbidden in ("torch", "torchvision", "triton", "safetensors", "scipy", "scikit-learn", "onnxscript"):
        assert forbidden not in pins, f"{lock} pins {forbidden}: the serving image must not carry it"


@pytest.mark.parametrize("extra, cuda, other", [("gpu-cu12", 12, 13), ("gpu-cu13", 13, 12)])
def test_gpu_extras_keep_to_one_cuda_major(extra, cuda, other):
    """A host installs the CUDA builds of its own major version only, with TensorRT 10 or 11."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = {r.name: r.specifier for r in map(Requirement, extras[extra])}
    assert set(reqs) == {"onnxruntime-gpu", f"tensorrt-cu{cuda}", "cuda-python"}
    trt = reqs[f"tensorrt-cu{cuda}"]
    assert trt.contains("10.16.1.11") and trt.contains("11.4.0.106") and not trt.contains("12.0.0")
    assert reqs["cuda-python"].contains(f"{cuda}.9.0") and not reqs["cuda-python"].contains(f"{other}.0.0")
    # onnxruntime-gpu on PyPI: 1.26 is the last CUDA 12 build, 1.27 the first CUDA 13 one
    cuda12_ort, cuda13_ort = reqs["onnxruntime-gpu"].contains("1.26.0"), reqs["onnxruntime-gpu"].contains("1.27.0")
    assert (cuda12_ort, cuda13_ort) == ((True, False) if cuda == 12 else (False, True))
    assert extras["gpu"] == ["diffad[gpu-cu12]"], "`gpu` is the CUDA 12 set, which runs on CUDA 12 and 13 drivers"


def test_gpu_constraints_stay_on_cuda_12():
    pins = read_pins(DEPLOY / "requirements" / "gpu-cu12.txt")
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]
    assert tuple(int(x) for x in pins["onnxruntime-gpu"].split(".")[:2]) <= (1, 26), "onnxruntime-gpu 1.27+ is CUDA 13"
    assert pins["tensorrt-cu12"] == pins["tensorrt-cu12-libs"] == pins["tensorrt-cu12-bindings"]
    assert pins["tensorrt-cu12"].split(".")[0] in {"10", "11"}, "the engine code supports TensorRT 10 and 11"
    assert "tensorrt" not in pins, "the `tensorrt` meta package installs tensorrt-cu13 from 10.13.3 on"
    assert pins["cuda-python"].startswith("12.")
    assert not any(name.endswith("-cu13") or name.startswith("tensorrt-cu13") for name in pins)


# ================================================================================================
# Prometheus
# ================================================================================================
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        missing_tool("promtool", "Debian package prometheus")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=PROMETHEUS_DIR)


def test_promtool_check_config():
    result = run_promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules():
    result = run_promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run_promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_the_required_alerts_exist():
    yaml = need_module("yaml")
    rules = [r for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert set(alerts) <= tested, f"alerts without a firing test: {sorted(set(alerts) - tested)}"
    exprs = {name: r["expr"] for name, r in alerts.items()}
    assert any("histogram_quantile(0.99" in e and "diffad_request_duration_seconds_bucket" in e for e in exprs.values())
    assert any('status=~"5.."' in e for e in exprs.values())
    assert any("diffad_queue_depth" in e for e in exprs.values())
    assert any("diffad_model_ready" in e for e in exprs.values())
    assert any(re.search(r"\bup\{", e) for e in exprs.values())
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


# ================================================================================================
# PromQL metric names against what the service exports
# ================================================================================================
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords or label names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_metric_names_parser():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{model=~"$model"}[5m])))') == \
        {"a_bucket"}
    assert promql_metric_names('sum(rate(x_total{status=~"5.."}[$__rate_interval])) / on(job) group_left '
                               'y or vector(0)') == {"x_total", "y"}
    assert promql_metric_names('up{job="diffad"} == 0 and absent(z)') == {"up", "z"}


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Every series name the service exports: from its own registry, checked against the contract."""
    metrics_module = pytest.importorskip("diffad.service.metrics")
    registry = metrics_module.ServiceMetrics().registry
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["_sum", "_count", ""], "untyped": [""], "info": ["_info"]}
    names = set()
    types = {}
    for family in registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
        names |= {s.name for s in family.samples}
        types[family.name + ("_total" if family.type == "counter" else "")] = family.type
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    for name, kind in CONTRACT_METRICS.items():
        assert types.get(name) == kind, f"the service does not export {kind} {name} (docs/DESIGN.md)"
        assert name.removeprefix("diffad_") in design
    return names


def test_alert_rules_use_only_exported_metrics(exported_metrics):
    yaml = need_module("yaml")
    for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            unknown = promql_metric_names(rule["expr"]) - exported_metrics - PROMETHEUS_SERIES
            assert not unknown, f"{rule.get('alert')}: {sorted(unknown)} are not exported by the service"


# ================================================================================================
# Grafana
# ================================================================================================
def dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows hold their panels
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    yaml = need_module("yaml")
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["url"] == "http://prometheus:9090"
    return prometheus[0]["uid"]


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    queries = [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    queries += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"]
                if v["type"] == "query"]
    return queries


def test_dashboard_panels_use_the_provisioned_datasource(dashboard, datasource_uid):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == datasource_uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == datasource_uid


def test_dashboard_queries_use_only_exported_metrics(dashboard, exported_metrics):
    for title, expr in dashboard_queries(dashboard):
        if expr.startswith("label_values("):  # label_values(SELECTOR, LABEL)
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        names = promql_metric_names(expr)
        unknown = names - exported_metrics - PROMETHEUS_SERIES
        assert names, f"{title}: no metric in {expr}"
        assert not unknown, f"{title}: {sorted(unknown)} are not exported by the service"
        for m in re.finditer(r"histogram_quantile\([^,]+,(.*)", expr):
            assert "_bucket" in m.group(1), f"{title}: histogram_quantile needs the _bucket series"


def test_dashboard_covers_what_operators_need(dashboard):
    text = json.dumps([(p["title"], p.get("targets", [])) for p in dashboard_panels(dashboard)])
    for needed in ("diffad_requests_total", "histogram_quantile(0.5,", "histogram_quantile(0.95,",
                   "histogram_quantile(0.99,", "diffad_queue_duration_seconds", "diffad_inference_duration_seconds",
                   "diffad_batch_size_bucket", "diffad_queue_depth", "diffad_model_ready", "sum by (status)"):
        assert needed in text, f"the dashboard has no query with {needed}"
    kinds = {p["type"] for p in dashboard_panels(dashboard)}
    assert {"timeseries", "stat", "heatmap"} <= kinds


def test_dashboard_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses every dashboard query, written as recording rules (Grafana's variables filled in)."""
    yaml = need_module("yaml")
    rules = []
    for i, (_, expr) in enumerate(q for q in dashboard_queries(dashboard) if not q[1].startswith("label_values")):
        filled = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$model", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(tmp_path / "dashboard_rules.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ================================================================================================
# Health check script
# ================================================================================================
class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.server.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_service():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFAD_PORT": str(port)}
    env.pop("DIFFAD_HEALTHCHECK_URL", None)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_follows_readyz(fake_service):
    port = fake_service.server_address[1]
    assert run_healthcheck(port).returncode == 0
    fake_service.status = 503
    result = run_healthcheck(port)
    assert result.returncode == 1 and "HTTP 503" in result.stderr


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_healthcheck(port)
    assert result.returncode == 1 and "refused" in result.stderr.lower()


def test_healthcheck_is_executable_and_stdlib_only():
    assert os.access(HEALTHCHECK, os.X_OK) and os.access(ENTRYPOINT, os.X_OK)
    imports = set(re.findall(r"^(?:import|from) (\w+)", HEALTHCHECK.read_text(), re.MULTILINE))
    assert imports <= {"os", "sys", "urllib"}, imports


# ================================================================================================
# Start script, with a stand-in `diffad`
# ================================================================================================
@pytest.fixture
def stub(tmp_path):
    stub = tmp_path / "bin" / "diffad"
    stub.parent.mkdir()
    stub.write_text("""#!/bin/sh
verb=$1
shift
{ printf '%s' "$verb"; for a in "$@"; do printf ' [%s]' "$a"; done; echo; } >> "$STUB_LOG"
echo "pid=$$ models=${DIFFAD_MODELS-unset} cache=${DIFFAD_ENGINE_CACHE-unset}" >> "$STUB_LOG"
if [ "$verb" = engines ]; then exit "${STUB_ENGINES_EXIT:-0}"; fi
exit 0
""")
    stub.chmod(0o755)
    models = tmp_path / "models"
    for name in ("a", "b c"):
        (models / name).mkdir(parents=True)
        (models / name / "bundle.json").write_text("{}")
    (models / "not-a-bundle").mkdir()
    return tmp_path


def run_entrypoint(stub_dir: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = stub_dir / "calls.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAD_")}
    base.update({"DIFFAD_BIN": str(stub_dir / "bin" / "diffad"), "STUB_LOG": str(log),
                 "DIFFAD_MODELS_DIR": str(stub_dir / "models"), "DIFFAD_ENGINE_CACHE": str(stub_dir / "cache")})
    base.update(env)
    result = subprocess.run(["sh", str(ENTRYPOINT), *args], env=base, capture_output=True, text=True, timeout=60)
    return result, (log.read_text().splitlines() if log.exists() else [])


def test_entrypoint_builds_engines_then_execs_serve(stub):
    result, calls = run_entrypoint(stub, "--port", "9000", "--log-level", "debug", DIFFAD_MAX_BATCH_SIZE="16")
    assert result.returncode == 0, result.stderr
    m, c = stub / "models", stub / "cache"
    assert calls[0] == f"engines [{m}/a] [{m}/b c] [--cache-dir] [{c}] [--fp16] [--or-fp32] [--max-batch] [16]"
    assert calls[2] == f"serve [{m}/a] [{m}/b c] [--port] [9000] [--log-level] [debug]"
    assert calls[3].endswith(f"models=unset cache={c}")
    assert c.is_dir()
    assert "2 model bundle(s)" in result.stderr


def test_entrypoint_takes_diffad_models_and_a_single_bundle_folder(stub):
    m = stub / "models"
    result, calls = run_entrypoint(stub, DIFFAD_MODELS=f" {m}/b c , {m}/a", DIFFAD_BACKEND="onnxruntime")
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"serve [{m}/b c] [{m}/a]", "DIFFAD_MODELS order is kept, spaces around commas trimmed"
    assert "no TensorRT engines needed" in result.stderr
    result, calls = run_entrypoint(stub, DIFFAD_MODELS_DIR=str(m / "a"), DIFFAD_ENGINE_PRECISION="fp32")
    assert calls[0] == f"engines [{m}/a] [--cache-dir] [{stub / 'cache'}]"
    assert calls[2] == f"serve [{m}/a]"


def test_entrypoint_serves_a_triton_repository_as_the_gateway(stub, tmp_path):
    """DIFFAD_BACKEND=triton over a `diffad export-triton` repository: its model folders are the models (the
    service takes each one's newest version), a folder without a numbered bundle is not, and no engines
    are built: Triton runs the models."""
    repo = tmp_path / "repo"
    for name in ("weave", "grid"):
        (repo / name / "3").mkdir(parents=True)
        (repo / name / "3" / "bundle.json").write_text("{}")
        (repo / name / "config.pbtxt").write_text('name: "x"')
    (repo / "empty").mkdir()
    (repo / "empty" / "config.pbtxt").write_text('name: "empty"')
    result, calls = run_entrypoint(stub, DIFFAD_MODELS_DIR=str(repo), DIFFAD_BACKEND="triton")
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"serve [{repo}/grid] [{repo}/weave]"
    assert "DIFFAD_BACKEND=triton: no TensorRT engines needed" in result.stderr
    result, _ = run_entrypoint(stub, DIFFAD_MODELS=str(repo / "empty"), DIFFAD_BACKEND="triton")
    assert result.returncode == 2 and "is not a model bundle" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"DIFFAD_MODELS_DIR": "/nonexistent/models"}, "does not exist"),
    ({"DIFFAD_MODELS_DIR": "/"}, "no model bundles found"),
    ({"DIFFAD_MODELS": "/nonexistent/bundle"}, "is not a model bundle"),
    ({"DIFFAD_MODELS": '["/a"]'}, "comma-separated"),
    ({"DIFFAD_ENGINE_PRECISION": "int8"}, "fp16 or fp32"),
])
def test_entrypoint_refuses_bad_configuration(stub, env, message):
    result, calls = run_entrypoint(stub, **env)
    assert result.returncode == 2 and message in result.stderr and not calls


def test_entrypoint_engine_failures(stub):
    # auto: a failed build is a warning, the service starts on ONNX Runtime
    result, calls = run_entrypoint(stub, STUB_ENGINES_EXIT="1")
    assert result.returncode == 0 and "serving with ONNX Runtime" in result.stderr
    assert calls[2].startswith("serve ")
    # tensorrt: the start fails with the build's status
    result, calls = run_entrypoint(stub, STUB_ENGINES_EXIT="1", DIFFAD_BACKEND="tensorrt")
    assert result.returncode == 1 and len(calls) == 2
    # switched off
    result, calls = run_entrypoint(stub, DIFFAD_BUILD_ENGINES="0")
    assert calls[0].startswith("serve ")


def test_entrypoint_unwritable_engine_cache(stub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result, calls = run_entrypoint(stub, DIFFAD_ENGINE_CACHE=str(blocker / "cache"))
    assert result.returncode == 0 and "not writable" in result.stderr
    assert calls[0].startswith("serve ")
    result, calls = run_entrypoint(stub, DIFFAD_ENGINE_CACHE=str(blocker / "cache"), DIFFAD_BACKEND="tensorrt")
    assert result.returncode == 1 and not calls


def test_entrypoint_runs_a_command_instead(stub):
    result, calls = run_entrypoint(stub, "sh", "-c", "echo ran $0", "it")
    assert result.returncode == 0 and result.stdout.strip() == "ran it" and not calls


def test_entrypoint_execs_so_signals_reach_the_server(stub):
    """The server gets the entrypoint's PID: `docker stop`'s SIGTERM goes to it, not to a shell."""
    log = stub / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAD_")}
    env.update({"DIFFAD_BIN": str(stub / "bin" / "diffad"), "STUB_LOG": str(log),
                "DIFFAD_MODELS_DIR": str(stub / "models"), "DIFFAD_BACKEND": "onnxruntime"})
    process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stderr=subprocess.DEVNULL)
    assert process.wait(timeout=60) == 0
    assert f"pid={process.pid} " in log.read_text()


def test_shellcheck_scripts():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        missing_tool("shellcheck", "Debian package shellcheck")
    for script, dialect in ((ENTRYPOINT, "sh"), (DEPLOY / "requirements" / "lock.sh", "bash"),
                            (DEPLOY / "install-check-tools.sh", "bash"), (DEPLOY / "serving-env-check.sh", "bash")):
        result = subprocess.run([shellcheck, f"--shell={dialect}", "--severity=style", str(script)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ================================================================================================
# The start script against the real service, on a tiny bundle
# ================================================================================================
def serve_binary() -> str:
    """`diffad` to serve with: DIFFAD_DEPLOY_SERVE_BIN (deploy/serving-env-check.sh sets it to a venv
    installed like the cpu image, without torch), else the one beside this Python."""
    given = os.environ.get("DIFFAD_DEPLOY_SERVE_BIN")
    if given:
        return given
    found = shutil.which("diffad", path=str(Path(sys.executable).parent)) or shutil.which("diffad")
    if found is None:
        pytest.skip("no diffad command installed")
    return found


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny untrained model, calibrated by hand, exported like `diffad export` does (needs torch)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffad.service.app")
    from diffad.evaluation.evaluate import CALIBRATION_FILE, Calibration
    from diffad.export.exporter import export_bundle
    from diffad.models import checkpoint as ckpt
    from diffad.models.diffusionad import DiffusionAD
    from diffad.models.presets import preset

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    ckpt.save_model(run / ckpt.MODEL_FILE, DiffusionAD(preset("tiny", in_channels=3)).eval())
    calibration = Calibration(threshold=0.5, method="f1", score_min=0.1, score_max=0.9, num_images=4)
    (run / CALIBRATION_FILE).write_text(json.dumps(calibration.to_dict()))
    (run / "train_summary.json").write_text(json.dumps({"preset": "tiny", "steps": 0}))
    models = tmp_path_factory.mktemp("models")
    export_bundle(run, models / "tiny")
    return models / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_url(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart_png(width: int = 48, height: int = 40) -> tuple[bytes, str]:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    boundary = "diffadboundary7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"part.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_entrypoint_serves_a_bundle_and_stops_on_sigterm(tiny_bundle, tmp_path):
    """deploy/entrypoint.sh as the container runs it: engines step (nothing to build without a GPU),
    exec diffad serve, /readyz, an inspection, /metrics, the health check, then SIGTERM and a clean exit."""
    binary = serve_binary()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAD_")}
    env.update({"DIFFAD_BIN": binary, "DIFFAD_MODELS_DIR": str(tiny_bundle.parent), "DIFFAD_HOST": "127.0.0.1",
                "DIFFAD_PORT": str(port), "DIFFAD_ENGINE_CACHE": str(tmp_path / "engines"),
                "DIFFAD_BACKEND": "auto", "DIFFAD_MAX_BATCH_SIZE": "4", "DIFFAD_THREADS": "1",
                "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status, _ = request_url("GET", f"{base}/readyz", timeout=5)
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, f"not ready (exit {process.poll()}):\n{log_path.read_text()[-4000:]}"

        # the process answering is the one the script started: exec replaced the shell
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline, cmdline
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libtorch" not in maps, "the serving process loaded PyTorch"

        assert run_healthcheck(port).returncode == 0
        body, content_type = multipart_png()
        status, answer = request_url("POST", f"{base}/inspect", body, {"Content-Type": content_type})
        assert status == 200, answer
        result = json.loads(answer)
        assert result["model"] == "tiny" and (result["width"], result["height"]) == (48, 40)
        assert {"image_score", "normalized_score", "is_anomalous", "anomaly_map", "timings_ms"} <= set(result)

        status, metrics = request_url("GET", f"{base}/metrics")
        text = metrics.decode()
        assert status == 200
        for name, kind in CONTRACT_METRICS.items():
            assert f"# TYPE {name} {kind}" in text, name
        assert 'diffad_requests_total{model="tiny",status="200"} 1.0' in text
        assert 'diffad_model_ready{model="tiny"} 1.0' in text

        # uvicorn drains, then re-raises the signal: the exit is "killed by SIGTERM" (143 in Docker) or 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM), log_path.read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log_text = log_path.read_text()
    assert "diffad-entrypoint: checking TensorRT engines" in log_text
    assert "diffad-entrypoint: exec " in log_text
    assert "Application shutdown complete" in log_text, log_text[-4000:]


def test_a_required_tool_that_is_missing_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REQUIRED_TOOLS", {"promtool"})
    with pytest.raises(pytest.fail.Exception, match="DIFFAD_DEPLOY_REQUIRE names promtool"):
        missing_tool("promtool", "Debian package prometheus")
    with pytest.raises(pytest.skip.Exception):
        missing_tool("hadolint", "GitHub only")  # not required: it may skip
