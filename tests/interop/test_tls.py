"""TLS on the one listener (contract §1) and the SIGHUP certificate reload (§8).

Certificates are made here with the `openssl` CLI. Clients: `websockets` over `wss://` and
`urllib` over HTTPS with one `ssl` context, Python `ssl` sockets pinned to one protocol
version, and `curl`. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request
import warnings
from typing import Any

from fedmcp_harness import WAIT, Client, Proxy, ProxyTestCase, Resp, clean_env, jwt

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
# A message body just under the 1 MiB default limit once wrapped in JSON-RPC.
BIG = 900 * 1024


def make_pair(directory: str, name: str, ca: tuple[str, str] | None = None) -> tuple[str, str]:
    """A P-256 certificate for localhost and 127.0.0.1 with subject CN `name`, and its key.

    Self-signed, or signed by `ca` = (ca_cert, ca_key) when given.
    """
    cert = os.path.join(directory, f"{name}.cert.pem")
    key = os.path.join(directory, f"{name}.key.pem")
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    base = [OPENSSL, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-subj", f"/CN={name}"]
    if ca is None:
        cmds = [base + ["-x509", "-days", "2", "-out", cert, "-addext", san]]
    else:
        csr = os.path.join(directory, f"{name}.csr")
        ext = os.path.join(directory, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(san + "\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n")
        cmds = [base + ["-out", csr],
                [OPENSSL, "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                 "-days", "2", "-out", cert, "-extfile", ext]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"openssl failed: {cmd}\n{r.stderr}")
    return cert, key


def make_ca(directory: str, name: str) -> tuple[str, str]:
    cert = os.path.join(directory, f"{name}.cert.pem")
    key = os.path.join(directory, f"{name}.key.pem")
    r = subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"openssl CA failed:\n{r.stderr}")
    return cert, key


def client_ctx(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def peer_cn(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> str:
    """Subject CN of the certificate the proxy presents on a new connection (verified by ctx)."""
    with socket.create_connection((host, port), timeout=WAIT) as s:
        s.settimeout(WAIT)
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            subject = dict(x[0] for x in t.getpeercert()["subject"])
            return subject["commonName"]


def tls_handshake(port: int, ctx: ssl.SSLContext) -> str:
    """Completes a handshake; returns the negotiated protocol version."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.settimeout(WAIT)
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return t.version() or ""


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(WAIT)), *args],
        capture_output=True, text=True, timeout=WAIT + 5, env=clean_env(), stdin=subprocess.DEVNULL)


