#!/usr/bin/env python3
"""The file checks of `make deploy-check` (deploy/test.sh runs the processes and calls these).

Each subcommand prints nothing and exits 0 when the check holds; otherwise it prints one line
per problem on stderr and exits 1. Standard library only.

  unit-policy UNIT                    the hardening settings the unit must keep
  env-vars ENV DOCS                   every variable of the docs' tables, with its default
  env-syntax ENV                      NAME=value lines usable by systemd, docker and env(1)
  consistency UNIT ENV DOCS           unit and env file agree (dirs, stop timeout, fd limit)
  run-env ENV DOCS DIR CERT KEY       prints the env file's settings for a test run, with
                                      path values pointed at test files made in DIR
  trace UNIT TRACE RUNENV             an strace -f log against SystemCallFilter=,
                                      RestrictAddressFamilies=, MemoryDenyWriteExecute=,
                                      SystemCallArchitectures=, and its file accesses against
                                      ProtectSystem=strict (writes only in the state dir and
                                      the audit log of RUNENV, the run's settings),
                                      ProtectHome= and ProcSubset=pid
  layout DIR BIN CARGO_TOML DOCS      an unpacked OCI image layout made by make-image.sh
  image-env DIR                       prints the image config's Env, one per line
  image-user DIR                      prints the image config's User
  is-static BIN                       exit 0 if the ELF binary has no interpreter (no libc)
"""
import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile

problems = []


def bad(msg):
    problems.append(msg)


def done():
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


# ---- parsers ----------------------------------------------------------------------------

def parse_unit(path):
    """[(section, key, value)] in file order (continuation lines joined)."""
    out, section, pending = [], None, ""
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if pending:
            line, pending = pending + line.lstrip(), ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        key, _, value = s.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_last(entries, key, section="Service"):
    """The effective value of a single-valued setting (the last assignment wins)."""
    vals = [v for s, k, v in entries if s == section and k == key]
    return vals[-1] if vals else None


def unit_all(entries, key, section="Service"):
    return [v for s, k, v in entries if s == section and k == key]


def parse_env(path):
    """(set: {name: value} of uncommented lines, commented: [(name, value)], lines)."""
    set_, commented, lines = {}, [], []
    for n, raw in enumerate(open(path, encoding="utf-8"), 1):
        line = raw.rstrip("\n")
        lines.append((n, line))
        m = re.match(r"^#([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            commented.append((m.group(1), m.group(2)))
            continue
        if line.strip() == "" or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition("=")
        set_[name] = value
    return set_, commented, lines


def parse_docs(path):
    """{name: literal default or None} from the variable tables of CONFIGURATION.md."""
    out = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \|", line)
        if not m:
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        d = re.match(r"^`([^`]*)`", cells[1])
        out.setdefault(m.group(1), d.group(1) if d else None)
    if len(out) < 10:
        sys.exit(f"{path}: found only {len(out)} variables; has the table format changed?")
    return out


def seconds(value):
    """A systemd time span with one unit ('15s', '15', '2min', '500ms') in seconds."""
    m = re.fullmatch(r"(\d+)\s*(ms|s|sec|min|m)?", value or "")
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2) or "s"
    return {"ms": n / 1000, "s": n, "sec": n, "min": n * 60, "m": n * 60}[unit]


# ---- unit -------------------------------------------------------------------------------

# The settings the unit must keep (deploy/fedmcp.service explains each). A drop-in may relax
# one for a reason (e.g. CAP_NET_BIND_SERVICE for port 443); the shipped file may not.
REQUIRED = {
    "Type": "exec",
    "ExecStart": "/usr/local/bin/fedmcp",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "fedmcp",
    "Group": "fedmcp",
    "EnvironmentFile": "/etc/fedmcp/fedmcp.env",
    "StateDirectory": "fedmcp",
    "StateDirectoryMode": "0700",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "2",
    "UMask": "0077",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "NoNewPrivileges": "yes",
    "RestrictSUIDSGID": "yes",
    "PrivateUsers": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "PrivateIPC": "yes",
    "PrivateMounts": "yes",
    "RemoveIPC": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}
PRESENT = ["TimeoutStopSec", "MemoryMax", "LimitNOFILE", "TasksMax", "LoadCredential"]


