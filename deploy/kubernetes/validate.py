#!/usr/bin/env python3
"""Validates deploy/kubernetes offline. Run through validate.sh, which installs what this needs.

1. Every YAML document of every file under this directory, against the Kubernetes OpenAPI
   schemas bundled in the kubernetes-validate package (strict: an unknown field is an error), for
   the oldest and the newest Kubernetes versions we claim. Two kinds have no bundled schema and
   are checked structurally instead: Kustomization (kustomize's) and ServiceMonitor (a CRD of the
   Prometheus operator). Any other kind without a schema is an error, never a skip.
2. What a schema cannot see (no kubectl or cluster needed): every workload non-root with a fixed
   UID, a read-only root filesystem, no capabilities, seccomp RuntimeDefault, requests and limits,
   a readiness probe; the proxy's probes on its ops port, its preStop and a termination grace
   above preStop + shutdown.grace_secs; references between objects (ConfigMaps, Secrets, PVCs,
   Service selectors and ports, the PDB, the ServiceMonitor); the Auth server's NetworkPolicies;
   the TOML configs in the ConfigMaps; every file reachable from a kustomization.
3. Where kubectl is installed: `kubectl kustomize` of each kustomization, and the rendered
   objects validated again (a note says so when kubectl is absent; steps 1 and 2 still run).

Exit 0 when everything holds, 1 with every problem listed otherwise.
"""

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
# The oldest Kubernetes these manifests claim to support, and the newest whose schemas the
# package bundles.
MIN_VERSION = "1.29"
VERSIONS = [MIN_VERSION, kubernetes_validate.latest_version()]
# postern-proxy's default shutdown.grace_secs; the Rust test passes the real default.
DEFAULT_GRACE = int(os.environ.get("POSTERN_PROXY_DEFAULT_GRACE_SECS", "30"))
# After the grace period the proxy waits up to 5 s for connections to close (proxy/src/lib.rs).
CLOSE_SECS = 5
# Files no kustomization lists, on purpose.
OPTIONAL = {
    "proxy/servicemonitor.yaml": "needs the Prometheus operator's CRD; commented in kustomization.yaml",
    "secrets.example.yaml": "the Secrets' shape; they are made from real files by hand",
}
# The kustomizations that are entry points: the default and the PostgreSQL variant.
ROOTS = [".", "auth/postgres"]
POSTERN_IMAGE = "postern:"
BINARIES = {"postern-proxy", "postern-agent", "postern-auth", "pctl", "psh"}

problems = []
checks = 0


def note(message, _seen=set()):
    """Prints a line once (the Auth server variants re-check the same proxy)."""
    if message not in _seen:
        _seen.add(message)
        print(message)


def fail(where, message):
    problems.append(f"{where}: {message}")


def check(cond, where, message):
    global checks
    checks += 1
    if not cond:
        fail(where, message)
    return cond


def load_documents():
    docs = []
    files = sorted(p for p in HERE.rglob("*") if p.suffix in (".yaml", ".yml"))
    for path in files:
        rel = path.relative_to(HERE).as_posix()
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            fail(rel, f"not YAML: {e}")
            continue
        for i, doc in enumerate(loaded):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                fail(f"{rel} document {i + 1}", "not a Kubernetes object (kind and apiVersion)")
                continue
            docs.append((rel, i + 1, doc))
    return files, docs


def name_of(doc):
    meta = doc.get("metadata", {})
    return f"{doc['kind']}/{meta.get('namespace', '-')}/{meta.get('name', '?')}"


# ---------------------------------------------------------------------------------------------
# 1. schemas


def validate_schema(where, doc):
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(where, f"{name_of(doc)} is invalid for Kubernetes {version}: {path}: {e.message}")
            return
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(where, f"{e.message}: not a Kubernetes kind this test knows")
            return
    global checks
    checks += 1