class TlsProxy(Proxy):
    """The harness proxy with TLS: HTTPS for `http`, `wss://` for the control channel."""

    def __init__(self, cert: str, key: str, cafile: str, env: dict[str, str] | None = None):
        cfg = {"FEDMCP_TLS_CERT": cert, "FEDMCP_TLS_KEY": key}
        cfg.update(env or {})
        super().__init__(cfg)
        self.cert_path, self.key_path = cert, key
        self.ctx = client_ctx(cafile)
        if self.scheme != "https":
            self.stop()
            raise AssertionError(f"TLS configured but the ready line is {self.ready_line!r}")
        self.ws_base = f"wss://{self.host}:{self.port}"
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.ctx))

    def http(self, method: str, path: str, body: Any = None, token: str | None = None,
             headers: dict[str, str] | None = None) -> Resp:
        data = None
        h = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with self.opener.open(req, timeout=WAIT) as r:
                return Resp(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Resp(e.code, e.headers, e.read())

    async def connect(self, token: str, via: str = "header", subprotocols: list[str] | None = None,
                      **kw: Any) -> Client:
        kw.setdefault("ssl", self.ctx)
        return await super().connect(token, via, subprotocols, **kw)

    def log_has(self, text: str) -> bool:
        try:
            with open(self.stderr_path, "rb") as f:
                return text in f.read().decode("utf-8", "replace")
        except OSError:
            return False


class TlsTestCase(ProxyTestCase):
    def setUp(self):
        if OPENSSL is None:
            self.fail("openssl is required for these checks (make test installs it)")
        self.certs = tempfile.mkdtemp(prefix="fedmcp-tls-")
        self.addCleanup(shutil.rmtree, self.certs, True)

    def start_tls(self, cert: str, key: str, cafile: str, env: dict[str, str] | None = None) -> TlsProxy:
        p = TlsProxy(cert, key, cafile, env)
        self.addCleanup(p.stop)
        return p

    def self_signed(self, name: str = "first") -> TlsProxy:
        cert, key = make_pair(self.certs, name)
        return self.start_tls(cert, key, cert)

    def assert_serving(self, p: TlsProxy) -> None:
        self.assertIsNone(p.proc.poll(), f"the proxy exited; stderr:\n{p.stderr_tail()}")
        r = p.http("GET", "/healthz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"status": "ok"})


class Flow(TlsTestCase):
    async def full_flow(self, p: TlsProxy) -> None:
        self.assertTrue(p.ready_line.startswith("listening on https://"), p.ready_line)
        admin = p.admin_token()
        regs = {}
        for sid in ("alice", "bob", "carol"):
            r = p.http("POST", "/v1/servers", {"serverId": sid, "capabilities": {"tls": True}}, token=admin)
            self.assertEqual(r.status, 201, r)
            regs[sid] = r.json()
            self.assertEqual(jwt.decode(regs[sid]["token"], p.secret, algorithms=["HS256"])["serverId"], sid)

        alice = await self.online(p, "alice", {"tls": True}, token=regs["alice"]["token"])
        bob = await self.online(p, "bob", token=regs["bob"]["token"])
        self.assertEqual(alice.subprotocol, "fedmcp.v1")

        # Request to an online recipient: deliver, answer, delivered with the reply.
        rid = await alice.request("federation/send", {"to": "bob", "message": {"n": 1}})
        d = await bob.recv_method("federation/deliver")
        self.assertEqual(d["params"]["from"], "alice")
        self.assertEqual(d["params"]["message"], {"n": 1})
        await bob.answer(d, {"ok": 1})
        r = await alice.recv_id(rid)
        self.assertEqual(r["result"]["status"], "delivered", r)
        self.assertEqual(r["result"]["reply"], {"ok": 1}, r)

        # 900 KB each way over TLS.
        big_out = "a" * BIG
        big_back = "b" * BIG
        rid = await alice.request("federation/send", {"to": "bob", "message": {"blob": big_out}})
        d = await bob.recv_method("federation/deliver", timeout=3 * WAIT)
        self.assertEqual(len(d["params"]["message"]["blob"]), BIG)
        self.assertEqual(d["params"]["message"]["blob"], big_out)
        await bob.answer(d, {"blob": big_back})
        r = await alice.recv_id(rid, timeout=3 * WAIT)
        self.assertEqual(r["result"]["status"], "delivered", {k: str(v)[:200] for k, v in r.items()})
        self.assertEqual(r["result"]["reply"]["blob"], big_back)

        # Queued for an offline server, then the federation/delivered notification.
        rid = await alice.request("federation/send", {"to": "carol", "message": {"q": 1}, "queue": True})
        r = await alice.recv_id(rid)
        self.assertEqual(r["result"]["status"], "queued", r)
        msg_id = r["result"]["msgId"]
        carol = await self.connect(p, regs["carol"]["token"])
        w = await carol.recv_method("federation/welcome")
        self.assertEqual(w["params"]["serverId"], "carol")
        await carol.answer(w, {})
        d = await carol.recv_method("federation/deliver")
        self.assertEqual(d["params"]["msgId"], msg_id)
        self.assertEqual(d["params"]["message"], {"q": 1})
        await carol.answer(d, {"got": "q"})
        n = await alice.recv_method("federation/delivered")
        self.assertEqual(n["params"]["msgId"], msg_id, n)
        self.assertEqual(n["params"]["status"], "delivered", n)
        self.assertEqual(n["params"].get("reply"), {"got": "q"}, n)
        self.assert_serving(p)

    async def test_wss_full_flow_self_signed(self):
        await self.full_flow(self.self_signed())

    async def test_wss_full_flow_ca_signed_chain(self):
        ca_cert, ca_key = make_ca(self.certs, "fedmcp-test-ca")
        cert, key = make_pair(self.certs, "leaf", ca=(ca_cert, ca_key))
        # The client trusts only the CA: the leaf verifies through it.
        p = self.start_tls(cert, key, ca_cert)
        self.assertEqual(peer_cn(p.port, p.ctx), "leaf")
        await self.full_flow(p)

    async def test_untrusted_certificate_is_refused_by_the_client(self):
        p = self.self_signed()
        other, _ = make_pair(self.certs, "stranger")
        with self.assertRaises(ssl.SSLCertVerificationError):
            peer_cn(p.port, client_ctx(other))
        self.assert_serving(p)


class Versions(TlsTestCase):
    async def test_tls12_and_tls13_only(self):
        p = self.self_signed()
        for v, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            with self.subTest(version=name):
                ctx = client_ctx(p.cert_path)
                ctx.minimum_version = v
                ctx.maximum_version = v
                self.assertEqual(tls_handshake(p.port, ctx), name)
        # TLS 1.1: let the client really offer it (OpenSSL 3 refuses below security level 0),
        # so the refusal is the proxy's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = client_ctx(p.cert_path)
            try:
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
                ctx.minimum_version = ssl.TLSVersion.TLSv1
            except (ssl.SSLError, ValueError):
                pass
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)) as cm:
            tls_handshake(p.port, ctx)
        err = cm.exception
        if isinstance(err, ssl.SSLError) and "NO_PROTOCOLS_AVAILABLE" not in str(err):
            # The client offered TLS 1.1; the proxy answered with an alert.
            self.assertIn("ALERT", str(err).upper(), err)
        self.assert_serving(p)

    async def test_curl_https_and_old_protocol(self):
        if CURL is None:
            self.fail("curl is required for these checks (make test installs it)")
        p = self.self_signed()
        resolve = ["--resolve", f"localhost:{p.port}:127.0.0.1"]
        url = f"https://localhost:{p.port}/healthz"
        out = curl("-f", "--cacert", p.cert_path, *resolve, url)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), '{"status":"ok"}')
        out = curl("-f", "--cacert", p.cert_path, "--tlsv1.2", "--tls-max", "1.2", *resolve, url)
        self.assertEqual(out.returncode, 0, out.stderr)
        # Without the CA the certificate does not verify.
        out = curl("-f", *resolve, url)
        self.assertNotEqual(out.returncode, 0, "curl accepted an untrusted certificate")
        # TLS 1.1 at most: no answer. First as the brief states it, then with the client really
        # offering TLS 1.0/1.1 (security level 0), so the proxy is the one saying no.
        out = curl("-f", "--cacert", p.cert_path, "--tls-max", "1.1", *resolve, url)
        self.assertNotEqual(out.returncode, 0, out.stdout)
        out = curl("-f", "--cacert", p.cert_path, "--tlsv1.0", "--tls-max", "1.1",
                   "--ciphers", "DEFAULT:@SECLEVEL=0", *resolve, url)
        self.assertNotEqual(out.returncode, 0, out.stdout)
        self.assertNotIn("status", out.stdout)
        self.assert_serving(p)

    async def test_plain_http_to_tls_port_gets_no_http_answer(self):
        p = self.self_signed()
        got = b""
        with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
            s.settimeout(WAIT)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            deadline = time.monotonic() + WAIT
            try:
                while time.monotonic() < deadline:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except (ConnectionResetError, socket.timeout, TimeoutError):
                pass
        self.assertFalse(got.startswith(b"HTTP/"), f"plain HTTP got an HTTP answer: {got[:200]!r}")
        self.assertNotIn(b'"status"', got)
        if got:
            # Anything sent back is a TLS record (an alert), content type 21.
            self.assertEqual(got[0], 0x15, got[:20])
        self.assert_serving(p)
        # A TLS client right after still works.
        self.assertEqual(peer_cn(p.port, p.ctx), "first")