def unit_policy(unit):
    e = parse_unit(unit)
    for k, want in REQUIRED.items():
        got = unit_last(e, k)
        if got != want:
            bad(f"{unit}: [Service] {k}= is {got!r}, expected {want!r}")
    for k in PRESENT:
        if not unit_last(e, k):
            bad(f"{unit}: [Service] {k}= is missing")
    filters = unit_all(e, "SystemCallFilter")
    if not filters or filters[0] != "@system-service":
        bad(f"{unit}: the first SystemCallFilter= must be @system-service, found {filters}")
    if not any(f.startswith("~") and "@privileged" in f.lstrip("~").split() for f in filters):
        bad(f"{unit}: SystemCallFilter= must also deny ~@privileged")
    if unit_last(e, "DynamicUser") not in (None, "no"):
        bad(f"{unit}: DynamicUser= conflicts with the static user fedmcp")
    if "network-online.target" not in (unit_last(e, "After", "Unit") or ""):
        bad(f"{unit}: [Unit] After=network-online.target is missing")
    done()


# ---- env file ---------------------------------------------------------------------------

def env_vars(env, docs):
    d = parse_docs(docs)
    set_, commented, _ = parse_env(env)
    seen = set(set_) | {n for n, _ in commented}
    for name, default in d.items():
        if name not in seen:
            bad(f"{env}: {name} (docs/CONFIGURATION.md) is missing")
        elif default is not None and (name, default) not in commented:
            bad(f"{env}: no line `#{name}={default}` showing the documented default")
    for name in sorted(seen - set(d)):
        bad(f"{env}: {name} is not a variable of docs/CONFIGURATION.md (misspelt? the proxy "
            f"would ignore it)")
    done()


