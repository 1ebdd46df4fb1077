"""The deploy files agree with the code: commands, ports, images and metric names.

Every file under deploy/ is parsed (YAML, JSON, Dockerfile lines) and checked against the
truth in the code, never against numbers written here: each `kvservice serve` command
parses with the CLI's own parser and uses its default ports; the Grafana dashboard and the
Prometheus config name only the metrics, labels and label values that a real coordinator
registers; Ray versions, images and environment agree between the files. Nothing here
starts Ray or opens a socket.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_YAML = DEPLOY / "ray" / "cluster.yaml"
KUBERAY_YAML = DEPLOY / "kuberay" / "raycluster.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "kvservice.json"

# Every process on a GPU node keeps NVLink multicast off.
NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Host memory a GPU worker Pod needs beyond its pinned CPU pool (process, CUDA context).
WORKER_HEADROOM_GIB = 4


# ---------------------------------------------------------------------------- readers


@cache
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@cache
def kuberay() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


@cache
def prometheus() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_YML.read_text())


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            word, _, rest = logical.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


@cache
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def head_container() -> dict[str, Any]:
    (container,) = kuberay()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return container


def worker_groups() -> list[dict[str, Any]]:
    return kuberay()["RayCluster"]["spec"]["workerGroupSpecs"]


def all_pod_specs() -> list[dict[str, Any]]:
    spec = kuberay()["RayCluster"]["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def gib(quantity: str | int) -> float:
    """A Kubernetes memory quantity in GiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert match, f"unreadable memory quantity {quantity!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1) / 2**30


# ------------------------------------------------------------- the serve commands


def serve_argv(command: str | list[str]) -> list[str]:
    """The arguments after `kvservice serve` in a shell line (up to the first shell operator)
    or an exec-form argument list."""
    if isinstance(command, list):
        words = command
    else:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    for index in range(len(words) - 1):
        if words[index].endswith("kvservice") and words[index + 1] == "serve":
            argv = []
            for word in words[index + 2 :]:
                if word and set(word) <= set("&|;<>()"):
                    break
                argv.append(word)
            return argv
    raise AssertionError(f"no `kvservice serve` in {command!r}")


def serve_scripts() -> dict[str, str | list[str]]:
    """Every command line of the deploy files that runs `kvservice serve`, by file."""
    heads = [c for c in cluster()["head_start_ray_commands"] if "kvservice serve" in c]
    assert len(heads) == 1, "the ray up head starts kvservice exactly once"
    (args,) = head_container()["args"]
    (cmd,) = [rest for word, rest in docker() if word == "CMD"]
    return {
        "ray/cluster.yaml": heads[0],
        "kuberay/raycluster.yaml": args,
        "docker/Dockerfile": json.loads(cmd),
    }


def serve_commands() -> dict[str, list[str]]:
    """The arguments of every `kvservice serve` the deploy files run, by file."""
    return {where: serve_argv(script) for where, script in serve_scripts().items()}


@cache
def serve_parser() -> argparse.ArgumentParser:
    """The argparse parser of `kvservice serve`, from the CLI itself."""
    from kvservice.cli import build_parser

    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    return subparsers.choices["serve"]


def serve_defaults() -> Any:
    return serve_parser().parse_args([])


def parse_serve(argv: list[str]) -> Any:
    try:
        return serve_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`kvservice serve {shlex.join(argv)}` does not parse") from exc


def test_every_serve_command_parses_with_the_cli_and_uses_its_default_ports() -> None:
    from kvservice import cli, server
    from kvservice.metrics import DEFAULT_METRICS_PORT

    defaults = serve_defaults()
    assert defaults.port == cli.DEFAULT_PORT == server.DEFAULT_PORT
    assert defaults.metrics_port == DEFAULT_METRICS_PORT
    for where, argv in serve_commands().items():
        args = parse_serve(argv)
        assert args.port == defaults.port, where
        assert args.metrics_port == defaults.metrics_port, where


