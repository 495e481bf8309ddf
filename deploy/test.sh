#!/usr/bin/env bash
# make deploy-check: the deployable artifacts of deploy/ checked for real, in well under 30 s.
#
#   deploy/test.sh [BIN]        BIN: the proxy to run (default target/debug/fedmcp)
#   IMAGE_BIN=PATH              the binary to build the test image around (default BIN); give
#                               the static build to also run the image's entrypoint in a
#                               chroot of the image's own file system, as the image's user
#   KEEP=1                      keep the scratch directory (its path is printed)
#
# What is checked (one `ok`/`FAIL` line each, then "deploy-check: N passed, M failed"):
#   unit      systemd-analyze verify of deploy/fedmcp.service in a root laid out like the target
#             host (it exits 0 on unknown keys and bad values, so any output is a failure
#             too), on the file and on two broken copies that must be caught; the hardening
#             settings it must keep; systemd's own exposure score; the sysusers.d file
#             creates the user in a scratch root
#   env       deploy/fedmcp.env names every variable of docs/CONFIGURATION.md with its
#             documented default and nothing else; its lines are plain NAME=value; it agrees
#             with the unit (state and logs dirs, credential, TimeoutStopSec above the grace,
#             LimitNOFILE above the connections)
#   run       the proxy started with exactly the env file's settings (paths pointed at test
#             files, listener on 127.0.0.1:0) under strace: it listens with TLS, answers
#             health, registrations, a queued send, a resource upload and download, an
#             outbound dial; SIGHUP serves a new certificate; SIGTERM drains and exits 0
#             within TimeoutStopSec; every system call it made is inside the unit's
#             SystemCallFilter=, every socket inside RestrictAddressFamilies=, no
#             writable+executable memory (MemoryDenyWriteExecute=), no write outside the
#             state dir and audit log (ProtectSystem=strict), nothing under /home, /root
#             (ProtectHome=) or /proc other than its own (ProcSubset=pid)
#   image     deploy/make-image.sh twice gives the same bytes; the layout's JSON, media types,
#             digests, sizes, diff_id, config and layer entries are right; oci-image-tool
#             (the OCI's validator) accepts it; umoci (a separate OCI implementation) unpacks
#             it into a runtime bundle; the entrypoint prints the
#             version; with the image's Env alone it refuses to start (plain listener on
#             0.0.0.0); with a loopback listener it serves as the image's user and keeps its
#             state in the image's /data
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
bin_in="${1:-$repo/target/debug/fedmcp}"
image_bin_in="${IMAGE_BIN:-$bin_in}"
python="${PYTHON:-python3}"
checks=("$python" "$here/checks.py")
unit="$here/fedmcp.service"
envfile="$here/fedmcp.env"
docs="$repo/docs/CONFIGURATION.md"
started=$SECONDS

for b in "$bin_in" "$image_bin_in"; do
  [ -x "$b" ] || { echo "deploy-check: $b is missing: build it first (cargo build --bin fedmcp)" >&2; exit 2; }
done

# ---- tools: installed from Debian's packages when missing (as make test-tools does) -------
need=()
for pair in systemd-analyze:systemd systemd-sysusers:systemd strace:strace umoci:umoci \
            openssl:openssl curl:curl setpriv:util-linux pgrep:procps oci-image-tool:oci-image-tool; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "deploy-check: installing ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fedmcp-deploy-check.XXXXXX")"