def env_syntax(env):
    set_, _, lines = parse_env(env)
    names = []
    for n, line in lines:
        if line.strip() == "" or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([^\s\"'`$\\]*)", line)
        if not m:
            bad(f"{env}:{n}: not NAME=value without quotes, spaces or $: {line!r}")
            continue
        names.append(m.group(1))
        if m.group(2) == "" and m.group(1) != "FEDMCP_STATE_DIR":
            bad(f"{env}:{n}: {m.group(1)} is empty, which the proxy refuses; comment it out")
    for name in {x for x in names if names.count(x) > 1}:
        bad(f"{env}: {name} is set more than once")
    if "FEDMCP_JWT_SECRET" in set_ and "FEDMCP_JWT_SECRET_FILE" in set_:
        bad(f"{env}: FEDMCP_JWT_SECRET and FEDMCP_JWT_SECRET_FILE are both set")
    done()


def consistency(unit, env, docs):
    e, d = parse_unit(unit), parse_docs(docs)
    set_, _, _ = parse_env(env)

    def effective(name):
        return set_.get(name, d.get(name))

    state = "/var/lib/" + (unit_last(e, "StateDirectory") or "?")
    logs = "/var/log/" + (unit_last(e, "LogsDirectory") or "?")
    if set_.get("FEDMCP_STATE_DIR") != state:
        bad(f"{env}: FEDMCP_STATE_DIR={set_.get('FEDMCP_STATE_DIR')!r}, but the unit's "
            f"StateDirectory= (the only writable place) is {state}")
    unit_env = dict(v.split("=", 1) for v in unit_all(e, "Environment") if "=" in v)
    if unit_env.get("FEDMCP_STATE_DIR", state) != state:
        bad(f"{unit}: Environment=FEDMCP_STATE_DIR is not {state}")
    audit = set_.get("FEDMCP_AUDIT_LOG")
    if audit and not (audit.startswith(logs + "/") or audit.startswith(state + "/")):
        bad(f"{env}: FEDMCP_AUDIT_LOG={audit} is not under {logs}/ or {state}/, read-only "
            f"under ProtectSystem=strict")
    secret = set_.get("FEDMCP_JWT_SECRET_FILE", "")
    if secret.startswith("/run/credentials/"):
        creds = {v.split(":", 1)[0] for v in unit_all(e, "LoadCredential")}
        m = re.fullmatch(r"/run/credentials/fedmcp\.service/([^/]+)", secret)
        if not m or m.group(1) not in creds:
            bad(f"{env}: FEDMCP_JWT_SECRET_FILE={secret} is no credential the unit loads "
                f"(LoadCredential= ids: {sorted(creds)})")
    hidden = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")
    for name in ("FEDMCP_TLS_CERT", "FEDMCP_TLS_KEY", "FEDMCP_TRUSTED_CA_FILE",
                 "FEDMCP_JWT_SECRET_FILE", "FEDMCP_AUDIT_LOG"):
        v = set_.get(name, "")
        if v.startswith(hidden):
            bad(f"{env}: {name}={v} is hidden from the service (ProtectHome=, PrivateTmp=)")
        if v and not v.startswith("/"):
            bad(f"{env}: {name}={v} is relative; the service's working directory is /")
    grace_ms = int(effective("FEDMCP_SHUTDOWN_GRACE_MS"))
    stop = seconds(unit_last(e, "TimeoutStopSec"))
    if stop is None:
        bad(f"{unit}: TimeoutStopSec={unit_last(e, 'TimeoutStopSec')!r} is not a plain span")
    elif stop * 1000 < grace_ms + 5000:
        bad(f"{unit}: TimeoutStopSec={stop}s is not above FEDMCP_SHUTDOWN_GRACE_MS={grace_ms} "
            f"plus 5 s for the last flush: systemd would SIGKILL a drain in progress")
    conns = int(effective("FEDMCP_MAX_CONNECTIONS"))
    nofile = unit_last(e, "LimitNOFILE") or "0"
    soft = int(nofile.split(":")[0]) if nofile.split(":")[0].isdigit() else 0
    if soft < 2 * conns + 64:
        bad(f"{unit}: LimitNOFILE={nofile} is below 2 x FEDMCP_MAX_CONNECTIONS ({conns}) + 64")
    port = int(effective("FEDMCP_LISTEN").rsplit(":", 1)[1])
    caps = unit_last(e, "AmbientCapabilities") or ""
    if 0 < port < 1024 and "CAP_NET_BIND_SERVICE" not in caps:
        bad(f"{env}: port {port} needs AmbientCapabilities=CAP_NET_BIND_SERVICE in the unit")
    done()


def run_env(env, docs, work, cert, key):
    """The env file's settings for a test run on loopback, paths pointed at test files."""
    parse_docs(docs)  # fails loudly if the docs cannot be read
    set_, _, _ = parse_env(env)
    out = dict(set_)
    out["FEDMCP_LISTEN"] = "127.0.0.1:0"
    if "FEDMCP_TLS_CERT" in out:
        out["FEDMCP_TLS_CERT"], out["FEDMCP_TLS_KEY"] = cert, key
    if "FEDMCP_TRUSTED_CA_FILE" in out:
        out["FEDMCP_TRUSTED_CA_FILE"] = cert
    if out.get("FEDMCP_STATE_DIR"):
        out["FEDMCP_STATE_DIR"] = os.path.join(work, "state")
    if "FEDMCP_JWT_SECRET_FILE" in out:
        path = os.path.join(work, "jwt-secret")
        with open(path, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        os.chmod(path, 0o600)
        out["FEDMCP_JWT_SECRET_FILE"] = path
    if "FEDMCP_AUDIT_LOG" in out:
        out["FEDMCP_AUDIT_LOG"] = os.path.join(work, "audit.jsonl")
    for k, v in out.items():
        print(f"{k}={v}")


# ---- strace log against the unit's sandbox ----------------------------------------------

def syscall_groups():
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                          capture_output=True, text=True, check=True).stdout
    groups, cur = {}, None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line.startswith(" ") and s.startswith("@"):
            cur = groups.setdefault(s, [])
        elif cur is not None:
            cur.append(s)
    return groups


def expand(groups, item, seen=None):
    if not item.startswith("@"):
        return {item}
    seen = seen if seen is not None else set()
    if item in seen:
        return set()
    seen.add(item)
    if item not in groups:
        sys.exit(f"systemd-analyze syscall-filter knows no set {item}")
    out = set()
    for m in groups[item]:
        out |= expand(groups, m, seen)
    return out


def allowed_syscalls(entries):
    """systemd's reading of SystemCallFilter=: the first line decides allow- or deny-list."""
    groups, allow, mode = syscall_groups(), set(), None
    for v in unit_all(entries, "SystemCallFilter"):
        deny = v.startswith("~")
        names = set()
        for item in v.lstrip("~").split():
            names |= expand(groups, item)
        if mode is None:
            mode = "deny" if deny else "allow"
            allow = names if mode == "allow" else set()
            denied = names if mode == "deny" else set()
        elif mode == "allow":
            allow = allow - names if deny else allow | names
        else:
            denied = denied | names if deny else denied - names
    if mode == "allow":
        return lambda s: s in allow
    if mode == "deny":
        return lambda s: s not in denied
    return lambda s: True


# System calls that change the file system, and those that open (check the flags).
WRITES = {"mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir",
          "chmod", "fchmodat", "fchmodat2", "chown", "lchown", "fchownat", "link", "linkat",
          "symlink", "symlinkat", "truncate", "mknod", "mknodat", "creat", "utimensat",
          "setxattr", "lsetxattr", "removexattr", "lremovexattr"}
OPENS = {"open", "openat", "openat2"}
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def file_access(name, args, writable, log, line):
    """ProtectSystem=strict, ProtectHome=yes and ProcSubset=pid, judged on one call."""
    paths = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
    if name in OPENS:
        paths = paths[:1]
        writes = any(f in args for f in WRITE_FLAGS)
    elif name in WRITES:
        writes = True
    else:
        return
    for p in paths:
        if not p.startswith("/"):
            if writes and re.match(r"^\d", args):
                bad(f"{log}: {name} writes relative to a directory descriptor, not checkable "
                    f"here: {line}")
            elif writes:
                bad(f"{log}: {name} writes the relative path {p!r} (the working directory, /, "
                    f"is read-only)")
            continue
        if p.startswith(("/home/", "/root/", "/run/user/")) or p in ("/home", "/root"):
            bad(f"{log}: {name} {p} (ProtectHome=yes hides it)")
        m = re.match(r"^/proc/([^/]+)", p)
        if m and not (m.group(1) in ("self", "thread-self") or m.group(1).isdigit()):
            bad(f"{log}: {name} {p} (ProcSubset=pid hides it)")
        if writes and p != "/dev/null" and not any(
                p == w or p.startswith(w.rstrip("/") + "/") for w in writable):
            bad(f"{log}: {name} writes {p}, read-only under ProtectSystem=strict")


def trace(unit, log, runenv):
    e = parse_unit(unit)
    run = dict(l.rstrip("\n").split("=", 1) for l in open(runenv) if "=" in l)
    writable = [run[k] for k in ("FEDMCP_STATE_DIR", "FEDMCP_AUDIT_LOG") if run.get(k)]
    strict = unit_last(e, "ProtectSystem") == "strict"
    ok = allowed_syscalls(e)
    families = set((unit_last(e, "RestrictAddressFamilies") or "").split())
    mdwe = unit_last(e, "MemoryDenyWriteExecute") == "yes"
    native = unit_last(e, "SystemCallArchitectures") == "native"
    calls, used_families, n = {}, set(), 0
    for line in open(log, encoding="utf-8", errors="replace"):
        if native and "runs in 32 bit mode" in line:
            bad(f"{log}: a process switched to 32-bit mode (SystemCallArchitectures=native)")
        m = re.match(r"^\d+\s+([a-z_][a-z0-9_]*)\((.*)", line)
        if not m:
            continue  # +++ exited, --- signal ---, <... resumed>
        name, args = m.groups()
        n += 1
        if strict:
            file_access(name, args, writable, log, line.strip())
        calls[name] = calls.get(name, 0) + 1
        fam = re.match(r"(AF_[A-Z0-9]+)", args)
        if name in ("socket", "socketpair") and fam:
            used_families.add(fam.group(1))
        if mdwe:
            prot = args.split(", ")[2] if name == "mmap" and args.count(", ") >= 2 else ""
            if name == "mmap" and "PROT_WRITE" in prot and "PROT_EXEC" in prot:
                bad(f"{log}: writable+executable mmap (MemoryDenyWriteExecute=): {line.strip()}")
            if name in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in args:
                bad(f"{log}: mprotect to executable (MemoryDenyWriteExecute=): {line.strip()}")
    if n < 100:
        bad(f"{log}: only {n} system calls traced; the trace is not the proxy's run")
    for name in sorted(calls):
        if not ok(name):
            bad(f"{log}: {name} ({calls[name]}x) is outside the unit's SystemCallFilter=")
    if families:
        for fam in sorted(used_families - families):
            bad(f"{log}: a socket of family {fam} is outside RestrictAddressFamilies=")
    done()


# ---- OCI image layout -------------------------------------------------------------------

SHA = re.compile(r"^sha256:[0-9a-f]{64}$")
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def blob(root, desc, media_type, what):
    """Check a descriptor against its blob; return the blob's bytes."""
    if desc.get("mediaType") != media_type:
        bad(f"{what}: mediaType {desc.get('mediaType')!r}, expected {media_type}")
    digest = desc.get("digest", "")
    if not SHA.match(digest):
        bad(f"{what}: digest {digest!r} is not sha256:<64 hex>")
        return b""
    path = os.path.join(root, "blobs", "sha256", digest[7:])
    try:
        data = open(path, "rb").read()
    except OSError as e:
        bad(f"{what}: blob missing: {e}")
        return b""
    if hashlib.sha256(data).hexdigest() != digest[7:]:
        bad(f"{what}: blob content does not hash to {digest}")
    if desc.get("size") != len(data):
        bad(f"{what}: descriptor size {desc.get('size')} but the blob has {len(data)} bytes")
    return data


def layout(root, binary, cargo_toml, docs):
    version = re.search(r'^version = "([^"]+)"', open(cargo_toml).read(), re.M).group(1)
    d = parse_docs(docs)
    files = sorted(os.path.relpath(os.path.join(dp, f), root)
                   for dp, _, fs in os.walk(root) for f in fs)
    try:
        if json.load(open(os.path.join(root, "oci-layout"))) != {"imageLayoutVersion": "1.0.0"}:
            bad("oci-layout: not {\"imageLayoutVersion\": \"1.0.0\"}")
        index = json.load(open(os.path.join(root, "index.json")))
    except (OSError, ValueError) as e:
        bad(f"layout: {e}")
        done()
    if index.get("schemaVersion") != 2 or index.get("mediaType") != MT_INDEX:
        bad("index.json: schemaVersion 2 and the index mediaType expected")
    mans = index.get("manifests", [])
    if len(mans) != 1:
        bad(f"index.json: {len(mans)} manifests, expected 1")
        done()
    ref = mans[0].get("annotations", {}).get("org.opencontainers.image.ref.name")
    if not ref:
        bad("index.json: no org.opencontainers.image.ref.name annotation")
    manifest = json.loads(blob(root, mans[0], MT_MANIFEST, "index.json manifests[0]") or "{}")
    if manifest.get("schemaVersion") != 2 or manifest.get("mediaType") != MT_MANIFEST:
        bad("manifest: schemaVersion 2 and the manifest mediaType expected")
    config = json.loads(blob(root, manifest.get("config", {}), MT_CONFIG, "manifest config") or "{}")
    layers = manifest.get("layers", [])
    if len(layers) != 1:
        bad(f"manifest: {len(layers)} layers, expected 1")
        done()
    gz = blob(root, layers[0], MT_LAYER, "manifest layers[0]")
    used = {"oci-layout", "index.json"} | {
        "blobs/sha256/" + x["digest"][7:] for x in (mans[0], manifest["config"], layers[0])}
    for f in files:
        if f not in used:
            bad(f"layout: {f} is not referenced (or not allowed) in an image layout")
    try:
        tar_bytes = gzip.decompress(gz)
    except OSError as e:
        bad(f"layer: not gzip: {e}")
        done()
    # config
    plat = mans[0].get("platform", {})
    if config.get("os") != "linux" or plat.get("os") != "linux":
        bad("config/index: os must be linux")
    if config.get("architecture") != plat.get("architecture") or \
            config.get("architecture") not in ("amd64", "arm64", "arm", "riscv64", "386"):
        bad(f"config/index: architecture {config.get('architecture')} vs {plat.get('architecture')}")
    rootfs = config.get("rootfs", {})
    if rootfs.get("type") != "layers" or \
            rootfs.get("diff_ids") != ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]:
        bad("config: rootfs.diff_ids is not the sha256 of the uncompressed layer")
    c = config.get("config", {})
    if c.get("Entrypoint") != ["/fedmcp"]:
        bad(f"config: Entrypoint {c.get('Entrypoint')}, expected [\"/fedmcp\"]")
    user = c.get("User", "")
    m = re.fullmatch(r"(\d+):(\d+)", user)
    if not m or m.group(1) == "0":
        bad(f"config: User {user!r} must be numeric uid:gid and not root")
    env = dict(x.split("=", 1) for x in c.get("Env", []))
    for k in env:
        if k not in d and k != "PATH":
            bad(f"config: Env {k} is no variable of docs/CONFIGURATION.md")
    if env.get("FEDMCP_STATE_DIR") != "/data" or "/data" not in c.get("Volumes", {}):
        bad("config: FEDMCP_STATE_DIR=/data and a /data volume expected")
    listen = env.get("FEDMCP_LISTEN", d.get("FEDMCP_LISTEN"))
    if f"{listen.rsplit(':', 1)[1]}/tcp" not in c.get("ExposedPorts", {}):
        bad(f"config: ExposedPorts {c.get('ExposedPorts')} lacks the port of {listen}")
    labels = c.get("Labels", {})
    if labels.get("org.opencontainers.image.version") != version:
        bad(f"config: label org.opencontainers.image.version is not {version}")
    # layer contents
    want_sha = hashlib.sha256(open(binary, "rb").read()).hexdigest()
    seen = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        for ti in t.getmembers():
            seen[ti.name.rstrip("/")] = ti
            if ti.name == "fedmcp":
                got = hashlib.sha256(t.extractfile(ti).read()).hexdigest()
                if got != want_sha:
                    bad("layer: /fedmcp is not the binary given")
    if sorted(seen) != ["data", "fedmcp", "tmp"]:
        bad(f"layer: entries {sorted(seen)}, expected data/, fedmcp, tmp/")
    else:
        f, dd, tmp = seen["fedmcp"], seen["data"], seen["tmp"]
        if not f.isfile() or stat.S_IMODE(f.mode) != 0o755 or (f.uid, f.gid) != (0, 0):
            bad(f"layer: /fedmcp must be a 0755 file owned by 0:0 ({oct(f.mode)} {f.uid}:{f.gid})")
        if m and (not dd.isdir() or stat.S_IMODE(dd.mode) != 0o700
                  or (dd.uid, dd.gid) != (int(m.group(1)), int(m.group(2)))):
            bad(f"layer: /data must be a 0700 directory owned by the image user {user}")
        if not tmp.isdir() or stat.S_IMODE(tmp.mode) != 0o1777:
            bad("layer: /tmp must be a 1777 directory")
    done()