def test_cluster_heads_join_the_running_ray_and_the_image_starts_its_own() -> None:
    commands = serve_commands()
    assert parse_serve(commands["ray/cluster.yaml"]).ray_address == "auto"
    assert parse_serve(commands["kuberay/raycluster.yaml"]).ray_address == "auto"
    assert parse_serve(commands["docker/Dockerfile"]).ray_address == "local"


def test_every_serve_command_names_a_real_layout_and_they_agree() -> None:
    from kvservice.layouts import parse_layout

    layouts = set()
    for where, argv in serve_commands().items():
        args = parse_serve(argv)
        layout = parse_layout(args.layout, block_size=args.block_size)
        assert 0 < args.gpu_mem_fraction <= 1, where
        assert args.cpu_pool_gib > 0, where
        layouts.add(layout)
    assert len(layouts) == 1, f"the deploy files serve different layouts: {layouts}"


_GPU_WAIT = re.compile(r'cluster_resources\(\)\.get\("GPU", 0\) < (\d+)')


def test_cluster_heads_wait_for_every_gpu_and_start_a_worker_on_each() -> None:
    # The server sizes its worker group once, from the GPUs present when it starts; GPU
    # nodes join after the head, so the head waits for all of them first.
    config = cluster()
    ray_up_gpus = sum(
        node.get("min_workers", 0) * node["resources"].get("GPU", 0)
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    )
    kuberay_gpus = sum(
        group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in worker_groups()
    )
    scripts = serve_scripts()
    for where, gpus in (("ray/cluster.yaml", ray_up_gpus), ("kuberay/raycluster.yaml", kuberay_gpus)):
        script = scripts[where]
        assert isinstance(script, str) and gpus >= 1, where
        waits = _GPU_WAIT.findall(script)
        assert waits == [str(gpus)], f"{where}: waits for {waits} GPUs, the cluster has {gpus}"
        assert script.index("cluster_resources") < script.index("kvservice serve"), where
        assert parse_serve(serve_argv(script)).num_workers == gpus, where


# -------------------------------------------------------------------------- ports


def test_the_image_exposes_the_grpc_and_metrics_ports() -> None:
    defaults = serve_defaults()
    exposed = {int(p.split("/")[0]) for word, rest in docker() if word == "EXPOSE" for p in rest.split()}
    assert {defaults.port, defaults.metrics_port} <= exposed


def test_ray_up_security_group_opens_the_grpc_and_metrics_ports() -> None:
    defaults = serve_defaults()
    rules = cluster()["provider"]["security_group"]["IpPermissions"]
    opened = {port for r in rules for port in range(r["FromPort"], r["ToPort"] + 1)}
    assert {defaults.port, defaults.metrics_port} <= opened


