#!/usr/bin/env bash
# Build a container image of fedmcp, FROM scratch, as an OCI image layout in a tar file
# (the "oci-archive" form), with Debian's tar, gzip and sha256sum and python3 for the JSON.
# No container daemon, no registry.
#
#   deploy/make-image.sh --bin PATH [--out FILE] [--tag TAG]
#
#   --bin   the binary to put at /fedmcp; `make image` passes the static musl build
#           (target/x86_64-unknown-linux-musl/release/fedmcp). A dynamically linked binary
#           builds a valid layout but cannot run in the image (there is no libc in it).
#   --out   default target/fedmcp-image.oci.tar
#   --tag   the reference name in index.json (org.opencontainers.image.ref.name); default
#           the version in Cargo.toml
#
# Environment: IMAGE_GZIP_LEVEL (1-9, default 9), SOURCE_DATE_EPOCH (timestamps; default the
# time of the HEAD commit, else 0). The same inputs give the same bytes, so the same digest.
#
# The image: one layer with
#   /fedmcp   0755 root      the proxy, the entrypoint
#   /data/    0700 65532     the state dir (a volume); a named volume starts as a copy of it,
#                            so the non-root user owns it
#   /tmp/     1777 root      only used by a memory-only proxy (FEDMCP_STATE_DIR=)
# No /etc/ssl: outbound TLS uses the bundled web roots or FEDMCP_TRUSTED_CA_FILE. The runtime
# provides /etc/hosts and /etc/resolv.conf for outbound names.
# Config: Entrypoint ["/fedmcp"], Cmd ["serve"] (so `docker run IMAGE token --server-id x
# --admin` runs that subcommand instead), User 65532:65532, Env FEDMCP_LISTEN=0.0.0.0:8443
# and FEDMCP_STATE_DIR=/data, ExposedPorts 8443/tcp, Volumes /data, StopSignal SIGTERM.
# No TLS and no FEDMCP_ALLOW_PLAINTEXT by default: the container refuses to start (exit 2,
# one line naming FEDMCP_LISTEN) until it is given either a certificate
# (FEDMCP_TLS_CERT, FEDMCP_TLS_KEY, files mounted in) or FEDMCP_ALLOW_PLAINTEXT=1 for a
# listener behind a TLS-terminating proxy. A default that served tokens in clear text on
# every interface would be silently unsafe; an image default for the TLS paths could not be
# turned off (an empty FEDMCP_TLS_CERT is an error, not "no TLS"). deploy/README.md shows
# both ways of running it.
set -euo pipefail

bin="" out="target/fedmcp-image.oci.tar" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a path}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "make-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$bin" ] || { echo "make-image: --bin PATH is required" >&2; exit 2; }
if ! { [ -f "$bin" ] && [ -x "$bin" ]; }; then echo "make-image: $bin is not an executable file" >&2; exit 2; fi

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
python="${PYTHON:-python3}"
level="${IMAGE_GZIP_LEVEL:-9}"
case "$level" in [1-9]) ;; *) echo "make-image: IMAGE_GZIP_LEVEL must be 1-9" >&2; exit 2 ;; esac

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
[ -n "$version" ] || { echo "make-image: no version in Cargo.toml" >&2; exit 2; }
[ -n "$tag" ] || tag="$version"
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)"
epoch="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}"
case "$epoch" in ''|*[!0-9]*) echo "make-image: SOURCE_DATE_EPOCH must be seconds" >&2; exit 2 ;; esac

# The image's user and the listener port (also in deploy/README.md and deploy/test.sh).
uid=65532
port=8443

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---- the layer ----------------------------------------------------------------------------
root="$work/rootfs"
mkdir -p "$root/data" "$root/tmp"
cp "$bin" "$root/fedmcp"
chmod 0755 "$root/fedmcp"
chmod 0700 "$root/data"
chmod 1777 "$root/tmp"
# Reproducible tar: sorted names, one mtime, numeric owners, no atime/ctime. Two passes, as
# GNU tar sets one owner per run: root's files, then the state dir owned by the image user.
# shellcheck disable=SC2054 # the commas belong to --pax-option
tar_opts=(--format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime
          --sort=name --mtime="@$epoch" --numeric-owner --no-recursion -C "$root")
