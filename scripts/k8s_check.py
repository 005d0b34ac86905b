"""Schema validation (strict Kubernetes OpenAPI schemas; a structural schema for ServiceMonitor)
and cross-object checks of rendered kustomize output. argv: STATS_FILE VERSIONS NAME=FILE...

Run by scripts/validate-k8s.sh with the Python of its tool folder (kubernetes-validate, jsonschema,
PyYAML; tomli before Python 3.11). MODSERVE_KNOWN_ENV: the server's MODSERVE_* variable names,
space-separated (empty: config keys and variable names are not checked). Prints one line per
render (and its problems), writes the counters to STATS_FILE; exit status 1 when a check failed."""
import json
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kvu
from packaging.version import Version
from referencing import Registry, Resource

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

stats_file, versions = sys.argv[1], sys.argv[2].split()
KNOWN_ENV = set(os.environ.get("MODSERVE_KNOWN_ENV", "").split())
renders = [a.split("=", 1) for a in sys.argv[3:]]
errors = []  # one line each


def ident(o):
    return f"{o.get('kind', '?')}/{(o.get('metadata') or {}).get('name', '?')}"


# ------------------------------------------------------------------ Kubernetes schemas
schema_versions = kvu.all_versions()
_defs, _validators = {}, {}


def k8s_validator(kind, api_version, version):
    """Strict validator for kind/apiVersion at the newest bundled schema <= version; None if the
    kind is unknown to Kubernetes."""
    key = (kind, api_version, version)
    if key not in _validators:
        older = [v for v in schema_versions if Version(kvu.major_minor(v)) <= Version(version)]
        if not older:
            raise SystemExit(f"kubernetes-validate has no schema for Kubernetes {version} or older")
        schema_dir = f"v{older[-1]}-local-strict"
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        try:
            schema = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{api}.json", version)
        except FileNotFoundError:
            _validators[key] = None
            return None
        if schema_dir not in _defs:
            _defs[schema_dir] = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
        registry = Resource.from_contents(_defs[schema_dir]) @ (Resource.from_contents(schema) @ Registry())
        _validators[key] = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return _validators[key]


# ------------------------------------------------------------------ custom resources
# ServiceMonitor, monitoring.coreos.com/v1: field names and types of the CRD (prometheus-operator
# 0.84 `spec` and `spec.endpoints[]`), unknown fields rejected at those two levels; nested auth,
# TLS and relabeling objects are only type-checked.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
OBJ, STR, BOOL, INT = {"type": "object"}, {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
ARR_OBJ = {"type": "array", "items": OBJ}
ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
    "properties": {
        "authorization": OBJ, "basicAuth": OBJ, "bearerTokenFile": STR, "bearerTokenSecret": OBJ,
        "enableHttp2": BOOL, "filterRunning": BOOL, "followRedirects": BOOL, "honorLabels": BOOL,
        "honorTimestamps": BOOL, "interval": {"type": "string", "pattern": DURATION},
        "metricRelabelings": ARR_OBJ, "noProxy": STR, "oauth2": OBJ,
        "params": {"type": "object", "additionalProperties": {"type": "array", "items": STR}},
        "path": {"type": "string", "pattern": "^/"}, "port": {"type": "string", "minLength": 1},
        "proxyConnectHeader": OBJ, "proxyFromEnvironment": BOOL,
        "proxyUrl": {"type": "string", "pattern": "^(http|https|socks5)://.+$"}, "relabelings": ARR_OBJ,
        "scheme": {"enum": ["http", "https"]}, "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "targetPort": {"type": ["integer", "string"]}, "tlsConfig": OBJ, "trackTimestampsStaleness": BOOL,
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": STR, "namespace": STR,
                "labels": {"type": "object", "additionalProperties": STR},
                "annotations": {"type": "object", "additionalProperties": STR},
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "attachMetadata": {"type": "object", "properties": {"node": BOOL}, "additionalProperties": False},
                "bodySizeLimit": STR, "convertClassicHistogramsToNHCB": BOOL,
                "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
                "fallbackScrapeProtocol": STR, "jobLabel": STR, "keepDroppedTargets": INT,
                "labelLimit": INT, "labelNameLengthLimit": INT, "labelValueLengthLimit": INT,
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": BOOL, "matchNames": {"type": "array", "items": STR}},
                },
                "nativeHistogramBucketLimit": INT, "nativeHistogramMinBucketFactor": {"type": ["integer", "string"]},
                "podTargetLabels": {"type": "array", "items": STR}, "sampleLimit": INT,
                "scrapeClass": {"type": "string", "minLength": 1}, "scrapeClassicHistograms": BOOL,
                "scrapeProtocols": {"type": "array", "items": STR},
                "selector": LABEL_SELECTOR, "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
                "targetLabels": {"type": "array", "items": STR}, "targetLimit": INT,
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}
CRD_VALIDATORS = {k: jsonschema.Draft202012Validator(v) for k, v in CRD_SCHEMAS.items()}


