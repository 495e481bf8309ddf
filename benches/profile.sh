#!/usr/bin/env bash
# Profiles the proxy during the forward benchmark (docs/PERFORMANCE.md, "Profile").
#
#   benches/profile.sh [OUT_DIR] [-- extra loadgen options]
#
# Builds the proxy with the `bench-prof` profile (release + symbols), runs the load generator
# under `perf record` (software cpu-clock event, so it also works in VMs without a PMU;
# DWARF call graphs, since release code has no frame pointers) and writes, in OUT_DIR
# (default target-dir/perf):
#   perf.data        the samples (both processes; reports filter on the proxy, comm fedmcp)
#   self.txt         self time by function, as a share of the proxy's samples
#   children.txt     inclusive time by function (call paths)
#   areas.txt        self time grouped into areas (kernel TCP, JSON, framing, HMAC, ...)
#   loadgen.txt      the load generator's summary line for the profiled run
# Needs perf (`apt-get install -y linux-perf`) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${1:-$TARGET_DIR/perf}
shift || true
[ "${1:-}" = "--" ] && shift
DURATION=${PROFILE_DURATION:-5}
FREQ=${PROFILE_FREQ:-1999}
mkdir -p "$OUT"

cargo build --profile bench-prof --bin fedmcp
cargo bench --bench loadgen --no-run
LOADGEN=$(ls -t "$TARGET_DIR"/release/deps/loadgen-* | grep -v '\.d$' | head -1)

FEDMCP_BENCH_BIN="$TARGET_DIR/bench-prof/fedmcp" \
  perf record -e cpu-clock -F "$FREQ" --call-graph dwarf,32768 -o "$OUT/perf.data" -- \
  "$LOADGEN" --duration "$DURATION" --label profile "$@" | tee "$OUT/loadgen.txt"

report() {
  perf report -i "$OUT/perf.data" --comm fedmcp --percentage relative --stdio -g none "$@" 2>/dev/null |
    grep -v '^#' | grep -v '^$'
}
report --no-children --sort symbol | cut -c1-150 > "$OUT/self.txt"
report --children --sort symbol | cut -c1-170 > "$OUT/children.txt"

python3 - "$OUT/self.txt" > "$OUT/areas.txt" <<'EOF'
import re, sys
# First matching rule wins; patterns match the symbol text of `perf report --sort symbol`.
rules = [
    ("kernel: TCP/IP, loopback, socket syscalls", r"^\[k\] .*(tcp|ip_|skb|sock|sys_|net|napi|softirq|xmit|__dev|copy_|loopback|syscall|entry_|raw_spin|fdget|lock|rcv|do_sys|fput|__fget|inet|csum|dst|nf_|security|release_sock|ktime|kmem|kmalloc|kfree|slab|page|memcg|__check|rep_movs|memcpy|memset)"),
    ("kernel: epoll and scheduling", r"^\[k\] .*(epoll|ep_|poll|schedule|wake|sched|futex|hrtimer|timer|switch|update_|enqueue|dequeue|finish_task|pick_)"),
    ("kernel: other", r"^\[k\] "),
    ("HMAC-SHA256 signing of deliveries", r"sha2|sha256|hmac|keyed_mac|Hmac|digest|block_buffer"),
    ("base64 (signature encoding)", r"base64"),
    ("JSON: parse and validate frames (serde_json, too_deep)", r"serde_json|serde_core|serde::|jsonrpc::parse|too_deep|parse_frame|parse_msg|Envelope|present|SendParams|from_utf8|Deserialize|IgnoredAny"),
    ("WebSocket framing (tungstenite, unmasking)", r"tungstenite|bytes::|BytesMut|apply_mask|ws_input|ws_send|WsIo|proto::ws::"),
    ("allocation (malloc/free/realloc)", r"malloc|free|realloc|_int_|unlink_chunk|tcache|consolidate|RawVec|finish_grow|alloc::alloc|__rust_alloc|__rust_dealloc|do_reserve"),
    ("memcpy/memmove/memcmp", r"mem(move|cpy|cmp|set|chr)"),
    ("string formatting (format!, to_string)", r"fmt|format|Display|write_str|to_string|pad"),
    ("clock reads (Instant::now, SystemTime)", r"clock_gettime|vdso|Timespec|Instant|SystemTime|now_ms"),
    ("timers and maps (BTreeMap, HashMap, SipHash)", r"btree|BTreeMap|hash|Hash|hashbrown|sip|timer"),
    ("routing and sessions (send, deliver, answer, registry)", r"router|control::|registry|session|Proxy|proxy::|pending|Bucket"),
    ("event loop and syscall wrappers (reactor, mio, std::net)", r"reactor|mio|conn::|epoll|read|write|recv|send|__libc|syscall"),
]
areas = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+(.*?)\s*$", line)
    if not m:
        continue
    pct, sym = float(m.group(1)), m.group(2)
    name = next((n for n, r in rules if re.search(r, sym)), "other user code")
    areas[name] = areas.get(name, 0.0) + pct
for n, p in sorted(areas.items(), key=lambda x: -x[1]):
    print(f"{p:6.1f}%  {n}")
EOF
echo "== areas (self time, share of the proxy's samples) =="
cat "$OUT/areas.txt"
echo "== top functions (self) =="
head -25 "$OUT/self.txt"