def validate_kustomization(where, doc, path):
    allowed = {"apiVersion", "kind", "resources", "images", "labels", "patches", "components"}
    check(doc.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", where, "apiVersion")
    check(set(doc) <= allowed, where, f"unexpected fields {sorted(set(doc) - allowed)}")
    listed = []
    for entry in doc.get("resources", []):
        target = (path.parent / entry).resolve()
        if target.is_dir():
            check((target / "kustomization.yaml").is_file(), where,
                  f"resource {entry} is a directory without kustomization.yaml")
        else:
            check(target.is_file(), where, f"resource {entry} does not exist")
        listed.append(target)
    for image in doc.get("images", []):
        check(set(image) <= {"name", "newName", "newTag", "digest"} and "name" in image,
              where, f"image entry {image}")
    return listed


def validate_servicemonitor(where, doc, services):
    """No bundled schema for this CRD: its structure and its tie to a Service, by hand."""
    spec = doc.get("spec", {})
    meta = doc.get("metadata", {})
    check(doc.get("apiVersion") == "monitoring.coreos.com/v1", where, "ServiceMonitor apiVersion")
    check(set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, where, "ServiceMonitor fields")
    check(bool(meta.get("name")) and bool(meta.get("namespace")), where, "metadata name/namespace")
    spec_keys = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                 "podTargetLabels", "sampleLimit"}
    check(set(spec) <= spec_keys, where, f"unexpected spec fields {sorted(set(spec) - spec_keys)}")
    match = spec.get("selector", {}).get("matchLabels", {})
    check(isinstance(match, dict) and match, where, "spec.selector.matchLabels is empty")
    namespaces = spec.get("namespaceSelector", {}).get("matchNames", [meta.get("namespace")])
    endpoints = spec.get("endpoints", [])
    check(isinstance(endpoints, list) and endpoints, where, "no spec.endpoints")
    selected = [s for s in services
                if s["metadata"].get("namespace") in namespaces
                and match.items() <= s["metadata"].get("labels", {}).items()]
    check(len(selected) == 1, where,
          f"selects {len(selected)} Services (want exactly the ops Service)")
    ep_keys = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
               "relabelings", "metricRelabelings", "params"}
    for ep in endpoints:
        check(set(ep) <= ep_keys, where, f"unexpected endpoint fields {sorted(set(ep) - ep_keys)}")
        check(ep.get("scheme", "http") in ("http", "https"), where, "endpoint scheme")
        for svc in selected:
            names = {p.get("name") for p in svc["spec"].get("ports", [])}
            check(ep.get("port") in names, where,
                  f"endpoint port {ep.get('port')} is not a port of Service {name_of(svc)}")
            check(svc["spec"].get("type", "ClusterIP") == "ClusterIP", where,
                  "scrapes a Service that is not ClusterIP (the ops port must stay private)")


# ---------------------------------------------------------------------------------------------
# 2. what schemas cannot see


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def find(docs, kind, namespace, name):
    for d in docs:
        m = d.get("metadata", {})
        if d["kind"] == kind and m.get("namespace") == namespace and m.get("name") == name:
            return d
    return None


def resolve_port(container, port):
    """A probe's or Service's port (a number or a port name) -> (number, protocol)."""
    for p in container.get("ports", []):
        if port == p.get("name") or port == p.get("containerPort"):
            return p["containerPort"], p.get("protocol", "TCP")
    return (port, None) if isinstance(port, int) else (None, None)


def mounted_toml(doc, objects, container):
    """The TOML file a Postern container reads: `--config PATH`, from a mounted ConfigMap."""
    args = container.get("args", [])
    if "--config" not in args:
        return None, None
    path = args[args.index("--config") + 1]
    spec = pod_spec(doc)
    ns = doc["metadata"]["namespace"]
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = next(v for v in spec.get("volumes", []) if v["name"] == m["name"])
            if "configMap" in vol:
                cm = find(objects, "ConfigMap", ns, vol["configMap"]["name"])
                key = path[len(m["mountPath"].rstrip("/")) + 1:]
                if cm is None or key not in cm.get("data", {}):
                    return path, None
                return path, tomllib.loads(cm["data"][key])
    return path, None