def test_kuberay_service_reaches_the_head_on_the_default_ports() -> None:
    defaults = serve_defaults()
    ray_cluster, service = kuberay()["RayCluster"], kuberay()["Service"]
    container_ports = {p["name"]: p["containerPort"] for p in head_container()["ports"]}
    assert container_ports["grpc"] == defaults.port
    assert container_ports["metrics"] == defaults.metrics_port
    assert service["spec"]["selector"] == {
        "ray.io/cluster": ray_cluster["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == defaults.port
    assert ports["metrics"]["port"] == defaults.metrics_port
    for port in ports.values():
        assert port["targetPort"] in container_ports, f"targetPort {port['targetPort']} is not a head port"
    annotations = service["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(defaults.metrics_port)


def test_prometheus_scrapes_the_service_metrics_port() -> None:
    defaults = serve_defaults()
    (job,) = [j for j in prometheus()["scrape_configs"] if j["job_name"] == "kvservice"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets
    service_name = kuberay()["Service"]["metadata"]["name"]
    for target in targets:
        host, _, port = target.rpartition(":")
        assert int(port) == defaults.metrics_port
        assert host == service_name


# --------------------------------------------------------- images, versions, nodes


def dockerfile_ray_version() -> str:
    (arg,) = [rest for word, rest in docker()[:1] if word == "ARG"]
    name, _, value = arg.partition("=")
    assert name == "RAY_VERSION" and value, "the Dockerfile starts with ARG RAY_VERSION=<version>"
    return value


def test_image_is_rays_gpu_image_of_the_cluster_ray_version() -> None:
    from_lines = [rest for word, rest in docker() if word == "FROM"]
    assert len(from_lines) == 1
    match = re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py(\d)(\d+)-gpu", from_lines[0])
    assert match, f"not a Ray GPU image: {from_lines[0]}"
    assert kuberay()["RayCluster"]["spec"]["rayVersion"] == dockerfile_ray_version()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert (int(match.group(1)), int(match.group(2))) >= minimum


def test_dockerfile_redeclares_the_build_args_it_uses_after_from() -> None:
    # An ARG declared before FROM is empty after it unless declared again.
    instructions = docker()
    start = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    after = instructions[start + 1 :]
    declared = {rest.partition("=")[0] for word, rest in after if word == "ARG"}
    declared |= {pair.partition("=")[0] for word, rest in instructions if word == "ENV" for pair in rest.split()}
    for word, rest in after:
        for name in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", rest):
            assert name in declared, f"{word} uses ${name}, not declared after FROM"


def test_image_copies_every_package_the_project_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = project["tool"]["setuptools"].get("package-dir", {})
    copied = {
        src.rstrip("/")
        for word, rest in docker()
        if word == "COPY"
        for src in [w for w in rest.split() if not w.startswith("--")][:-1]
    }
    assert {"pyproject.toml", project["project"]["readme"]} <= copied
    for package in project["tool"]["setuptools"]["packages"]:
        parent = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len, default="")
        base = package_dir.get(parent, parent.replace(".", "/"))
        source = base + package[len(parent) :].replace(".", "/")
        assert any(source == c or source.startswith(c + "/") for c in copied), f"{package} ({source}) not copied"
    ignore = DOCKERIGNORE.read_text().split()
    if "**" in ignore:
        for source in copied:
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is dockerignored"


def test_images_are_the_package_version_everywhere() -> None:
    from kvservice import __version__

    images = {cluster()["docker"]["image"]}
    images |= {c["image"] for spec in all_pod_specs() for c in spec["containers"]}
    assert len(images) == 1, f"different images: {images}"
    (image,) = images
    assert image.rpartition(":")[2] == __version__


def test_nvlink_multicast_is_off_in_every_container() -> None:
    env = dict(pair.split("=", 1) for word, rest in docker() if word == "ENV" for pair in rest.split())
    assert NVLS_ENV.items() <= env.items()
    run_options = " ".join(cluster()["docker"]["run_options"])
    for name, value in NVLS_ENV.items():
        assert f"--env {name}={value}" in run_options
    for spec in all_pod_specs():
        for container in spec["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert NVLS_ENV.items() <= env.items(), container["name"]


def test_ray_up_config_is_valid_for_the_installed_ray() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # finds the package without importing Ray
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cluster(), json.loads(schema_path.read_text()))


def test_ray_up_head_has_no_gpu_and_a_gpu_worker_type_exists() -> None:
    config = cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t.get("min_workers", 0) >= 1 for t in workers)
    commands = config["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    serve = next(i for i, c in enumerate(commands) if "kvservice serve" in c)
    assert ray_start < serve, "kvservice joins a running Ray (--ray-address auto)"


def test_kuberay_head_runs_ray_in_the_background_then_execs_kvservice() -> None:
    ray_cluster = kuberay()["RayCluster"]
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    assert ray_cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (args,) = head_container()["args"]
    # --block would keep `ray start` in the foreground and kvservice would never start.
    assert "${KUBERAY_GEN_RAY_START_CMD/--block/}" in args
    assert re.search(r"\bexec kvservice serve\b", args), "kvservice must get the Pod's SIGTERM"
    assert ray_cluster["spec"]["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    for group in worker_groups():
        (container,) = group["template"]["spec"]["containers"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(container["args"])


def test_kuberay_head_waits_longer_than_the_server_drains() -> None:
    grace = parse_serve(serve_commands()["kuberay/raycluster.yaml"]).grace
    spec = kuberay()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    # The drain, then stopping the worker actors, must end before the kubelet's SIGKILL.
    assert spec["terminationGracePeriodSeconds"] >= 2 * grace


def test_kuberay_gpu_workers_have_memory_for_their_cpu_pools() -> None:
    cpu_pool_gib = parse_serve(serve_commands()["kuberay/raycluster.yaml"]).cpu_pool_gib
    assert worker_groups()
    for group in worker_groups():
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        num_gpus = int(limits.get("nvidia.com/gpu", 0))
        assert num_gpus >= 1, f"worker group {group['groupName']} has no GPU"
        needed = num_gpus * cpu_pool_gib + WORKER_HEADROOM_GIB
        assert gib(limits["memory"]) >= needed, f"{group['groupName']}: {limits['memory']} < {needed} GiB"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# ------------------------------------------------------------------------ metrics


@cache
def exported() -> dict[str, dict[str, frozenset[str]]]:
    """Sample name -> label -> values seen, from a real coordinator's registry after a few
    real calls (so labelled series exist), with CPU workers in this process."""
    from kvservice.workers import Worker

    from kvservice.coordinator import Coordinator
    from kvservice.coordinator_workers import LocalWorkerHandle
    from kvservice.core.errors import NotFound
    from kvservice.layouts import parse_layout

    layout = parse_layout("tiny")
    handles = [
        LocalWorkerHandle(wid, Worker(wid, layout, device="cpu", num_gpu_blocks=8, num_cpu_blocks=8))
        for wid in range(2)
    ]
    coordinator = Coordinator(layout, handles)
    info = coordinator.create_sequence(list(range(2 * layout.block_size + 1)))
    coordinator.lookup_prefix(list(range(layout.block_size)))
    with pytest.raises(NotFound):
        coordinator.get_sequence(info.seq_id + 1000)
    coordinator.free([info.seq_id])
    seen: dict[str, dict[str, set[str]]] = {}
    for family in coordinator.metrics.registry.collect():
        for sample in family.samples:
            labels = seen.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return {name: {k: frozenset(v) for k, v in labels.items()} for name, labels in seen.items()}


def _family(name: str) -> str:
    """The metric family of a sample name (a histogram's or counter's samples share one)."""
    return re.sub(r"_(bucket|count|sum|created|total)$", "", name)


_METRIC = re.compile(r"\b(kvservice_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*(kvservice_[A-Za-z0-9_]+)\s*,\s*([A-Za-z_]+)\s*\)")


def promql_problems(
    expr: str, legend: str, metrics: dict[str, dict[str, frozenset[str]]]
) -> list[str]:
    """What in one query does not exist on the server: metric names, labels, literal label
    values, grouping labels and legend labels."""
    problems: list[str] = []
    used: list[str] = []
    for name, selector in _METRIC.findall(expr):
        if name not in metrics:
            problems.append(f"{name} is not exported")
            continue
        used.append(name)
        for label, op, value in _MATCHER.findall(selector):
            if label not in metrics[name]:
                problems.append(f"{name} has no label {label!r}")
            elif op in ("=", "!=") and "$" not in value and value not in metrics[name][label]:
                problems.append(f"{name}{{{label}}} is never {value!r}")
    if not used:
        return problems or [f"no kvservice metric in {expr!r}"]
    for group in _GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if any(label not in metrics[name] for name in used):
                problems.append(f"grouping by {label!r}, which is not on every metric of {expr!r}")
    for label in _LEGEND.findall(legend):
        if not any(label in metrics[name] for name in used):
            problems.append(f"legend label {label!r} is not on {used}")
    return problems


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) for every query of the dashboard."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_query_checker_catches_what_the_server_does_not_export() -> None:
    metrics = {
        "kvservice_blocks": {"tier": frozenset({"gpu", "cpu"}), "state": frozenset({"used"})},
        "kvservice_x_bucket": {"le": frozenset({"1"}), "method": frozenset({"a"})},
    }
    assert promql_problems('sum by (tier) (kvservice_blocks{state="used"})', "{{tier}}", metrics) == []
    assert promql_problems("rate(kvservice_nope_total[5m])", "", metrics) == ["kvservice_nope_total is not exported"]
    assert promql_problems('kvservice_blocks{tier="tpu"}', "", metrics)
    assert promql_problems('kvservice_blocks{worker="0"}', "", metrics)
    assert promql_problems("sum by (method) (kvservice_blocks)", "", metrics)
    assert promql_problems("kvservice_blocks", "{{method}}", metrics)
    assert promql_problems("up", "", metrics)
    assert promql_problems('kvservice_blocks{tier=~"$tier"}', "", metrics) == []


def test_dashboard_queries_use_only_exported_metrics_labels_and_values() -> None:
    metrics = exported()
    problems = [
        f"{title}: {problem}"
        for title, expr, legend in dashboard_queries()
        for problem in promql_problems(expr, legend, metrics)
    ]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("definition") or ""
        for name, label in _LABEL_VALUES.findall(query):
            if label not in metrics.get(name, {}):
                problems.append(f"variable {variable['name']}: {name} has no label {label!r}")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_metric_the_server_exports() -> None:
    shown = {name for _, expr, _ in dashboard_queries() for name, _ in _METRIC.findall(expr)}
    # A histogram or counter is shown when any of its samples is.
    missing = sorted({_family(n) for n in exported()} - {_family(n) for n in shown})
    assert not missing, f"exported but on no dashboard panel: {missing}"


def test_dashboard_has_the_operator_panels() -> None:
    exprs = [expr for _, expr, _ in dashboard_queries()]
    assert any(re.search(r"by \(tier\)", e) and "kvservice_blocks" in e for e in exprs), "usage per tier"
    assert any("kvservice_prefix_cache_hit" in e and "/" in e for e in exprs), "prefix hit rate"
    assert any("kvservice_swap_bytes_total" in e for e in exprs), "swap bytes"
    assert any(
        "histogram_quantile" in e and "kvservice_rpc_latency_seconds_bucket" in e for e in exprs
    ), "RPC latency"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_operations_guide_documents_exactly_the_exported_metrics() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    table = {m for m in re.findall(r"^\| `(kvservice_[a-z0-9_]+)` \|", text, re.MULTILINE)}
    assert {_family(n) for n in table} == {_family(n) for n in exported()}
    for name in re.findall(r"\bkvservice_[a-z0-9_]+", text):
        assert name in exported() or name in table, f"docs/operations.md names {name}, not exported"


# --------------------------------------------------------------------- the guide


def operations_guide() -> str:
    return (ROOT / "docs" / "operations.md").read_text()


def test_operations_guide_documents_every_serve_flag_with_its_default() -> None:
    documented: dict[str, str] = {}
    for flags, default in re.findall(r"^\| (`--[^|]+)\|([^|]*)\|", operations_guide(), re.MULTILINE):
        for flag in re.findall(r"`(--[a-z0-9-]+)`", flags):
            documented[flag] = default.strip()
    actions = {
        option: action
        for action in serve_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert sorted(documented) == sorted(actions)
    for flag, default in documented.items():
        literal = re.fullmatch(r"`([^`]*)`", default)
        if literal:  # a literal default must be the parser's; prose explains a computed one
            assert literal.group(1) == str(actions[flag].default), flag


def test_serve_commands_in_the_guide_parse() -> None:
    lines = [
        line.split("#")[0]
        for line in operations_guide().splitlines()
        if line.startswith("kvservice serve ")
    ]
    assert lines
    for line in lines:
        parse_serve(shlex.split(line)[2:])