class Timeouts(TlsTestCase):
    async def test_stalled_tls_handshake_and_missing_head_are_bounded(self):
        cert, key = make_pair(self.certs, "first")
        p = self.start_tls(cert, key, cert, {"FEDMCP_HANDSHAKE_TIMEOUT_MS": "1000"})
        # Half a TLS record header, then silence: the proxy drops the socket after ~1 s.
        with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as s:
            s.settimeout(WAIT)
            s.sendall(b"\x16\x03\x01\x00")
            t0 = time.monotonic()
            got = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except ConnectionResetError:
                pass
            except (socket.timeout, TimeoutError):
                self.fail(f"a stalled TLS handshake was still open after {WAIT}s")
            self.assertLess(time.monotonic() - t0, WAIT)
            self.assertFalse(got.startswith(b"HTTP/"), got[:100])
        # TLS completed but no HTTP head: 408 over TLS, then the connection closes.
        with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT) as raw:
            raw.settimeout(WAIT)
            with p.ctx.wrap_socket(raw, server_hostname="localhost") as s:
                got = b""
                try:
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                except (ssl.SSLError, ConnectionResetError):
                    pass
                except (socket.timeout, TimeoutError):
                    self.fail(f"no answer to a missing head within {WAIT}s: {got[:200]!r}")
        self.assertTrue(got.startswith(b"HTTP/1.1 408"), got[:200])
        self.assert_serving(p)


