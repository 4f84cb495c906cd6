"""The YAML under deploy/ and examples/ parses (PyYAML, an independent
parser), and the Kubernetes examples say what docs/ and the daemon rely
on: the Workload API socket from the SPIFFE CSI driver, the config from a
ConfigMap, probes on the admin endpoint, a grace period longer than the
drain, and a locked-down container. `tests/deploy.rs` runs `spiffe-tunnel
check` on the configs embedded in the ConfigMaps; no cluster is needed here
(none can run on the CI machines)."""

import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
SOCKET_DIR = "/spiffe-workload-api"
CONFIG_DIR = "/etc/spiffe-tunnel"


def yaml_files():
    return sorted(
        p
        for d in ("deploy", "examples")
        for p in (REPO / d).rglob("*")
        if p.suffix in (".yaml", ".yml") and "certs" not in p.parts
    )


def documents(path):
    with open(path) as f:
        return list(yaml.safe_load_all(f))


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    """(workload, pod spec) for every DaemonSet and Deployment."""
    return [
        (d, d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("DaemonSet", "Deployment")
    ]


def tunnel_container(spec):
    """The spiffe-tunnel container, whether a plain or a native sidecar."""
    (found,) = [
        c
        for c in spec.get("containers", []) + spec.get("initContainers", [])
        if c["name"] == "spiffe-tunnel"
    ]
    return found


def embedded_config(docs, spec):
    """The tunnel.toml of the ConfigMap mounted at /etc/spiffe-tunnel."""
    container = tunnel_container(spec)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    name = volume["configMap"]["name"]
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == name]
    return tomllib.loads(config_map["data"]["tunnel.toml"])


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if duration.endswith(suffix) and duration[: -len(suffix)].isdigit():
            return int(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(f"unexpected duration {duration!r}")


def test_there_are_yaml_files():
    names = {p.relative_to(REPO).as_posix() for p in yaml_files()}
    assert {"deploy/kubernetes/daemonset.yaml", "deploy/kubernetes/sidecar.yaml"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_parses(path):
    docs = documents(path)
    assert docs, f"{path}: no documents"
    assert all(d is not None for d in docs), f"{path}: an empty document (stray ---)"
    if KUBERNETES in path.parents:
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
            assert d["metadata"].get("name"), d


@pytest.mark.parametrize("name", ["daemonset.yaml", "sidecar.yaml"])
def test_pod_gets_socket_from_csi_and_config_from_configmap(name):
    docs = documents(KUBERNETES / name)
    workloads = pod_specs(docs)
    assert workloads, f"{name}: no DaemonSet or Deployment"
    for workload, spec in workloads:
        container = tunnel_container(spec)
        assert container["args"] == ["run", "-c", f"{CONFIG_DIR}/tunnel.toml"]

        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env["SPIFFE_ENDPOINT_SOCKET"] == f"unix://{SOCKET_DIR}/spire-agent.sock"
        (socket_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SOCKET_DIR]
        assert socket_mount.get("readOnly") is True
        (socket_volume,) = [v for v in spec["volumes"] if v["name"] == socket_mount["name"]]
        assert socket_volume["csi"]["driver"] == "csi.spiffe.io"

        config = embedded_config(docs, spec)
        assert config["identity"]["source"] == "workload_api"
        assert "socket" not in config["identity"], "the socket must come from SPIFFE_ENDPOINT_SOCKET"

        # The namespace a workload lives in is created by the same file, or
        # the file cannot be applied on its own.
        namespaces = {d["metadata"]["name"] for d in by_kind(docs, "Namespace")}
        assert workload["metadata"]["namespace"] in namespaces


@pytest.mark.parametrize("name", ["daemonset.yaml", "sidecar.yaml"])
def test_probes_scrape_and_shutdown_match_the_config(name):
    docs = documents(KUBERNETES / name)
    for workload, spec in pod_specs(docs):
        container = tunnel_container(spec)
        config = embedded_config(docs, spec)
        host, port = config["admin"]["listen"].rsplit(":", 1)
        assert host == "0.0.0.0", "the kubelet probes the pod IP, so admin must listen there"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["admin"] == int(port)

        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in ("admin", int(port))

        annotations = spec_annotations(workload)
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"

        drains = [config.get("defaults", {}).get("drain_timeout", "30s")] + [
            t["drain_timeout"]
            for kind in ("inbound", "outbound")
            for t in config.get(kind, [])
            if "drain_timeout" in t
        ]
        assert spec["terminationGracePeriodSeconds"] > max(seconds(d) for d in drains)

        inbound_ports = {int(t["listen"].rsplit(":", 1)[1]) for t in config.get("inbound", [])}
        assert inbound_ports <= set(ports.values()), "every inbound listen port is declared"


def spec_annotations(workload):
    return workload["spec"]["template"]["metadata"].get("annotations", {})


@pytest.mark.parametrize("name", ["daemonset.yaml", "sidecar.yaml"])
def test_containers_are_locked_down(name):
    docs = documents(KUBERNETES / name)
    for _, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, container["name"]
            assert sc["allowPrivilegeEscalation"] is False, container["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "add" not in sc["capabilities"], container["name"]
            assert container["resources"]["requests"], container["name"]
            assert container["resources"]["limits"]["memory"], container["name"]


def test_daemonset_is_node_local():
    docs = documents(KUBERNETES / "daemonset.yaml")
    ((_, spec),) = pod_specs(docs)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    container = tunnel_container(spec)
    for port in container["ports"]:
        assert port["hostPort"] == port["containerPort"]


def test_sidecar_fronts_the_app_and_carries_its_calls():
    docs = documents(KUBERNETES / "sidecar.yaml")
    ((deployment, spec),) = pod_specs(docs)
    config = embedded_config(docs, spec)
    sidecar = tunnel_container(spec)
    assert sidecar in spec.get("initContainers", []) and sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar, "the app must not start before the tunnel is ready"

    (app,) = spec["containers"]
    (inbound,) = config["inbound"]
    (outbound,) = config["outbound"]
    # The app listens on loopback only, where the inbound tunnel delivers.
    assert any(inbound["target"] in arg for arg in app["args"])
    assert inbound["target"].startswith("127.0.0.1:")
    # The app's calls go to the outbound tunnel's loopback listener.
    env = {e["name"]: e["value"] for e in app.get("env", [])}
    assert env["BACKEND_URL"] == f"http://{outbound['listen']}"
    assert outbound["listen"].startswith("127.0.0.1:")

    # The Service sends traffic to the tunnel, never to the app directly.
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["tunnel"]


def test_dockerfile_command_matches_the_pods():
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/spiffe-tunnel"]' in text
    assert f'CMD ["run", "-c", "{CONFIG_DIR}/tunnel.toml"]' in text