tar --create --file="$work/layer.tar" "${tar_opts[@]}" --owner=0 --group=0 fedmcp tmp/
tar --append --file="$work/layer.tar" "${tar_opts[@]}" --owner="$uid" --group="$uid" data/
gzip -n "-$level" <"$work/layer.tar" >"$work/layer.tar.gz"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
add_blob() { # file -> prints its digest; the blob is stored under its digest
  local d; d="$(sha "$1")"
  cp "$1" "$layout/blobs/sha256/$d"
  echo "$d"
}
diff_id="$(sha "$work/layer.tar")"
layer_digest="$(add_blob "$work/layer.tar.gz")"
layer_size="$(size "$work/layer.tar.gz")"

# ---- config, manifest, index (JSON by python3: sorted keys, no spaces) ---------------------
json() { # python expression over the variables passed as NAME=value arguments -> JSON
  local expr="$1"; shift
  "$python" - "$expr" "$@" <<'PY'
import json, sys, time
expr, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
def elf_arch(path):
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        sys.exit(f"make-image: {path} is not an ELF binary")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    arch = {62: "amd64", 183: "arm64", 40: "arm", 243: "riscv64", 3: "386"}.get(machine)
    if arch is None:
        sys.exit(f"make-image: unknown ELF machine {machine}")
    return arch
def created(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
out = eval(expr, {"elf_arch": elf_arch, "created": created, "int": int}, args)
sys.stdout.write(json.dumps(out, sort_keys=True, separators=(",", ":")))
PY
}

arch="$(json 'elf_arch(bin)' bin="$bin" | tr -d '"')"
json '{
  "created": created(epoch),
  "architecture": arch,
  "os": "linux",
  "config": {
    "User": uid + ":" + uid,
    "Entrypoint": ["/fedmcp"],
    "Cmd": ["serve"],
    "Env": ["FEDMCP_LISTEN=0.0.0.0:" + port, "FEDMCP_STATE_DIR=/data"],
    "ExposedPorts": {port + "/tcp": {}},
    "Volumes": {"/data": {}},
    "StopSignal": "SIGTERM",
    "Labels": dict({
      "org.opencontainers.image.title": "fedmcp",
      "org.opencontainers.image.description": "Federation proxy for MCP servers: one static binary, configured by FEDMCP_* variables (docs/CONFIGURATION.md)",
      "org.opencontainers.image.version": version,
      "org.opencontainers.image.created": created(epoch),
    }, **({"org.opencontainers.image.revision": revision} if revision else {})),
  },
  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
  "history": [{"created": created(epoch), "created_by": "deploy/make-image.sh",
               "comment": "fedmcp " + version}],
}' epoch="$epoch" arch="$arch" uid="$uid" port="$port" version="$version" \
   revision="$revision" diff_id="$diff_id" >"$work/config.json"
config_digest="$(add_blob "$work/config.json")"
config_size="$(size "$work/config.json")"

json '{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
             "digest": "sha256:" + cd, "size": int(cs)},
  "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
              "digest": "sha256:" + ld, "size": int(ls)}],
}' cd="$config_digest" cs="$config_size" ld="$layer_digest" ls="$layer_size" >"$work/manifest.json"
manifest_digest="$(add_blob "$work/manifest.json")"
manifest_size="$(size "$work/manifest.json")"

json '{
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": "sha256:" + md, "size": int(ms),
                 "platform": {"architecture": arch, "os": "linux"},
                 "annotations": {"org.opencontainers.image.ref.name": tag}}],
}' md="$manifest_digest" ms="$manifest_size" arch="$arch" tag="$tag" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

# ---- the archive --------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
tar --create --file="$out.tmp" --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    -C "$layout" oci-layout index.json blobs
mv -f "$out.tmp" "$out"
echo "image: $out ($arch, tag $tag, manifest sha256:$manifest_digest, layer $layer_size bytes)"