# Processes this script started, by id (steps run in subshells, so in a file). When a step
# ends, and again on exit, any still running whose command line names the scratch directory
# is killed, newest first (the proxy before the strace above it), and reaped; nothing else.
track() { echo "$1" >>"$work/pids"; }
reap() {
  local p
  [ -f "$work/pids" ] || return 0
  while read -r p; do
    if { tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null | grep -qF "$work"; then
      kill -9 "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    fi
  done < <(tac "$work/pids")
}
cleanup() {
  reap
  if [ "${KEEP:-0}" = 1 ]; then echo "deploy-check: scratch kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Snapshots: a concurrent `cargo build` must not swap the binary under a running check.
cp "$bin_in" "$work/fedmcp"
bin="$work/fedmcp"
if [ "$image_bin_in" = "$bin_in" ]; then image_bin="$bin"; else cp "$image_bin_in" "$work/image-bin"; image_bin="$work/image-bin"; fi
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"

passed=0 failed=0
step() { # name function: runs the function in a subshell with -e; its stderr is the reason
  local name="$1" t0=$SECONDS rc=0
  set +e
  ( set -e; trap reap EXIT; "$2" ) 2>"$work/step.err"
  rc=$?
  set -e
  if [ $rc = 0 ]; then
    passed=$((passed + 1)); echo "ok   - $name ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1)); echo "FAIL - $name"; sed 's/^/       /' "$work/step.err" | head -n 30
  fi
}
fail() { echo "$*" >&2; return 1; }
wait_line() { # file pattern seconds -> the first matching line
  local i
  for ((i = 0; i < $3 * 20; i++)); do
    grep -m1 -E "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
wait_exit() { # pid seconds -> sets $exit_code; fails if still running
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    if ! kill -0 "$1" 2>/dev/null; then
      set +e; wait "$1"; exit_code=$?; set -e
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# ---- unit ----------------------------------------------------------------------------------
# A scratch root laid out like the target host: systemd's own units (for the default
# dependencies), the unit where an administrator puts it, the binary at ExecStart=, kill at
# ExecReload=.
sdroot="$work/root"
mkdir -p "$sdroot/etc/systemd/system" "$sdroot/usr/lib/systemd" "$sdroot/usr/local/bin" "$sdroot/bin"
cp -a /usr/lib/systemd/system "$sdroot/usr/lib/systemd/"
cp "$bin" "$sdroot/usr/local/bin/fedmcp"
cp "$(readlink -f /bin/kill)" "$sdroot/bin/kill"

verify() { # unit file -> prints systemd-analyze verify's complaints; fails on any
  cp "$1" "$sdroot/etc/systemd/system/fedmcp.service"
  local out rc=0
  out="$(systemd-analyze verify --man=no --root="$sdroot" /etc/systemd/system/fedmcp.service 2>&1)" || rc=$?
  if [ $rc != 0 ] || [ -n "$out" ]; then echo "exit $rc: $out"; return 1; fi
}
unit_verify() {
  local out
  out="$(verify "$unit")" || fail "systemd-analyze verify: $out"
}
unit_verify_catches() {
  local out
  sed 's/^ProtectSystem=strict$/ProtectSystem=stritc/' "$unit" >"$work/broken1.service"
  sed 's/^ProtectHome=yes$/ProtectHom=yes/' "$unit" >"$work/broken2.service"
  cmp -s "$unit" "$work/broken1.service" && fail "no ProtectSystem=strict line to break"
  cmp -s "$unit" "$work/broken2.service" && fail "no ProtectHome=yes line to break"
  out="$(verify "$work/broken1.service")" && fail "a bad value passed systemd-analyze verify"
  grep -q "stritc" <<<"$out" || fail "unexpected complaint: $out"
  out="$(verify "$work/broken2.service")" && fail "an unknown key passed systemd-analyze verify"
  grep -q "ProtectHom" <<<"$out" || fail "unexpected complaint: $out"
  cp "$unit" "$sdroot/etc/systemd/system/fedmcp.service"
}
unit_policy() { "${checks[@]}" unit-policy "$unit"; }
# systemd's own score, 0 (locked down) to 10: the file scores 1.1 with systemd 252; a
# threshold of 15 (1.5) fails when a block of hardening is dropped.
unit_security() {
  cp "$unit" "$sdroot/etc/systemd/system/fedmcp.service"
  local out rc=0
  out="$(systemd-analyze security --offline=yes --root="$sdroot" --threshold=15 --no-pager fedmcp.service 2>&1)" || rc=$?
  [ $rc = 0 ] || fail "exposure above 1.5: $(grep -E 'Overall|✗' <<<"$out")"
  grep -E "Overall exposure" <<<"$out" >/dev/null || fail "no score: $out"
}
sysusers() {
  mkdir -p "$work/su/etc"
  systemd-sysusers --root="$work/su" "$here/fedmcp.sysusers" 2>"$work/su.err" || fail "$(cat "$work/su.err")"
  grep -qE '^fedmcp:x:[0-9]+:[0-9]+:[^:]*:/var/lib/fedmcp:/usr/sbin/nologin$' "$work/su/etc/passwd" \
    || fail "no nologin system user fedmcp: $(cat "$work/su/etc/passwd")"
  grep -qE '^fedmcp:x:[0-9]+:' "$work/su/etc/group" || fail "no group fedmcp"
}

step "unit: systemd-analyze verify (no complaint at all)" unit_verify
step "unit: verify catches a bad value and an unknown key" unit_verify_catches
step "unit: hardening settings kept" unit_policy
step "unit: systemd-analyze security exposure <= 1.5" unit_security
step "sysusers: creates the nologin user fedmcp" sysusers

# ---- env file ------------------------------------------------------------------------------
env_vars() { "${checks[@]}" env-vars "$envfile" "$docs"; }
env_syntax() { "${checks[@]}" env-syntax "$envfile"; }
consistency() { "${checks[@]}" consistency "$unit" "$envfile" "$docs"; }
step "env: every variable of CONFIGURATION.md, with its default" env_vars
step "env: plain NAME=value lines (systemd, docker --env-file, env)" env_syntax
step "env+unit: dirs, credential, stop timeout, LimitNOFILE agree" consistency

# ---- the proxy run with the env file -------------------------------------------------------
mkpair() { # name -> cert and key for localhost/127.0.0.1 in $work
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$work/$1.key" -out "$work/$1.crt" 2>/dev/null
}
env_run() {
  mkpair tls && mkpair tls2
  mkdir -p "$work/run"
  cp "$work/tls.crt" "$work/run/cert.pem"; cp "$work/tls.key" "$work/run/key.pem"
  local runenv url code tok btok
  mapfile -t runenv < <("${checks[@]}" run-env "$envfile" "$docs" "$work/run" "$work/run/cert.pem" "$work/run/key.pem")
  [ ${#runenv[@]} -gt 0 ] || fail "no settings from the env file"
  printf '%s\n' "${runenv[@]}" >"$work/run/env"
  env -i "${runenv[@]}" "$(command -v strace)" -f -qq -o "$work/trace.txt" "$bin" >"$work/run/out" 2>"$work/run/err" &
  local spid=$!
  track "$spid"
  # The proxy is strace's one child: its pid, not strace's, gets the signals (and is killed
  # on the way out if a check fails while it runs: strace's death would only detach it).
  local ppid="" i
  # (Strace's child is the proxy once it has exec'd it: the pid whose /proc/PID/exe is $bin.)
  local want cand
  want="$(readlink -f "$bin")"
  for ((i = 0; i < 200; i++)); do
    ppid=""
    for cand in $(pgrep -P "$spid"); do
      if [ "$(readlink -f "/proc/$cand/exe" 2>/dev/null)" = "$want" ]; then ppid="$cand"; break; fi
    done
    [ -n "$ppid" ] && break
    sleep 0.05
  done
  [ -n "$ppid" ] || fail "no process under strace; stderr: $(tail -3 "$work/run/err")"
  track "$ppid"
  local line
  line="$(wait_line "$work/run/out" '^listening on ' 15)" || fail "no 'listening on' line; stderr: $(tail -3 "$work/run/err")"
  url="${line#listening on }"
  [[ "$url" == https://127.0.0.1:* ]] || fail "expected an https listener (the env file sets TLS): $line"
  c() { curl -sS --max-time 5 --cacert "$work/tls.crt" "$@"; }
  [ "$(c -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] || fail "healthz not 200"
  if ! grep -q '^FEDMCP_NATS_URL=' "$work/run/env"; then
    [ "$(c -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ] || fail "readyz not 200"
  fi
  tok="$(env -i "${runenv[@]}" "$bin" token --server-id operator --admin)" || fail "fedmcp token failed with the env file's settings"
  code="$(c -o "$work/run/alice" -w '%{http_code}' -X POST "$url/v1/servers" -H "Authorization: Bearer $tok" \
          -d '{"serverId":"alice","endpoints":{"control":"ws://localhost:9/control"}}')"
  [[ "$code" == 20? ]] || fail "register alice (outbound endpoint): $code $(cat "$work/run/alice")"
  code="$(c -o "$work/run/bob" -w '%{http_code}' -X POST "$url/v1/servers" -H "Authorization: Bearer $tok" -d '{"serverId":"bob"}')"
  [[ "$code" == 20? ]] || fail "register bob: $code"
  btok="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$work/run/bob")"
  head -c 300000 /dev/urandom >"$work/run/blob"
  code="$(c -o /dev/null -w '%{http_code}' -X PUT "$url/v1/resources/blob.bin" -H "Authorization: Bearer $btok" --data-binary @"$work/run/blob")"
  [ "$code" = 201 ] || fail "resource upload: $code"
  c -o "$work/run/blob.back" "$url/v1/resources/bob/blob.bin" -H "Authorization: Bearer $tok"
  cmp -s "$work/run/blob" "$work/run/blob.back" || fail "resource download differs"
  # Whole answers first, then grep: `curl | grep -q` under pipefail fails when grep exits
  # at its match before curl has written the rest (curl: (23) Failed writing body).
  sent="$(c -X POST "$url/v1/messages" -H "Authorization: Bearer $btok" -d '{"to":"alice","queue":true,"message":{"n":1}}')"
  grep -q '"queued"' <<<"$sent" || fail "queued send not answered queued: $sent"
  metrics="$(c "$url/metrics")"
  grep -q '^fedmcp_servers_registered 2' <<<"$metrics" || fail "metrics do not count 2 servers"
  # SIGHUP (ExecReload=): a new pair moved over the same paths is served to new connections.
  cp "$work/tls2.crt" "$work/run/cert.new"; cp "$work/tls2.key" "$work/run/key.new"
  mv -f "$work/run/key.new" "$work/run/key.pem"; mv -f "$work/run/cert.new" "$work/run/cert.pem"
  kill -0 "$ppid" 2>/dev/null || fail "the proxy ($ppid) is gone before SIGHUP; stderr: $(tail -5 "$work/run/err")"
  kill -HUP "$ppid"
  local ok=0
  for ((i = 0; i < 100; i++)); do
    if curl -sS --max-time 2 -o /dev/null --cacert "$work/tls2.crt" "$url/healthz" 2>/dev/null; then ok=1; break; fi
    sleep 0.05
  done
  [ $ok = 1 ] || fail "after SIGHUP the new certificate is not served"
  # SIGTERM (KillSignal=): drain, exit 0, within the unit's TimeoutStopSec=.
  local stop_s; stop_s="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s*$/\1/p' "$unit" | tail -n1)"
  local t0=$SECONDS
  kill -TERM "$ppid"
  wait_exit "$spid" "${stop_s:-15}" || fail "still running ${stop_s}s after SIGTERM (TimeoutStopSec)"
  [ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM; stderr: $(tail -3 "$work/run/err")"
  [ "$(wc -l <"$work/run/out")" = 1 ] || fail "stdout is not exactly the one ready line: $(cat "$work/run/out")"
  grep -q 'drained' "$work/run/err" || fail "no drain logged: $(tail -3 "$work/run/err")"
  local sd; sd="$(sed -n 's/^FEDMCP_STATE_DIR=//p' "$work/run/env")"
  if [ -n "$sd" ]; then
    [ "$(stat -c %a "$sd")" = 700 ] || fail "state dir mode $(stat -c %a "$sd"), expected 700"
    [ -s "$sd/state.log" ] || fail "nothing written to the state log"
  fi
  echo "stopped in $((SECONDS - t0)) s" >"$work/run/stop"
}
trace_check() {
  [ -s "$work/trace.txt" ] || fail "no trace: the run above failed"
  "${checks[@]}" trace "$unit" "$work/trace.txt" "$work/run/env"
}
step "run: the proxy starts with the env file (TLS), serves, reloads on SIGHUP, drains on SIGTERM" env_run
step "run: its system calls, sockets, memory and file accesses fit the unit's sandbox" trace_check

# ---- image ---------------------------------------------------------------------------------
image_build() {
  IMAGE_GZIP_LEVEL=1 SOURCE_DATE_EPOCH=1700000000 "$here/make-image.sh" --bin "$image_bin" --out "$work/image.oci.tar" >/dev/null
  IMAGE_GZIP_LEVEL=1 SOURCE_DATE_EPOCH=1700000000 "$here/make-image.sh" --bin "$image_bin" --out "$work/image2.oci.tar" >/dev/null
  cmp -s "$work/image.oci.tar" "$work/image2.oci.tar" || fail "two builds from the same binary differ"
  mkdir -p "$work/layout"
  tar -xf "$work/image.oci.tar" -C "$work/layout"
}
image_layout() { "${checks[@]}" layout "$work/layout" "$image_bin" "$repo/Cargo.toml" "$docs"; }
# The OCI's own validator (image-tools): JSON schemas of index, manifest and config, and the
# digests down the chain. It is given the unpacked directory: its tar reader is broken
# (opencontainers/image-tools#205, "find failed: unable to walk: end of walk").
image_oci_validate() {
  local out
  out="$(oci-image-tool validate --type image --ref "name=$version" "$work/layout" 2>&1)" || fail "$out"
}
image_umoci() {
  local tag rootless=() uid
  tag="$(umoci ls --layout "$work/layout")" || fail "umoci ls failed"
  [ "$tag" = "$version" ] || fail "tag $tag, expected $version"
  [ "$(id -u)" = 0 ] || rootless=(--rootless)
  umoci --log error unpack "${rootless[@]}" --image "$work/layout:$tag" "$work/bundle" >/dev/null || fail "umoci unpack failed"
  "$python" - "$work/bundle/config.json" <<'PY' || fail "runtime bundle config differs from the image config"
import json, sys
p = json.load(open(sys.argv[1]))["process"]
assert p["args"] == ["/fedmcp", "serve"], p["args"]
assert (p["user"]["uid"], p["user"]["gid"]) == (65532, 65532), p["user"]
assert "FEDMCP_STATE_DIR=/data" in p["env"], p["env"]
PY
  if [ "$(id -u)" = 0 ]; then
    uid="$(stat -c %u:%g "$work/bundle/rootfs/data")"
    [ "$uid" = 65532:65532 ] || fail "umoci unpacked /data owned by $uid"
  fi
}
# How the image's entrypoint is run here: a static binary in a chroot of the unpacked image
# (nothing else from the host), as the image's user; a dynamic one (the dev build) from the
# unpacked file system on the host, as the image's user (setpriv), with /data at its place in
# the unpacked tree.
image_runner() {
  local user; user="$("${checks[@]}" image-user "$work/layout")"
  rootfs="$work/bundle/rootfs"
  if [ "$(id -u)" != 0 ]; then
    runner=(); entry="$rootfs/fedmcp"; datadir="$rootfs/data"; how="on the host, as $(id -un)"
  elif "${checks[@]}" is-static "$rootfs/fedmcp"; then
    runner=("$(command -v chroot)" --userspec="$user" "$rootfs"); entry=/fedmcp; datadir=/data; how="static, in a chroot of the image, as $user"
  else
    chmod 0711 "$work" "$work/bundle"
    runner=("$(command -v setpriv)" --reuid="${user%%:*}" --regid="${user#*:}" --clear-groups); entry="$rootfs/fedmcp"
    datadir="$rootfs/data"; how="dynamic, on the host, as $user"
  fi
  mapfile -t imgenv < <("${checks[@]}" image-env "$work/layout" | sed "s#^FEDMCP_STATE_DIR=/data\$#FEDMCP_STATE_DIR=$datadir#")
}
image_version() {
  image_runner
  local out
  out="$(env -i "${imgenv[@]}" "${runner[@]}" "$entry" --version)" || fail "$entry --version failed ($how)"
  [ "$out" = "fedmcp $version" ] || fail "version '$out', expected 'fedmcp $version'"
  echo "$how" >"$work/image-how"
}
image_refuses_plaintext() {
  image_runner
  set +e
  env -i "${imgenv[@]}" "$(command -v timeout)" 10 "${runner[@]}" "$entry" >"$work/img.out" 2>"$work/img.err"
  local rc=$?
  set -e
  [ $rc = 2 ] || fail "exit code $rc with the image's Env alone, expected 2 (config error); stderr: $(cat "$work/img.err")"
  if ! { [ "$(wc -l <"$work/img.err")" = 1 ] && grep -q '^FEDMCP_LISTEN: .*needs TLS' "$work/img.err"; }; then
    fail "expected one FEDMCP_LISTEN line about TLS, got: $(cat "$work/img.err")"
  fi
  [ ! -s "$work/img.out" ] || fail "it printed on stdout: $(cat "$work/img.out")"
}
image_serves() {
  image_runner
  env -i "${imgenv[@]}" FEDMCP_LISTEN=127.0.0.1:0 "${runner[@]}" "$entry" serve >"$work/img2.out" 2>"$work/img2.err" &
  local pid=$!
  track "$pid"
  local line url
  line="$(wait_line "$work/img2.out" '^listening on ' 15)" || fail "no 'listening on' ($how); stderr: $(tail -3 "$work/img2.err")"
  url="${line#listening on }"
  [ "$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] || fail "healthz not 200"
  kill -TERM "$pid"
  wait_exit "$pid" 15 || fail "still running 15 s after SIGTERM"
  [ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM"
  local d="$rootfs/data"
  [ -s "$d/jwt-secret" ] || fail "no generated secret in the image's /data"
  local user; user="$("${checks[@]}" image-user "$work/layout")"
  if [ "$(id -u)" = 0 ]; then
    [ "$(stat -c %u:%g:%a "$d/jwt-secret")" = "$user:600" ] || fail "/data/jwt-secret is $(stat -c %u:%g:%a "$d/jwt-secret"), expected $user:600"
  fi
}
step "image: make-image.sh builds the same bytes twice" image_build
step "image: OCI layout (JSON, media types, digests, sizes, diff_id, config, layer entries)" image_layout
step "image: oci-image-tool validate accepts the layout" image_oci_validate
step "image: umoci unpacks it into a runtime bundle as the image's user" image_umoci
step "image: the entrypoint prints the version" image_version
step "image: its default Env refuses a plain listener on 0.0.0.0 (exit 2)" image_refuses_plaintext
step "image: serves as its user with state in /data, exits 0 on SIGTERM" image_serves

how="$(cat "$work/image-how" 2>/dev/null || echo "not run")"
echo "deploy-check: proxy $bin_in; image around $image_bin_in ($how); $((SECONDS - started)) s"
echo "deploy-check: $passed passed, $failed failed"
[ "$failed" = 0 ]