def mount_of(container, spec, path):
    """The volume holding `path` in this container: (mountPath, volume) with the longest match."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                vol = next((v for v in spec.get("volumes", []) if v["name"] == m["name"]), {})
                best = (mp, vol, m)
    return best


def check_workload(where, doc, objects, secrets):
    spec = pod_spec(doc)
    ns = doc["metadata"]["namespace"]
    sc = spec.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    check(isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where,
          "pod securityContext.runAsUser must be a fixed non-zero UID")
    check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where,
          "pod seccompProfile must be RuntimeDefault")
    check(spec.get("automountServiceAccountToken") is False, where,
          "automountServiceAccountToken: false (Postern never calls the Kubernetes API)")
    namespace = find(objects, "Namespace", None, ns)
    check(namespace is not None and namespace["metadata"].get("labels", {})
          .get("pod-security.kubernetes.io/enforce") == "restricted", where,
          f"namespace {ns} must exist here and enforce the restricted Pod Security Standard")
    ready = 0
    for c in containers(spec):
        cw = f"{where} container {c['name']}"
        csc = c.get("securityContext", {})
        check(csc.get("readOnlyRootFilesystem") is True, cw, "readOnlyRootFilesystem must be true")
        check(csc.get("allowPrivilegeEscalation") is False, cw,
              "allowPrivilegeEscalation must be false")
        check("ALL" in csc.get("capabilities", {}).get("drop", []), cw, "capabilities.drop: [ALL]")
        check(not csc.get("capabilities", {}).get("add"), cw, "no capabilities added")
        check(not csc.get("privileged"), cw, "not privileged")
        check(csc.get("runAsUser", 1) != 0, cw, "runAsUser 0")
        res = c.get("resources", {})
        check({"cpu", "memory"} <= set(res.get("requests", {})), cw, "requests for cpu and memory")
        check({"cpu", "memory"} <= set(res.get("limits", {})), cw, "limits for cpu and memory")
        if c in spec.get("containers", []):
            if c.get("ports"):
                check("readinessProbe" in c, cw, "serves ports but has no readinessProbe")
            ready += "readinessProbe" in c
        image = c.get("image", "")
        if image.startswith(POSTERN_IMAGE) and "args" in c:
            check(c["args"][0] in BINARIES, cw, f"runs {c['args'][0]}, not a Postern binary")
            path, conf = mounted_toml(doc, objects, c)
            if path is not None:
                check(conf is not None, cw, f"--config {path} is not a key of a mounted ConfigMap")
    check(ready >= 1, where, "no container has a readinessProbe")

    for v in spec.get("volumes", []):
        vw = f"{where} volume {v['name']}"
        if "configMap" in v:
            cm = find(objects, "ConfigMap", ns, v["configMap"]["name"])
            if check(cm is not None, vw, f"ConfigMap {v['configMap']['name']} is not defined here"):
                for item in v["configMap"].get("items", []):
                    check(item["key"] in cm.get("data", {}), vw, f"ConfigMap has no key {item['key']}")
        if "secret" in v:
            name = v["secret"]["secretName"]
            s = find(secrets, "Secret", ns, name)
            if check(s is not None, vw, f"Secret {name} is not in secrets.example.yaml"):
                keys = set(s.get("stringData", {})) | set(s.get("data", {}))
                for item in v["secret"].get("items", []):
                    check(item["key"] in keys, vw, f"Secret {name} has no key {item['key']}")
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            check(find(objects, "PersistentVolumeClaim", ns, claim) is not None, vw,
                  f"PersistentVolumeClaim {claim} is not defined here")
    for c in containers(spec):
        names = {v["name"] for v in spec.get("volumes", [])}
        names |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            check(m["name"] in names, f"{where} container {c['name']}", f"mounts unknown volume {m['name']}")


def proxy_checks(where, doc, objects):
    spec = pod_spec(doc)
    ns = doc["metadata"]["namespace"]
    check(doc["spec"].get("replicas") == 3, where, "3 replicas")
    proxy = next(c for c in spec["containers"] if c["args"][0] == "postern-proxy")
    _, conf = mounted_toml(doc, objects, proxy)
    if not check(conf is not None, where, "proxy.toml not found in a mounted ConfigMap"):
        return
    listen = conf.get("listen", {})
    ops = listen.get("ops", "127.0.0.1:3081")
    ops_host, ops_port = ops.rsplit(":", 1)
    check(not ipaddress.ip_address(ops_host.strip("[]")).is_loopback, where,
          f"listen.ops = {ops}: the kubelet's probes cannot reach loopback")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = proxy.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, where, f"{probe} must GET {path}")
        port, _ = resolve_port(proxy, get.get("port"))
        check(port == int(ops_port), where, f"{probe} port {port} is not listen.ops {ops}")
    ann = doc["spec"]["template"]["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == ops_port
          and ann.get("prometheus.io/path") == "/metrics", where,
          "prometheus.io/scrape, /port (the ops port) and /path annotations")

    grace = conf.get("shutdown", {}).get("grace_secs", DEFAULT_GRACE)
    pre = proxy.get("lifecycle", {}).get("preStop", {})
    command = pre.get("exec", {}).get("command", [])
    if "sleep" in pre:
        pre_secs = int(pre["sleep"]["seconds"])
    elif len(command) == 2 and command[0] == "sleep":
        pre_secs = int(command[1])
    else:
        pre_secs = None
    check(pre_secs is not None, where, "a preStop hook (sleep N) before the drain")
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    need = (pre_secs or 0) + grace + CLOSE_SECS
    check(tgps > need, where,
          f"terminationGracePeriodSeconds {tgps} must exceed preStop {pre_secs} s + "
          f"shutdown.grace_secs {grace} s + {CLOSE_SECS} s of closing = {need} s")
    note(f"proxy: terminationGracePeriodSeconds {tgps} > preStop {pre_secs} s + grace {grace} s "
         f"+ close {CLOSE_SECS} s = {need} s")

    # Key material: in the data dir (an emptyDir), put there by an init container.
    data_dir = conf.get("data_dir", "/var/lib/postern-proxy")
    m = mount_of(proxy, spec, data_dir)
    check(m is not None and "emptyDir" in m[1], where, f"data_dir {data_dir} must be an emptyDir")
    ssh = conf.get("ssh", {})
    tls = conf.get("web_tls", {})
    init_text = " ".join(" ".join(c.get("command", [])) for c in spec.get("initContainers", []))
    for field, value in (("ssh.host_key_file", ssh.get("host_key_file")),
                         ("ssh.host_cert_file", ssh.get("host_cert_file")),
                         ("web_tls.cert_file", tls.get("cert_file")),
                         ("web_tls.key_file", tls.get("key_file"))):
        if check(value is not None, where, f"{field} must be set (the same key in every replica)"):
            check(value.startswith(data_dir + "/"), where, f"{field} {value} is outside data_dir")
            check(value in init_text, where, f"{field} {value} is not installed by an init container")
    for value in (ssh.get("host_key_file"), tls.get("key_file")):
        if value:
            check(re.search(rf"install -m 0600 \S+ {re.escape(value)}(\s|$)", init_text), where,
                  f"{value} must be installed 0600 (the proxy refuses a key readable by others)")

    # The LoadBalancer: web and tunnel over TCP, the tunnel's UDP twin for QUIC, client address kept.
    lbs = [s for s in objects if s["kind"] == "Service" and s["metadata"].get("namespace") == ns
           and s["spec"].get("type") == "LoadBalancer"]
    if check(len(lbs) == 1, where, "one LoadBalancer Service"):
        lb = lbs[0]
        got = {(p["port"], p.get("protocol", "TCP")) for p in lb["spec"]["ports"]}
        web_port = int(listen.get("web", "0.0.0.0:3080").rsplit(":", 1)[1])
        tunnel_port = int(listen.get("tunnel", "0.0.0.0:3024").rsplit(":", 1)[1])
        for want in ((web_port, "TCP"), (tunnel_port, "TCP"), (tunnel_port, "UDP")):
            check(want in got, name_of(lb), f"no port {want[0]}/{want[1]}")
        check(int(ops_port) not in {p["port"] for p in lb["spec"]["ports"]}, name_of(lb),
              "the ops port must not be on the load balancer")
        check(lb["spec"].get("externalTrafficPolicy") == "Local", name_of(lb),
              "externalTrafficPolicy: Local keeps the client address for the per-source limits")
    pdbs = [p for p in objects if p["kind"] == "PodDisruptionBudget"
            and p["metadata"].get("namespace") == ns and selects(p["spec"]["selector"], doc)]
    if check(len(pdbs) == 1, where, "one PodDisruptionBudget selects the proxies"):
        p = pdbs[0]["spec"]
        check(p.get("maxUnavailable") == 1 or (isinstance(p.get("minAvailable"), int)
              and p["minAvailable"] >= 2), where, "the PDB lets one proxy go at a time")


def selects(selector, workload):
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    match = selector.get("matchLabels", selector)
    return bool(match) and match.items() <= labels.items()


def check_services(objects, workloads):
    for s in (o for o in objects if o["kind"] == "Service"):
        ns = s["metadata"]["namespace"]
        pods = [w for w in workloads if w["metadata"]["namespace"] == ns
                and selects(s["spec"].get("selector", {}), w)]
        if not check(pods, name_of(s), "its selector matches no workload here"):
            continue
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            found = False
            for w in pods:
                for c in pod_spec(w)["containers"]:
                    port, proto = resolve_port(c, target)
                    found |= proto == p.get("protocol", "TCP")
            check(found, name_of(s), f"targetPort {target}/{p.get('protocol', 'TCP')} "
                  "is no container port of the selected pods")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        ns = pdb["metadata"]["namespace"]
        check(any(w["metadata"]["namespace"] == ns and selects(pdb["spec"]["selector"], w)
                  for w in workloads), name_of(pdb), "selects no workload")


def check_auth(where, doc, objects, policies):
    """The Auth server: data_dir strictly inside a persistent volume; nothing from outside its
    namespace may connect; egress only to named destinations."""
    spec = pod_spec(doc)
    ns = doc["metadata"]["namespace"]
    auth = next(c for c in spec["containers"] if c["args"][0] == "postern-auth")
    _, conf = mounted_toml(doc, objects, auth)
    if not check(conf is not None, where, "auth.toml not found in a mounted ConfigMap"):
        return
    data_dir = conf.get("data_dir", "/var/lib/postern-auth").rstrip("/")
    templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
    m = mount_of(auth, spec, data_dir)
    on_claim = m is not None and m[2]["name"] in templates
    check(on_claim, where, f"data_dir {data_dir} must be on a volumeClaimTemplate")
    check(on_claim and data_dir != m[0], where,
          f"data_dir {data_dir} must be a directory inside the volume, not its root (the server "
          "wants it 0700; the volume's root belongs to the fsGroup)")
    check(spec["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch", where,
          "fsGroupChangePolicy: OnRootMismatch (Always would loosen the 0600 files at each mount)")
    mine = [p for p in policies if p["metadata"].get("namespace") == ns]
    check(any(p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes", []))
              == {"Ingress", "Egress"} and not p["spec"].get("ingress")
              and not p["spec"].get("egress") for p in mine), where,
          f"namespace {ns} needs a default-deny NetworkPolicy (ingress and egress)")
    for p in mine:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            check(bool(peers), name_of(p), "an ingress rule without `from` admits every address")
            for peer in peers or []:
                check("namespaceSelector" not in peer and "ipBlock" not in peer, name_of(p),
                      "the Auth server admits nothing from outside its namespace")
        for rule in p["spec"].get("egress", []):
            check(bool(rule.get("to")), name_of(p), "an egress rule without `to` allows anywhere")
            for peer in rule.get("to") or []:
                cidr = peer.get("ipBlock", {}).get("cidr")
                check(cidr is None or ipaddress.ip_network(cidr).prefixlen > 0, name_of(p),
                      f"egress to {cidr}: the Auth server dials only the proxies (and its database)")


def check_configs(objects):
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".toml"):
                try:
                    tomllib.loads(text)
                    check(True, name_of(cm), "")
                except tomllib.TOMLDecodeError as e:
                    fail(name_of(cm), f"{key} is not TOML: {e}")


# ---------------------------------------------------------------------------------------------
# 3. kustomize, where kubectl is installed


def kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("note: kubectl is not installed, so `kubectl kustomize` was not run; the files "
              "each kustomization lists were checked above")
        return
    for root in ROOTS:
        out = subprocess.run([kubectl, "kustomize", str(HERE / root)], capture_output=True,
                             text=True, timeout=120)
        if not check(out.returncode == 0, f"kubectl kustomize {root}", out.stderr.strip()):
            continue
        rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
        for d in rendered:
            validate_schema(f"kubectl kustomize {root}", d)
        images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "StatefulSet")
                  for c in containers(pod_spec(d))}
        if root == ".":
            check(not any(i.startswith(POSTERN_IMAGE) for i in images), "kubectl kustomize .",
                  "the images transformer did not rename postern")
        print(f"kubectl kustomize {root}: {len(rendered)} objects, valid")


def main():
    files, docs = load_documents()
    listed = set()
    services = [d for _, _, d in docs if d["kind"] == "Service"]
    schema_docs = 0
    for rel, n, doc in docs:
        where = f"{rel} document {n}"
        if doc["kind"] == "Kustomization":
            listed.update(validate_kustomization(where, doc, HERE / rel))
        elif doc["kind"] == "ServiceMonitor":
            print(f"{rel}: ServiceMonitor has no bundled schema (a CRD of the Prometheus "
                  "operator): checked structurally and against the Service it selects")
            validate_servicemonitor(where, doc, services)
        else:
            validate_schema(where, doc)
            schema_docs += 1

    # Every manifest is applied by some kustomization, or is optional on purpose.
    reach = set()
    for target in listed:
        if target.is_file():
            reach.add(target)
    for path in files:
        rel = path.relative_to(HERE).as_posix()
        if path.name == "kustomization.yaml":
            continue
        if rel in OPTIONAL:
            print(f"{rel}: in no kustomization on purpose ({OPTIONAL[rel]})")
            continue
        check(path in reach, rel, "no kustomization.yaml lists it, so it would never be applied")

    objects = [d for rel, _, d in docs if rel != "secrets.example.yaml"
               and d["kind"] not in ("Kustomization",)]
    for d in objects:
        if d["kind"] != "Namespace":
            check(bool(d.get("metadata", {}).get("namespace")), name_of(d),
                  "names no namespace (it would land in whatever namespace kubectl uses)")
    # The Auth server has two variants of the same objects: check each against its own files.
    secrets = [d for rel, _, d in docs if rel == "secrets.example.yaml"]
    check(all(d["kind"] == "Secret" for d in secrets), "secrets.example.yaml", "only Secrets")
    variants = {
        "auth/sqlite": [d for rel, _, d in docs if not rel.startswith("auth/postgres/")],
        "auth/postgres": [d for rel, _, d in docs if not rel.startswith("auth/sqlite/")],
    }
    for variant, docs_of_variant in variants.items():
        objs = [d for d in docs_of_variant if d in objects]
        workloads = [d for d in objs if d["kind"] in ("Deployment", "StatefulSet")]
        policies = [d for d in objs if d["kind"] == "NetworkPolicy"]
        for w in workloads:
            where = f"{name_of(w)} ({variant})"
            check_workload(where, w, objs, secrets)
            first = pod_spec(w)["containers"][0].get("args", [""])[0]
            if first == "postern-proxy":
                proxy_checks(where, w, objs)
            if first == "postern-auth":
                check_auth(where, w, objs, policies)
        check_services(objs, workloads)
        check(sum(1 for w in workloads if w["metadata"]["name"] == "postern-auth") == 1,
              variant, "one Auth server workload")
    check_configs(objects)
    kustomize_builds()

    if problems:
        unique = list(dict.fromkeys(problems))
        print(f"\n{len(unique)} problem(s) in deploy/kubernetes:")
        for p in unique:
            print(f"  - {p}")
        return 1
    print(f"deploy/kubernetes: {schema_docs} documents in {len(files)} files valid against the "
          f"Kubernetes {' and '.join(VERSIONS)} schemas (strict, kubernetes-validate "
          f"{kubernetes_validate.__version__}); {checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
