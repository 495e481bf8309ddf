"""The HTTP data channel with `curl`: register, /healthz, /metrics (contract §3, §8)."""

from __future__ import annotations

import json
import shutil
import subprocess

from fedmcp_harness import ProxyTestCase, WAIT, clean_env, jwt

CURL = shutil.which("curl")


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(WAIT)), *args],
        capture_output=True, text=True, timeout=WAIT + 5, env=clean_env(), stdin=subprocess.DEVNULL)


class Curl(ProxyTestCase):
    def setUp(self):
        # `make test` installs curl (target test-tools): its absence is a failure, not a skip.
        self.assertIsNotNone(CURL, "curl is required for the interop suite (make test installs it)")

    async def test_unauthenticated_body_is_refused_from_the_head(self):
        """v1.1 §3: a POST without a token announcing 1 MiB is answered 401 before the body
        is read, and curl's `Expect: 100-continue` gets no `100 Continue`."""
        import os
        import tempfile
        p = self.start_proxy()
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(b"{" + b" " * (1024 * 1024 - 2) + b"}")
            path = f.name
        try:
            out = curl("-v", "-X", "POST", "-H", "Content-Type: application/json",
                       "-H", "Expect: 100-continue", "--data-binary", "@" + path,
                       "-w", "\n%{http_code} %{size_upload}", p.base + "/v1/servers")
        finally:
            os.unlink(path)
        body, status = out.stdout.rsplit("\n", 1)
        code, uploaded = status.split()
        self.assertEqual(code, "401", out.stderr)
        self.assertEqual(json.loads(body)["error"]["code"], "missing_token")
        self.assertNotIn("HTTP/1.1 100", out.stderr)
        self.assertLess(int(float(uploaded)), 1024 * 1024, "curl did not have to send the body")

    async def test_register_health_metrics_with_curl(self):
        p = self.start_proxy()
        admin = p.admin_token()
        out = curl("-f", "-X", "POST", "-H", f"Authorization: Bearer {admin}",
                   "-H", "Content-Type: application/json",
                   "--data", '{"serverId":"curl-srv","capabilities":{"via":"curl"}}',
                   "-w", "\n%{http_code}", p.base + "/v1/servers")
        self.assertEqual(out.returncode, 0, out.stderr)
        body, code = out.stdout.rsplit("\n", 1)
        self.assertEqual(code, "201")
        reg = json.loads(body)
        self.assertEqual(reg["serverId"], "curl-srv")
        claims = jwt.decode(reg["token"], p.secret, algorithms=["HS256"])
        self.assertEqual(claims["serverId"], "curl-srv")
        out = curl("-f", "-H", f"Authorization: Bearer {admin}", p.base + "/v1/servers/curl-srv")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)["capabilities"], {"via": "curl"})
        # The registration token is usable on the control channel.
        c = await self.online(p, "curl-srv", token=reg["token"])
        self.assertEqual(c.subprotocol, "fedmcp.v1")

        out = curl("-sf", p.base + "/healthz")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), {"status": "ok"})
        out = curl("-sf", p.base + "/readyz")
        self.assertEqual(out.returncode, 0, out.stderr)

        out = curl("-sf", "-D", "-", p.base + "/metrics")
        self.assertEqual(out.returncode, 0, out.stderr)
        head, _, text = out.stdout.replace("\r\n", "\n").partition("\n\n")
        ctype = [l.split(":", 1)[1].strip() for l in head.splitlines() if l.lower().startswith("content-type:")]
        self.assertTrue(ctype and ctype[0].startswith("text/plain"), head)
        self.assertIn("version=0.0.4", ctype[0])
        for name in ("fedmcp_connections", "fedmcp_servers_online", "fedmcp_messages_total",
                     "fedmcp_auth_failures_total", "fedmcp_delivery_seconds", "fedmcp_queue_messages",
                     "fedmcp_resident_memory_bytes"):
            self.assertRegex(text, rf"(?m)^# TYPE {name} \w+$", name)
        self.assertRegex(text, r"(?m)^fedmcp_servers_online 1(\.0)?$")
        self.assertRegex(text, r"(?m)^fedmcp_delivery_seconds_bucket\{.*le=\"\+Inf\".*\} \d+")

    async def test_curl_errors(self):
        p = self.start_proxy()
        out = curl("-o", "/dev/null", "-w", "%{http_code}", p.base + "/v1/servers")
        self.assertEqual(out.stdout, "401")
        out = curl("-f", "-o", "/dev/null", p.base + "/no/such/path")
        self.assertEqual(out.returncode, 22, "curl -f fails on a 4xx")
        out = curl("-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", p.base + "/healthz")
        self.assertEqual(out.stdout, "405")