class Reload(TlsTestCase):
    def wait_cn(self, p: TlsProxy, ctx: ssl.SSLContext, want: str) -> None:
        deadline = time.monotonic() + WAIT
        seen = None
        while time.monotonic() < deadline:
            seen = peer_cn(p.port, ctx)
            if seen == want:
                return
            time.sleep(0.05)
        self.fail(f"new connections still see CN {seen!r}, not {want!r}, {WAIT}s after SIGHUP; "
                  f"stderr:\n{p.stderr_tail()}")

    def wait_log(self, p: TlsProxy, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if p.log_has(text):
                return
            time.sleep(0.05)
        self.fail(f"no log line containing {text!r} within {WAIT}s; stderr:\n{p.stderr_tail()}")

    async def test_sighup_swaps_certificate_and_keeps_it_on_a_bad_file(self):
        live = os.path.join(self.certs, "live")
        os.mkdir(live)
        first_cert, first_key = make_pair(self.certs, "first")
        second_cert, second_key = make_pair(self.certs, "second")
        cert, key = os.path.join(live, "cert.pem"), os.path.join(live, "key.pem")
        shutil.copy(first_cert, cert)
        shutil.copy(first_key, key)
        both = os.path.join(self.certs, "both.pem")
        with open(both, "w") as f:
            for c in (first_cert, second_cert):
                with open(c) as src:
                    f.write(src.read())
        p = self.start_tls(cert, key, both)
        self.assertEqual(peer_cn(p.port, p.ctx), "first")
        # A session open across the reload keeps working.
        alice = await self.online(p, "alice")

        # Replace both files (atomic renames), then SIGHUP.
        for src, dst in ((second_cert, cert), (second_key, key)):
            tmp = dst + ".new"
            shutil.copy(src, tmp)
            os.replace(tmp, dst)
        os.kill(p.proc.pid, signal.SIGHUP)
        self.wait_cn(p, p.ctx, "second")
        self.assert_serving(p)
        r = await alice.call("federation/servers")
        self.assertIn("alice", [s["serverId"] for s in r["result"]["servers"]], r)
        # Only "second" is trusted now: still verifies (the old CN is gone for new connections).
        self.assertEqual(peer_cn(p.port, client_ctx(second_cert)), "second")
        bob = await self.online(p, "bob")
        await bob.close()

        # Junk in the certificate file: SIGHUP keeps the current pair and logs it.
        with open(cert, "w") as f:
            f.write("this is not a certificate\n")
        os.kill(p.proc.pid, signal.SIGHUP)
        self.wait_log(p, "keeping the current certificate")
        self.assertIsNone(p.proc.poll(), f"the proxy exited after a bad SIGHUP:\n{p.stderr_tail()}")
        for _ in range(3):
            self.assertEqual(peer_cn(p.port, p.ctx), "second")
        self.assert_serving(p)
        r = await alice.call("federation/servers")
        self.assertIn("result", r, r)

        # A key that does not match the certificate is also refused on reload.
        shutil.copy(second_cert, cert)
        shutil.copy(first_key, key)
        before = open(p.stderr_path, "rb").read().count(b"keeping the current certificate")
        os.kill(p.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if open(p.stderr_path, "rb").read().count(b"keeping the current certificate") > before:
                break
            time.sleep(0.05)
        else:
            self.fail(f"no second 'keeping the current certificate' line:\n{p.stderr_tail()}")
        self.assertEqual(peer_cn(p.port, p.ctx), "second")
        self.assert_serving(p)


if __name__ == "__main__":
    unittest.main()
