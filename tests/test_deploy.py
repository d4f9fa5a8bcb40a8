"""deploy/kubernetes: the kustomize base and its overlays render, every manifest validates against the
Kubernetes schemas, and the manifests say what docs/deployment.md promises of them.

Rendering. CI has pip, npm and apt, and none of them offers kustomize (or helm) as a package: PyPI's
``kustomize`` is an unrelated generator, ``pykustomize`` needs Python 3.14, npm has no kustomize, and
Debian ships neither. So the overlays are rendered here by :func:`build`, a small implementation of
the part of kustomize the overlays use: ``resources`` (files and directories), ``patches`` with a
strategic-merge patch file, and ``images``. Lists merge by the Kubernetes merge key (containers and
volumes by name, ...; patch-only items first, as kustomize puts them), everything else is replaced
and ``null`` deletes. A kustomization that uses any other field fails the test, so the renderer
cannot silently fall behind the files. Where ``kubectl`` (with its built-in kustomize) or
``kustomize`` is installed, the test also renders each overlay with it and requires the same objects.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from host import settings
from host.auth import ApiKeyError, ApiKeys

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
SECRET_EXAMPLE = K8S / "api-keys.example.yaml"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
WORKER_ENV = {var for var, _ in settings.ENV.values()}
ROUTER_ENV = {var for var, _ in settings.ROUTER_ENV.values()}

# --- the renderer ----------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name", "ports": "containerPort"}
"""Strategic-merge keys of the Kubernetes API (x-kubernetes-patch-merge-key) for the lists the
overlays patch; ``ports`` is a container's (a Service's merge by ``port``, and is not patched)."""


def key_of(doc: dict) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def build(directory: Path) -> list[dict]:
    """The objects ``kustomize build directory`` makes, for the fields listed in KUSTOMIZATION_FIELDS."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields {sorted(unknown)} are not rendered by this test's build()"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += build(path) if path.is_dir() else load_docs(path)
    keys = [key_of(d) for d in docs]
    assert len(set(keys)) == len(keys), f"{directory}: duplicate objects {keys}"
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only strategic-merge patch files are rendered: {entry}"
        for patch in load_docs(directory / entry["path"]):
            (index,) = [i for i, d in enumerate(docs) if key_of(d) == key_of(patch)] or [None]
            assert index is not None, f"{directory / entry['path']}: patches no object {key_of(patch)}"
            docs[index] = merge(docs[index], patch)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in containers_of(doc):
                set_image(container, image)
    return docs