def path_str(p):
    return ".".join(str(x) for x in p) or "(root)"


_schema_cache = {}


def schema_errors(o):
    """Returns (problems, how) for one object; cached over identical objects."""
    key = json.dumps(o, sort_keys=True)
    if key in _schema_cache:
        return _schema_cache[key]
    kind, api = o.get("kind"), o.get("apiVersion")
    problems = []
    if not isinstance(kind, str) or not isinstance(api, str):
        result = (["missing apiVersion or kind"], "none")
    elif (api, kind) in CRD_VALIDATORS:
        for e in sorted(CRD_VALIDATORS[(api, kind)].iter_errors(o), key=lambda e: list(map(str, e.path))):
            problems.append(f"{path_str(e.path)}: {e.message} (CRD structural schema)")
        result = (problems, "crd")
    else:
        seen, unknown = {}, []
        for v in versions:
            val = k8s_validator(kind, api, v)
            if val is None:
                unknown.append(v)
                continue
            for e in val.iter_errors(o):
                seen.setdefault((path_str(e.path), e.message), []).append(v)
        if unknown:
            problems.append(f"no schema for {api} {kind} in Kubernetes {', '.join(unknown)} (a custom resource "
                            "needs a structural schema in CRD_SCHEMAS of scripts/validate-k8s.sh)")
        for (p, m), vs in sorted(seen.items()):
            problems.append(f"{p}: {m} (Kubernetes {', '.join(vs)})")
        result = (problems, "k8s")
    _schema_cache[key] = result
    return result


# ------------------------------------------------------------------ cross-object checks
QUANTITY = re.compile(r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def selects(selector, labels):
    if not selector:
        return False
    labels = labels or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def check_labels(where, labels, problems):
    for k, v in (labels or {}).items():
        prefix, _, name = k.rpartition("/")
        if (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix))) or len(name) > 63 or not LABEL_NAME.match(name):
            problems.append(f"{where}: invalid label key {k!r}")
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            problems.append(f"{where}: invalid label value {k}={v!r}")


def env_map(c):
    return {e["name"]: e.get("value", e.get("valueFrom") and "<valueFrom>") for e in c.get("env") or []}


def listen_port(addr):
    m = re.match(r"^(\[[0-9a-fA-F:]+\]|[0-9.]+|[A-Za-z0-9.-]+):([0-9]+)$", addr or "")
    return (m.group(1), int(m.group(2))) if m else (None, None)


