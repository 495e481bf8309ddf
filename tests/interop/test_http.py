"""Process start-up (§1) and the registry endpoints (§3) seen from a plain HTTP client."""

from __future__ import annotations

from fedmcp_harness import ProxyTestCase, run_cli


class Startup(ProxyTestCase):
    def run_bad(self, env: dict[str, str]):
        base = {"FEDMCP_LISTEN": "127.0.0.1:0", "FEDMCP_STATE_DIR": "", "FEDMCP_JWT_SECRET": "s" * 40}
        base.update(env)
        return run_cli([], base)

    async def test_bad_configuration_exits_2_with_one_line(self):
        cases = {
            "FEDMCP_MAX_SERVERS": {"FEDMCP_MAX_SERVERS": "0"},
            "FEDMCP_RATE_LIMIT": {"FEDMCP_RATE_LIMIT": "lots"},
            "FEDMCP_LISTEN": {"FEDMCP_LISTEN": "0.0.0.0:0"},
            "FEDMCP_TLS_KEY": {"FEDMCP_TLS_CERT": "/etc/hostname"},
        }
        for var, env in cases.items():
            with self.subTest(var=var):
                out = self.run_bad(env)
                self.assertEqual(out.returncode, 2, out)
                self.assertEqual(out.stdout, "", "nothing on stdout: it never listened")
                lines = out.stderr.splitlines()
                self.assertEqual(len(lines), 1, out.stderr)
                self.assertIn(var, lines[0])

    async def test_short_secret_is_refused_without_showing_it(self):
        secret = "short-secret-XYZ"
        out = self.run_bad({"FEDMCP_JWT_SECRET": secret})
        self.assertEqual(out.returncode, 2, out)
        self.assertEqual(len(out.stderr.splitlines()), 1, out.stderr)
        self.assertIn("FEDMCP_JWT_SECRET", out.stderr)
        self.assertNotIn(secret, out.stderr)

    async def test_ready_line_and_health(self):
        p = self.start_proxy()
        self.assertRegex(p.ready_line, r"^listening on http://127\.0\.0\.1:[1-9]\d*$")
        r = p.http("GET", "/healthz")
        self.assertEqual((r.status, r.json()), (200, {"status": "ok"}))
        self.assertEqual(p.http("GET", "/readyz").status, 200)


class Registry(ProxyTestCase):
    async def test_registration_validation(self):
        p = self.start_proxy()
        admin = p.admin_token()
        bad = [
            {"serverId": "has space"},
            {"serverId": ""},
            {"serverId": "x" * 65},
            {"serverId": "ok", "capabilities": [1]},
            {"serverId": "ok", "endpoints": {"control": "ftp://example.org/"}},
            {"serverId": "ok", "endpoints": {"data": "ws://example.org/"}},
            {"capabilities": {}},
        ]
        for body in bad:
            with self.subTest(body=body):
                r = p.http("POST", "/v1/servers", body, token=admin)
                self.assertEqual(r.status, 400, r)
                self.assertIsInstance(r.json()["error"]["code"], str)
        r = p.http("POST", "/v1/servers", b"{not json", token=admin)
        self.assertEqual(r.status, 400, r)
        ok = {"serverId": "A-z.0_9:x", "endpoints": {"data": "https://example.org/mcp"},
              "capabilities": {"tools": []}}
        r = p.http("POST", "/v1/servers", ok, token=admin)
        self.assertEqual(r.status, 201, r)
        e = p.http("GET", "/v1/servers/A-z.0_9:x", token=admin).json()
        self.assertEqual(e["endpoints"], {"data": "https://example.org/mcp"}, e)
        self.assertEqual(e["capabilities"], {"tools": []}, e)
        self.assertEqual((e["state"], e["direction"], e["connectedAt"], e["queued"]), ("offline", None, None, 0), e)
        self.assertEqual(e["stats"], {"sent": 0, "received": 0}, e)
        self.assert_http_error(p.http("GET", "/v1/servers/nobody", token=admin), 404, "unknown_server")

    async def test_registry_full(self):
        p = self.start_proxy({"FEDMCP_MAX_SERVERS": "2"})
        p.register("a")
        p.register("b")
        r = p.http("POST", "/v1/servers", {"serverId": "c"}, token=p.admin_token())
        self.assert_http_error(r, 507, "registry_full")
        # Updating an existing one still works.
        self.assertEqual(p.http("POST", "/v1/servers", {"serverId": "a"}, token=p.admin_token()).status, 200)