def merge(original: Any, patch: Any, field: str = "") -> Any:
    """A strategic-merge patch applied to ``original`` (neither is modified)."""
    if isinstance(patch, dict) and isinstance(original, dict):
        assert not any(k.startswith("$") for k in patch), f"patch directives are not rendered: {sorted(patch)}"
        out = copy.deepcopy(original)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            elif name in out:
                out[name] = merge(out[name], value, name)
            else:
                out[name] = strip_nulls(value)
        return out
    if isinstance(patch, list) and isinstance(original, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_key = {item[key]: item for item in patch}
        assert len(by_key) == len(patch), f"{field}: duplicate {key} in a patch"
        known = {item[key] for item in original}
        added = [strip_nulls(item) for item in patch if item[key] not in known]
        return added + [merge(item, by_key[item[key]], field) if item[key] in by_key else copy.deepcopy(item)
                        for item in original]
    return strip_nulls(patch)


def strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return copy.deepcopy(value)


def containers_of(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def set_image(container: dict, image: dict) -> None:
    name, tag = re.fullmatch(r"([^:@]+)(?::([^@]+))?(?:@.+)?", container["image"]).groups()
    if name != image["name"]:
        return
    name = image.get("newName", name)
    if "digest" in image:
        container["image"] = f"{name}@{image['digest']}"
    else:
        tag = image.get("newTag", tag)
        container["image"] = f"{name}:{tag}" if tag else name


def kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# --- helpers for reading the rendered objects --------------------------------------------------


def rendered(overlay: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in build(OVERLAYS[overlay])}


def container(doc: dict, name: str) -> dict:
    (found,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", text).groups()
    return float(number) * units.get(unit, 1)


# --- the renderer itself ---------------------------------------------------------------------------


def test_renderer_merges_like_kustomize():
    base = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "image": "i:1"},
                                    {"name": "b", "image": "j"}],
                     "volumes": [{"name": "m", "emptyDir": {}}], "tolerations": [{"key": "t"}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]}],
                      "volumes": [{"name": "m", "emptyDir": None, "persistentVolumeClaim": {"claimName": "c"}}],
                      "tolerations": [{"key": "u"}]}}
    out = merge(base, patch)
    assert out["spec"]["containers"][0]["env"] == [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]
    assert out["spec"]["containers"][1] == {"name": "b", "image": "j"}
    assert out["spec"]["volumes"] == [{"name": "m", "persistentVolumeClaim": {"claimName": "c"}}]
    assert out["spec"]["tolerations"] == [{"key": "u"}], "lists without a merge key are replaced"
    assert base["spec"]["volumes"][0] == {"name": "m", "emptyDir": {}}, "the original is not modified"
    c = {"image": "realtime-engine-host:cpu"}
    set_image(c, {"name": "realtime-engine-host", "newName": "registry.example/eh", "newTag": "1.2"})
    assert c["image"] == "registry.example/eh:1.2"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_the_same_as_kustomize(overlay):
    cli = kustomize_cli()
    if cli is None:
        pytest.skip("neither kustomize nor kubectl is installed: the overlays are rendered by this test's build() alone")
    done = subprocess.run([*cli, str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = {key_of(d): d for d in yaml.safe_load_all(done.stdout) if d}
    ours = {key_of(d): d for d in build(OVERLAYS[overlay])}
    assert sorted(ours) == sorted(theirs)
    for key, doc in ours.items():
        assert doc == theirs[key], f"{overlay}: {key} differs from {' '.join(cli)}"


# --- schemas ---------------------------------------------------------------------------------------


def all_manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object shipped: each YAML file under deploy/kubernetes as it is (patches
    excepted: they are partial objects, checked through the overlays they belong to), and each
    overlay rendered."""
    patch_files = {(d / e["path"]).resolve() for d in [BASE, *OVERLAYS.values()]
                   for e in yaml.safe_load((d / "kustomization.yaml").read_text()).get("patches", [])}
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in patch_files or path == ADAPTER_RULES:
            continue
        out += [(str(path.relative_to(ROOT)), d) for d in load_docs(path)]
    for name, directory in OVERLAYS.items():
        out += [(f"overlay {name}", d) for d in build(directory)]
    return out


SCHEMA_VERSIONS = ["1.25.0", "latest"]
"""The oldest Kubernetes the manifests target (autoscaling/v2 and policy/v1 are GA well before it)
and the newest kubernetes-validate knows."""


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (a test extra)")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    manifests = all_manifests()
    assert len(manifests) >= 20
    for where, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}") from None
    # The check discriminates: an unknown field is refused in strict mode.
    bad = copy.deepcopy(next(d for _, d in manifests if d["kind"] == "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


# --- what the manifests promise ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_has_redis_router_workers_and_their_services(overlay):
    objects = rendered(overlay)
    for kind, name in [("Namespace", "engine-host"), ("Deployment", "redis"), ("Service", "redis"),
                       ("Deployment", "router"), ("Service", "engine-host"), ("PodDisruptionBudget", "router"),
                       ("Deployment", "worker"), ("Service", "worker"), ("PodDisruptionBudget", "worker"),
                       ("HorizontalPodAutoscaler", "worker")]:
        assert (kind, name) in objects, f"{overlay}: no {kind} {name}"
    for (kind, name), doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "engine-host", (kind, name)
    for name in ("redis", "router", "worker"):
        deployment = objects["Deployment", name]
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    assert objects["Service", "engine-host"]["spec"]["selector"] == {"app.kubernetes.io/name": "router"}
    assert objects["PodDisruptionBudget", "worker"]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "worker"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_workers_register_by_pod_name_and_ip_and_probe_health_and_readiness(overlay):
    worker = rendered(overlay)["Deployment", "worker"]
    c = container(worker, "worker")
    variables = env(c)
    assert variables["WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    ip_var = next(name for name, v in variables.items() if v == {"fieldRef": {"fieldPath": "status.podIP"}})
    port = variables["WORKER_PORT"]
    assert variables["WORKER_ENDPOINT"] == f"ws://$({ip_var}):{port}"
    names = [e["name"] for e in c["env"]]
    assert names.index(ip_var) < names.index("WORKER_ENDPOINT"), "$(VAR) expands only variables defined before it"
    assert set(variables) - {ip_var} <= WORKER_ENV, f"not worker settings: {sorted(set(variables) - {ip_var} - WORKER_ENV)}"
    assert variables["REDIS_URL"] == "redis://redis:6379/0"
    assert int(variables["MAX_SESSIONS"]) > 0
    assert c["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(port)
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health", "liveness waits for the models to load"
    assert c["readinessProbe"]["periodSeconds"] <= 5


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_termination_grace_covers_prestop_and_drain(overlay):
    worker = rendered(overlay)["Deployment", "worker"]
    c = container(worker, "worker")
    drain = float(env(c)["DRAIN_TIMEOUT_S"])
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period counts from the start of preStop; after the drain the last finals still decode.
    assert grace >= pre_stop + drain + 15, (grace, pre_stop, drain)
    router = rendered(overlay)["Deployment", "router"]
    assert router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30, "the router waits 30 s for routed sessions"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_api_keys_models_and_metrics(overlay, tmp_path):
    objects = rendered(overlay)
    (secret,) = load_docs(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "engine-host"
    for name in ("router", "worker"):
        pod = objects["Deployment", name]["spec"]["template"]["spec"]
        c = container(objects["Deployment", name], name)
        keys_file = env(c)["ENGINE_HOST_API_KEYS_FILE"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        (volume,) = [n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
        assert keys_file == mounts[volume]["mountPath"] + "/" + next(iter(secret["stringData"])), name
        assert mounts[volume]["readOnly"] is True
        assert not volumes[volume]["secret"].get("optional"), "no keys, no pods: never open by accident"
    # As shipped, the Secret holds no key, and a key file without one stops the process at start-up.
    keys = tmp_path / "keys"
    keys.write_text(next(iter(secret["stringData"].values())))
    with pytest.raises(ApiKeyError, match="holds no key"):
        ApiKeys.load("", keys)
    worker = objects["Deployment", "worker"]
    c = container(worker, "worker")
    models = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env(c)["WORKER_PORT"] and annotations["prometheus.io/path"] == "/metrics"
    router = container(objects["Deployment", "router"], "router")
    assert set(env(router)) <= ROUTER_ENV, f"not router settings: {sorted(set(env(router)) - ROUTER_ENV)}"
    assert router["args"] == ["route"]


def test_hpa_scales_on_active_sessions_through_the_adapter_rule():
    # The worker's gauge of sessions holding a slot, as host/metrics.py names it.
    assert '_gauge("engine_host_active_sessions"' in (ROOT / "host" / "metrics.py").read_text()
    adapter = yaml.safe_load(ADAPTER_RULES.read_text())
    rules = adapter["rules"]["custom"]
    (rule,) = [r for r in rules if "engine_host_active_sessions" in r["seriesQuery"]]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    exposed = rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], "engine_host_active_sessions")
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        hpa = objects["HorizontalPodAutoscaler", "worker"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == exposed
        target = quantity(metric["pods"]["target"]["averageValue"])
        max_sessions = int(env(container(objects["Deployment", "worker"], "worker"))["MAX_SESSIONS"])
        assert 0 < target < max_sessions, f"{overlay}: scale up before the workers are full ({target} of {max_sessions})"
        down = hpa["spec"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 600, "scale-down must not churn live sessions"
        assert hpa["spec"]["minReplicas"] >= 2 and objects["PodDisruptionBudget", "worker"]["spec"]["maxUnavailable"] == 1


def test_cpu_and_gpu_overlays_size_and_place_the_workers():
    cpu = container(rendered("cpu")["Deployment", "worker"], "worker")
    gpu_objects = rendered("gpu")
    gpu_pod = gpu_objects["Deployment", "worker"]["spec"]["template"]["spec"]
    gpu = container(gpu_objects["Deployment", "worker"], "worker")
    # CPU: the bench's 2-core VM held 32 fast streams with partials and 16 accurate ones (finals only).
    assert quantity(cpu["resources"]["requests"]["cpu"]) >= 2 and int(env(cpu)["MAX_SESSIONS"]) <= 16
    assert quantity(cpu["resources"]["requests"]["memory"]) >= 707 * 2**20, "RSS at 32 streams in the bench"
    assert "cpu" not in cpu["resources"].get("limits", {}), "CPU throttling shows as late finals"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert cpu["image"].endswith(":cpu") and gpu["image"].endswith(":cuda")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert env(gpu)["ENGINES_DIR"] == "/app/examples" and (ROOT / "examples" / "whisper-gpu.yaml").exists()
    models = {v["name"]: v for v in gpu_pod["volumes"]}["models"]
    claim = models["persistentVolumeClaim"]["claimName"]
    assert "emptyDir" not in models and ("PersistentVolumeClaim", claim) in gpu_objects
    assert "ReadOnlyMany" in gpu_objects["PersistentVolumeClaim", claim]["spec"]["accessModes"]
    # The router and Redis stay on the CPU image.
    assert container(gpu_objects["Deployment", "router"], "router")["image"].endswith(":cpu")
