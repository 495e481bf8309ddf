"""RSS of the proxy per idle TLS control session.

Starts the release binary with a throwaway certificate (openssl CLI), opens N idle wss://
sessions (each answers its welcome), and prints the proxy's RSS before and after, and the
bytes per session. Run from the repository root with the interop venv:

    ulimit -n 4096; .venv/bin/python benches/tls_sessions.py [N] [path/to/fedmcp]
"""
import asyncio, json, os, re, ssl, subprocess, sys, tempfile, time

import jwt
import websockets

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
BIN = sys.argv[2] if len(sys.argv) > 2 else "target/release/fedmcp"
SECRET = "tls-sessions-bench-secret-0123456789abcdef"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


async def session(port, ctx, i):
    now = int(time.time())
    tok = jwt.encode({"serverId": f"s{i}", "type": "federation", "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")
    ws = await websockets.connect(f"wss://localhost:{port}/v1/control", ssl=ctx,
                                  additional_headers={"Authorization": f"Bearer {tok}"}, ping_interval=None)
    w = json.loads(await ws.recv())
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": w["id"], "result": {}}))
    return ws


async def main():
    d = tempfile.mkdtemp()
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    env = dict(os.environ, FEDMCP_LISTEN="127.0.0.1:0", FEDMCP_STATE_DIR="", FEDMCP_JWT_SECRET=SECRET,
               FEDMCP_TLS_CERT=cert, FEDMCP_TLS_KEY=key, FEDMCP_HEARTBEAT_MS="600000",
               FEDMCP_MAX_SERVERS=str(N + 16), RUST_LOG="warn")
    p = subprocess.Popen([BIN], env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline().strip().rsplit(":", 1)[1])
        time.sleep(1.0)
        idle = rss_kib(p.pid)
        ctx = ssl.create_default_context(cafile=cert)
        socks = []
        for i in range(0, N, 50):
            socks += await asyncio.gather(*(session(port, ctx, j) for j in range(i, min(i + 50, N))))
        await asyncio.sleep(1.0)
        full = rss_kib(p.pid)
        per = (full - idle) * 1024 // N
        print(f"tls_sessions sessions={N} idle_rss_kib={idle} sessions_rss_kib={full} bytes_per_session={per}")
        for ws in socks:
            await ws.close()
    finally:
        p.kill()
        p.wait()


asyncio.run(main())