def image_config(root):
    index = json.load(open(os.path.join(root, "index.json")))
    d = index["manifests"][0]["digest"][7:]
    manifest = json.load(open(os.path.join(root, "blobs", "sha256", d)))
    path = os.path.join(root, "blobs", "sha256", manifest["config"]["digest"][7:])
    return json.load(open(path))["config"]


def image_env(root):
    for e in image_config(root).get("Env", []):
        print(e)


def image_user(root):
    print(image_config(root).get("User", ""))


def is_static(path):
    """Exit 0 when the ELF file has no program interpreter (PT_INTERP): it runs without libc."""
    import struct
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data[:4] != b"\x7fELF":
        sys.exit(f"{path}: not ELF")
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        phoff, = struct.unpack_from(end + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
    else:
        phoff, = struct.unpack_from(end + "I", data, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
    for i in range(phnum):
        p_type, = struct.unpack_from(end + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            sys.exit(1)
    sys.exit(0)


def main():
    cmds = {"unit-policy": (unit_policy, 1), "env-vars": (env_vars, 2),
            "env-syntax": (env_syntax, 1), "consistency": (consistency, 3),
            "run-env": (run_env, 5), "trace": (trace, 3), "layout": (layout, 4),
            "image-env": (image_env, 1), "image-user": (image_user, 1),
            "is-static": (is_static, 1)}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds or len(sys.argv) - 2 != cmds[sys.argv[1]][1]:
        sys.exit(__doc__)
    fn, _ = cmds[sys.argv[1]]
    fn(*sys.argv[2:])


if __name__ == "__main__":
    main()