def check_render(name, objs):
    p = []  # problems
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o.get("kind"), []).append(o)
    overlay, _, comps = name.partition("+")
    comps = set(comps.split("+")) if comps else set()

    names_seen = set()
    for o in objs:
        md = o.get("metadata") or {}
        key = (o.get("apiVersion"), o.get("kind"), md.get("name"))
        if key in names_seen:
            p.append(f"{ident(o)}: defined twice")
        names_seen.add(key)
        n = md.get("name") or ""
        pattern, limit = (DNS_LABEL, 63) if o.get("kind") == "Service" else (DNS_SUBDOMAIN, 253)
        if not pattern.match(n) or len(n) > limit:
            p.append(f"{ident(o)}: invalid name {n!r}")
        if md.get("namespace"):
            p.append(f"{ident(o)}: sets metadata.namespace; the manifests must stay namespace-agnostic")
        check_labels(ident(o), md.get("labels"), p)

    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "PersistentVolumeClaim", "ConfigMap", "ServiceAccount"):
        if kind not in by_kind:
            p.append(f"no {kind} rendered")
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        p.append(f"expected exactly one Deployment, got {len(deployments)}")
        return p
    d = deployments[0]
    spec = d.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
    pod = tmpl.get("spec") or {}
    check_labels(f"{ident(d)} pod template", pod_labels, p)
    if not selects(spec.get("selector"), pod_labels):
        p.append(f"{ident(d)}: spec.selector does not match the pod template labels")
    containers = pod.get("containers") or []
    main = next((c for c in containers if c.get("name") == "modserve"), None)
    if main is None:
        p.append(f"{ident(d)}: no container named modserve")
        return p
    where = f"{ident(d)} container modserve"
    env = env_map(main)
    for var in env:
        if KNOWN_ENV and var.startswith("MODSERVE_") and var not in KNOWN_ENV:
            p.append(f"{where}: env {var} is not read by the server (known: {' '.join(sorted(KNOWN_ENV))})")
    ports = {pt.get("name"): pt.get("containerPort") for pt in main.get("ports") or []}
    port_numbers = set(ports.values())

    # image
    image = main.get("image") or ""
    if "/" not in image or not (re.search(r":[^/]+$", image) or "@sha256:" in image) or image.endswith(":latest"):
        p.append(f"{where}: image {image!r} needs a registry path and a pinned tag (overlay `images:`)")

    # security
    psc, csc = pod.get("securityContext") or {}, main.get("securityContext") or {}
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        p.append(f"{where}: runAsNonRoot must be true")
    if (csc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
        p.append(f"{where}: runAsUser must be a non-zero uid")
    if csc.get("allowPrivilegeEscalation") is not False:
        p.append(f"{where}: allowPrivilegeEscalation must be false")
    if csc.get("readOnlyRootFilesystem") is not True:
        p.append(f"{where}: readOnlyRootFilesystem must be true")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        p.append(f"{where}: capabilities.drop must contain ALL")
    if (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        p.append(f"{where}: seccompProfile must be RuntimeDefault")
    if csc.get("privileged"):
        p.append(f"{where}: privileged")

    # volumes and mounts
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = {m.get("mountPath"): m for m in main.get("volumeMounts") or []}
    for m in mounts.values():
        if m.get("name") not in volumes:
            p.append(f"{where}: volumeMount {m.get('mountPath')} uses undefined volume {m.get('name')!r}")
    tmp = mounts.get("/tmp")
    if not tmp or "emptyDir" not in volumes.get(tmp.get("name"), {}):
        p.append(f"{where}: /tmp must be a writable emptyDir (the root filesystem is read-only)")
    names_of = lambda kind: {(o.get("metadata") or {}).get("name") for o in by_kind.get(kind, [])}
    for v in volumes.values():
        if "configMap" in v and v["configMap"].get("name") not in names_of("ConfigMap"):
            p.append(f"{ident(d)}: volume {v['name']} references missing ConfigMap {v['configMap'].get('name')!r}")
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"].get("claimName") not in names_of("PersistentVolumeClaim"):
            p.append(f"{ident(d)}: volume {v['name']} references missing PVC {v['persistentVolumeClaim'].get('claimName')!r}")
    sa = pod.get("serviceAccountName")
    if sa and sa not in names_of("ServiceAccount"):
        p.append(f"{ident(d)}: serviceAccountName {sa!r} is not rendered")

    # config file: MODSERVE_CONFIG inside a mounted ConfigMap holding a parseable TOML
    cfg = env.get("MODSERVE_CONFIG")
    if not cfg:
        p.append(f"{where}: MODSERVE_CONFIG is not set")
    else:
        mp = next((m for m in mounts.values() if cfg.startswith(m["mountPath"].rstrip("/") + "/")
                   or (m.get("subPath") and cfg == m["mountPath"])), None)
        vol = volumes.get(mp.get("name")) if mp else None
        if not vol or "configMap" not in vol:
            p.append(f"{where}: MODSERVE_CONFIG={cfg} is not inside a mounted ConfigMap")
        else:
            keyname = mp["subPath"] if mp.get("subPath") else cfg[len(mp["mountPath"].rstrip("/")) + 1:]
            cm = next((o for o in by_kind.get("ConfigMap", []) if o["metadata"]["name"] == vol["configMap"].get("name")), None)
            items = {i["path"]: i["key"] for i in vol["configMap"].get("items") or []}
            keyname = items.get(keyname, keyname) if items else keyname
            if cm is not None:
                data = (cm.get("data") or {}).get(keyname)
                if data is None:
                    p.append(f"{ident(cm)}: has no key {keyname!r} (MODSERVE_CONFIG={cfg})")
                else:
                    try:
                        table = tomllib.loads(data)
                    except Exception as e:  # noqa: BLE001
                        p.append(f"{ident(cm)}: {keyname} is not valid TOML: {e}")
                        table = {}
                    for k, v in table.items():
                        var = "MODSERVE_" + k.replace("-", "_").upper()
                        if KNOWN_ENV and (var not in KNOWN_ENV or var == "MODSERVE_CONFIG"):
                            p.append(f"{ident(cm)}: {keyname}: key {k!r} is not a serve flag (the server "
                                     f"refuses unknown keys; known: {sorted(e[9:].lower() for e in KNOWN_ENV - {'MODSERVE_CONFIG'})})")
                        if not isinstance(v, (str, int, float, bool)):
                            p.append(f"{ident(cm)}: {keyname}: key {k!r} must be a string, number or boolean")

    # listen addresses agree with the ports
    for var, port_name in (("MODSERVE_LISTEN", "grpc"), ("MODSERVE_METRICS_LISTEN", "metrics")):
        host, port = listen_port(env.get(var))
        if port is None:
            p.append(f"{where}: {var} must be HOST:PORT, got {env.get(var)!r}")
            continue
        if host not in ("0.0.0.0", "[::]"):
            p.append(f"{where}: {var}={env.get(var)} is not reachable from outside the pod (use 0.0.0.0 or [::])")
        if ports.get(port_name) != port:
            p.append(f"{where}: {var} port {port} != containerPort named {port_name!r} ({ports.get(port_name)})")

    # model: baked into the image at MODSERVE_MODELS_DIR; a volume there hides it unless an
    # init container fills it.
    models_dir = env.get("MODSERVE_MODELS_DIR")
    if not env.get("MODSERVE_MODEL") and not models_dir:
        p.append(f"{where}: neither MODSERVE_MODEL nor MODSERVE_MODELS_DIR is set")
    if models_dir and models_dir in mounts:
        inits = pod.get("initContainers") or []
        if not any("fetch-model" in " ".join((c.get("command") or []) + (c.get("args") or [])) for c in inits):
            p.append(f"{where}: a volume is mounted over the models folder {models_dir} but no init "
                     "container runs `modserve fetch-model` into it (the server would need network)")

    # adapters: a PVC mounted read-only at MODSERVE_ADAPTER_ROOT
    root = env.get("MODSERVE_ADAPTER_ROOT")
    if root:
        m = mounts.get(root)
        vol = volumes.get(m.get("name")) if m else None
        if not vol or "persistentVolumeClaim" not in vol:
            p.append(f"{where}: MODSERVE_ADAPTER_ROOT={root} is not a mounted PVC")
        else:
            if m.get("readOnly") is not True or vol["persistentVolumeClaim"].get("readOnly") is not True:
                p.append(f"{where}: the adapter PVC must be mounted read-only (mount and volume readOnly: true)")
            pvc = next((o for o in by_kind.get("PersistentVolumeClaim", [])
                        if o["metadata"]["name"] == vol["persistentVolumeClaim"].get("claimName")), None)
            hpa_max = max([(h.get("spec") or {}).get("maxReplicas", 1) for h in by_kind.get("HorizontalPodAutoscaler", [])] or [1])
            modes = set(((pvc or {}).get("spec") or {}).get("accessModes") or [])
            if pvc and hpa_max > 1 and not modes & {"ReadOnlyMany", "ReadWriteMany"}:
                p.append(f"{ident(pvc)}: accessModes {sorted(modes)} cannot be mounted by replicas on several "
                         f"nodes, but the HPA allows {hpa_max} replicas (use ReadOnlyMany)")
    else:
        p.append(f"{where}: MODSERVE_ADAPTER_ROOT is not set")

    # probes: native gRPC on the health service
    probes = {k: main.get(k) or {} for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for k, pr in probes.items():
        g = pr.get("grpc")
        if not g:
            p.append(f"{where}: {k} must be a native grpc probe")
            continue
        if g.get("port") not in port_numbers or g.get("port") != ports.get("grpc"):
            p.append(f"{where}: {k} grpc port {g.get('port')} is not the grpc containerPort {ports.get('grpc')}")
    if (probes["readinessProbe"].get("grpc") or {}).get("service") != "modserve.v1.Inference":
        p.append(f"{where}: readinessProbe must check service modserve.v1.Inference")
    if (probes["livenessProbe"].get("grpc") or {}).get("service", "") != "":
        p.append(f"{where}: livenessProbe must check the overall service \"\"")

    # graceful shutdown: grace period > preStop sleep + drain timeout
    grace = pod.get("terminationGracePeriodSeconds", 30)
    try:
        drain = int(env.get("MODSERVE_DRAIN_TIMEOUT") or 30)
    except ValueError:
        drain = None
        p.append(f"{where}: MODSERVE_DRAIN_TIMEOUT is not an integer")
    pre = ((main.get("lifecycle") or {}).get("preStop") or {})
    cmd = (pre.get("exec") or {}).get("command") or []
    pre_s = int(cmd[1]) if len(cmd) == 2 and cmd[0].endswith("sleep") and cmd[1].isdigit() else 0
    pre_s = max(pre_s, (pre.get("sleep") or {}).get("seconds", 0))
    if drain is not None and not grace > pre_s + drain:
        p.append(f"{ident(d)}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_s}s + drain {drain}s")

    # resources
    res = main.get("resources") or {}
    for section in ("requests", "limits"):
        for r, q in (res.get(section) or {}).items():
            if not QUANTITY.match(str(q)):
                p.append(f"{where}: resources.{section}.{r}={q!r} is not a quantity")
    if "cpu" not in (res.get("requests") or {}):
        p.append(f"{where}: resources.requests.cpu is required (the HPA's CPU utilisation is relative to it)")
    if "memory" not in (res.get("limits") or {}):
        p.append(f"{where}: resources.limits.memory is required")
    gpu_req = (res.get("requests") or {}).get("nvidia.com/gpu")
    gpu_lim = (res.get("limits") or {}).get("nvidia.com/gpu")
    device = env.get("MODSERVE_DEVICE") or "cpu"
    if gpu_req is not None and str(gpu_req) != str(gpu_lim):
        p.append(f"{where}: nvidia.com/gpu requests ({gpu_req}) must equal limits ({gpu_lim})")
    if device.startswith("cuda") and not gpu_lim:
        p.append(f"{where}: MODSERVE_DEVICE={device} without an nvidia.com/gpu limit")
    if gpu_lim and not device.startswith("cuda"):
        p.append(f"{where}: a GPU is requested but MODSERVE_DEVICE={device}")
    if "gpu" in overlay:
        if str(gpu_lim) != "1":
            p.append(f"{where}: the gpu overlay must limit nvidia.com/gpu to 1, got {gpu_lim!r}")
        if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
            p.append(f"{ident(d)}: the gpu overlay must tolerate the nvidia.com/gpu taint")
        if "cuda" not in image:
            p.append(f"{where}: the gpu overlay must use the cuda image variant, got {image!r}")
    elif "cpu" in overlay and (gpu_lim or device != "cpu"):
        p.append(f"{where}: the cpu overlay must run on device cpu without GPUs")
    for v in (pod.get("volumes") or []):
        sl = (v.get("emptyDir") or {}).get("sizeLimit")
        if sl is not None and not QUANTITY.match(str(sl)):
            p.append(f"{ident(d)}: volume {v.get('name')} sizeLimit {sl!r} is not a quantity")

    # Services
    for s in by_kind.get("Service", []):
        ss = s.get("spec") or {}
        if not selects(ss.get("selector") and {"matchLabels": ss["selector"]}, pod_labels):
            p.append(f"{ident(s)}: selector {ss.get('selector')} does not select the modserve pods")
        for sp in ss.get("ports") or []:
            tp = sp.get("targetPort", sp.get("port"))
            if (isinstance(tp, str) and tp not in ports) or (isinstance(tp, int) and tp not in port_numbers):
                p.append(f"{ident(s)}: port {sp.get('name')} targetPort {tp!r} is not a container port")
    svc_ports = [sp for s in by_kind.get("Service", []) for sp in (s.get("spec") or {}).get("ports") or []]
    if not any(sp.get("name") == "grpc" and sp.get("appProtocol") == "grpc" and sp.get("port") == 50051 for sp in svc_ports):
        p.append("no Service port grpc/50051 with appProtocol grpc")
    if not any(sp.get("name") == "metrics" and sp.get("port") == 9090 for sp in svc_ports):
        p.append("no Service port metrics/9090")

    # HPA
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        hs = h.get("spec") or {}
        ref = hs.get("scaleTargetRef") or {}
        if ref.get("kind") != "Deployment" or ref.get("name") != d["metadata"]["name"]:
            p.append(f"{ident(h)}: scaleTargetRef {ref} is not {ident(d)}")
        if hs.get("minReplicas", 1) > hs.get("maxReplicas", 0):
            p.append(f"{ident(h)}: minReplicas > maxReplicas")
        if "replicas" in spec:
            p.append(f"{ident(d)}: sets spec.replicas although {ident(h)} manages it (each apply would reset it)")
        if "hpa-queue-depth" in comps and not any(
                ((m.get("pods") or {}).get("metric") or {}).get("name") == "modserve_queue_depth" for m in hs.get("metrics") or []):
            p.append(f"{ident(h)}: component hpa-queue-depth did not add the modserve_queue_depth metric")

    # PDB
    for b in by_kind.get("PodDisruptionBudget", []):
        bs = b.get("spec") or {}
        if not selects(bs.get("selector"), pod_labels):
            p.append(f"{ident(b)}: selector does not select the modserve pods")
        if ("minAvailable" in bs) == ("maxUnavailable" in bs):
            p.append(f"{ident(b)}: set exactly one of minAvailable and maxUnavailable")

    # ServiceMonitor
    sms = by_kind.get("ServiceMonitor", [])
    if "servicemonitor" in comps and not sms:
        p.append("component servicemonitor rendered no ServiceMonitor")
    for sm in sms:
        sp = sm.get("spec") or {}
        chosen = [s for s in by_kind.get("Service", []) if selects(sp.get("selector"), (s.get("metadata") or {}).get("labels"))]
        if not chosen:
            p.append(f"{ident(sm)}: selector selects no Service")
        for ep in sp.get("endpoints") or []:
            for s in chosen:
                if ep.get("port") and ep["port"] not in {x.get("name") for x in (s.get("spec") or {}).get("ports") or []}:
                    p.append(f"{ident(sm)}: endpoint port {ep['port']!r} is not a port of selected {ident(s)}")

            def secs(t):
                m = re.match(DURATION, t or "")
                if not m or not t:
                    return None
                units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
                return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|y|w|d|h|m|s)", t))
            iv, to = secs(ep.get("interval")), secs(ep.get("scrapeTimeout"))
            if iv is not None and to is not None and to > iv:
                p.append(f"{ident(sm)}: scrapeTimeout {ep['scrapeTimeout']} exceeds interval {ep['interval']}")
    return p


# ------------------------------------------------------------------ main
n_objects, distinct, crd_checked, failed_renders = 0, set(), 0, 0
for name, path in renders:
    with open(path) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    problems = []
    for o in objs:
        if not isinstance(o, dict):
            problems.append(f"not a mapping: {o!r:.60}")
            continue
        errs, how = schema_errors(o)
        crd_checked += how == "crd"
        problems += [f"{ident(o)}: {e}" for e in errs]
        distinct.add(json.dumps(o, sort_keys=True))
    problems += check_render(name, [o for o in objs if isinstance(o, dict)])
    n_objects += len(objs)
    kinds = ", ".join(sorted({o.get("kind", "?") for o in objs if isinstance(o, dict)}))
    if problems:
        failed_renders += 1
        print(f"  FAIL {name}: {len(objs)} objects")
        for e in problems:
            print(f"       - {e}")
        errors += problems
    else:
        print(f"  ok   {name}: {len(objs)} objects ({kinds})")

with open(stats_file, "w") as f:
    f.write(f"renders={len(renders)} objects={n_objects} distinct={len(distinct)} crd={crd_checked} "
            f"problems={len(errors)} failed={failed_renders}\n")
sys.exit(1 if errors else 0)
