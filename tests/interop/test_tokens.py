"""PyJWT <-> fedmcp: tokens minted on either side are accepted by the other (contract §2)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
import shutil
import time

from fedmcp_harness import (
    InvalidStatus, ProxyTestCase, b64url, b64url_decode, jwt, run_cli, signing_key,
)


def unsigned_jwt(header: dict, claims: dict, sig: bytes = b"") -> str:
    enc = lambda o: b64url(json.dumps(o, separators=(",", ":")).encode())
    return f"{enc(header)}.{enc(claims)}.{b64url(sig)}"


class TokenTests(ProxyTestCase):
    def assert_401(self, r, code):
        self.assert_http_error(r, 401, code)
        www = r.headers.get("WWW-Authenticate", "")
        self.assertRegex(www, r'^Bearer\b.*error="invalid_token"', r.headers)

    async def test_pyjwt_admin_token_lists_servers(self):
        p = self.start_proxy()
        tok = jwt.encode(
            {"serverId": "ops", "type": "admin", "iat": int(time.time()), "exp": int(time.time()) + 300},
            p.secret, algorithm="HS256")
        r = p.http("GET", "/v1/servers", token=tok)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.headers.get("Content-Type", "").startswith("application/json"), r.headers)
        self.assertEqual(r.json(), {"servers": []})
        p.register("alice")
        r = p.http("GET", "/v1/servers", token=tok)
        self.assertEqual(r.status, 200, r)
        servers = r.json()["servers"]
        self.assertEqual([s["serverId"] for s in servers], ["alice"])
        e = servers[0]
        for k in ("serverId", "state", "direction", "endpoints", "capabilities", "connectedAt",
                  "lastSeenAt", "queued", "stats"):
            self.assertIn(k, e, e)
        self.assertEqual(e["state"], "offline", e)
        self.assertEqual(set(e["stats"]), {"sent", "received"}, e)

    async def test_registration_token_verifies_in_pyjwt(self):
        p = self.start_proxy()
        before = int(time.time())
        r = p.http("POST", "/v1/servers", {"serverId": "alice.example:1", "capabilities": {"x": 1}},
                   token=p.admin_token())
        self.assertEqual(r.status, 201, r)
        body = r.json()
        self.assertEqual(set(body), {"serverId", "token", "expiresAt", "signingKey", "signingKeyEpoch"}, body)
        self.assertEqual(body["serverId"], "alice.example:1")
        claims = jwt.decode(body["token"], p.secret, algorithms=["HS256"])
        self.assertEqual(claims["serverId"], "alice.example:1")
        self.assertEqual(claims["type"], "federation")
        self.assertIsInstance(claims["iat"], int)
        self.assertIsInstance(claims["exp"], int)
        self.assertGreaterEqual(claims["iat"], before - 1)
        self.assertLessEqual(claims["iat"], int(time.time()) + 1)
        self.assertEqual(claims["exp"] - claims["iat"], 86400, "default FEDMCP_TOKEN_TTL_SECS")
        self.assertEqual(body["expiresAt"], claims["exp"] * 1000, "expiresAt is ms since the epoch")
        header = jwt.get_unverified_header(body["token"])
        self.assertEqual(header["alg"], "HS256")
        self.assertIn(header.get("typ", "JWT"), ("JWT",))
        # signingKey = base64url(HMAC-SHA256(secret, "fedmcp/v1/sign/" + serverId + "/" + epoch)),
        # no padding; a first registration has epoch 1.
        self.assertNotIn("=", body["signingKey"])
        self.assertEqual(body["signingKeyEpoch"], 1)
        self.assertEqual(b64url_decode(body["signingKey"]), signing_key(p.key, "alice.example:1"))
        # Registering again updates: 200.
        r2 = p.http("POST", "/v1/servers", {"serverId": "alice.example:1"}, token=p.admin_token())
        self.assertEqual(r2.status, 200, r2)
        self.assertEqual(r2.json()["signingKey"], body["signingKey"])
        # POST /v1/token with the federation token gives a fresh one that PyJWT verifies.
        r3 = p.http("POST", "/v1/token", token=body["token"])
        self.assertEqual(r3.status, 200, r3)
        t3 = r3.json()
        self.assertEqual(set(t3), {"token", "expiresAt"}, t3)
        c3 = jwt.decode(t3["token"], p.secret, algorithms=["HS256"])
        self.assertEqual((c3["serverId"], c3["type"]), ("alice.example:1", "federation"))
        self.assertEqual(t3["expiresAt"], c3["exp"] * 1000)

    async def test_token_ttl_setting_is_used(self):
        p = self.start_proxy({"FEDMCP_TOKEN_TTL_SECS": "120"})
        body = p.register("bob")
        claims = jwt.decode(body["token"], p.secret, algorithms=["HS256"])
        self.assertEqual(claims["exp"] - claims["iat"], 120)

    async def test_hs512_and_none_are_unsupported_alg(self):
        p = self.start_proxy()
        now = int(time.time())
        admin = {"serverId": "ops", "type": "admin", "iat": now, "exp": now + 300}
        hs512 = jwt.encode(admin, p.secret + "-padding-for-hs512-keys-0123456789", algorithm="HS512")
        hs512_same_key = jwt.encode(admin, p.secret, algorithm="HS512")
        none = jwt.encode(admin, None, algorithm="none")
        self.assertEqual(jwt.get_unverified_header(none)["alg"], "none")
        hs384 = jwt.encode(admin, p.secret, algorithm="HS384")
        lower = unsigned_jwt({"alg": "hs256", "typ": "JWT"}, admin,
                             hmac.new(p.key, b"x", hashlib.sha256).digest())
        for name, tok in [("HS512", hs512), ("HS512 same key", hs512_same_key), ("none", none),
                          ("HS384", hs384), ("hs256", lower)]:
            with self.subTest(alg=name):
                self.assert_401(p.http("GET", "/v1/servers", token=tok), "unsupported_alg")
        # The same refusal on the federation side and on the control upgrade.
        fed = {"serverId": "alice", "type": "federation", "iat": now, "exp": now + 300}
        for name, tok in [("HS512", jwt.encode(fed, p.secret, algorithm="HS512")),
                          ("none", jwt.encode(fed, None, algorithm="none"))]:
            with self.subTest(endpoint="/v1/token", alg=name):
                self.assert_401(p.http("POST", "/v1/token", token=tok), "unsupported_alg")
            with self.subTest(endpoint="/v1/control", alg=name):
                with self.assertRaises(InvalidStatus) as cm:
                    await p.connect(tok)
                self.assertEqual(cm.exception.response.status_code, 401)
                self.assertEqual(json.loads(cm.exception.response.body)["error"]["code"], "unsupported_alg")

    async def test_other_token_failures(self):
        p = self.start_proxy()
        now = int(time.time())
        self.assert_401(p.http("GET", "/v1/servers"), "missing_token")
        self.assert_401(p.http("GET", "/v1/servers", token="not-a-jwt"), "malformed_token")
        wrong_key = jwt.encode({"serverId": "ops", "type": "admin", "iat": now, "exp": now + 60},
                               "another-secret-of-at-least-32-bytes!!", algorithm="HS256")
        self.assert_401(p.http("GET", "/v1/servers", token=wrong_key), "bad_signature")
        expired = p.token("ops", "admin", ttl=-3600, iat=now - 7200)
        self.assert_401(p.http("GET", "/v1/servers", token=expired), "expired")
        nbf = p.token("ops", "admin", nbf=now + 3600)
        self.assert_401(p.http("GET", "/v1/servers", token=nbf), "not_yet_valid")
        future = p.token("ops", "admin", iat=now + 3600, exp=now + 7200)
        self.assert_401(p.http("GET", "/v1/servers", token=future), "issued_in_future")
        missing = jwt.encode({"serverId": "ops", "type": "admin", "exp": now + 60}, p.secret, algorithm="HS256")
        self.assert_401(p.http("GET", "/v1/servers", token=missing), "malformed_token")
        # A valid token of the wrong type: 403 wrong_type, both ways.
        self.assert_http_error(p.http("GET", "/v1/servers", token=p.token("alice")), 403, "wrong_type")
        self.assert_http_error(p.http("POST", "/v1/token", token=p.admin_token()), 403, "wrong_type")
        # Admin endpoints take only the header: ?token= is not a way in.
        self.assert_401(p.http("GET", "/v1/servers?token=" + p.admin_token()), "missing_token")

    async def test_cli_token_verifies_in_pyjwt(self):
        secret = "cli-secret-" + "0123456789abcdef" * 2
        out = run_cli(["token", "--server-id", "operator", "--admin"], {"FEDMCP_JWT_SECRET": secret})
        self.assertEqual(out.returncode, 0, out.stderr)
        tok = out.stdout.strip()
        self.assertEqual(out.stdout.count("\n"), 1, out.stdout)
        claims = jwt.decode(tok, secret, algorithms=["HS256"])
        self.assertEqual((claims["serverId"], claims["type"]), ("operator", "admin"))
        self.assertEqual(claims["exp"] - claims["iat"], 86400)
        out = run_cli(["token", "--server-id", "alice", "--ttl", "120"], {"FEDMCP_JWT_SECRET": secret})
        self.assertEqual(out.returncode, 0, out.stderr)
        claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
        self.assertEqual((claims["serverId"], claims["type"]), ("alice", "federation"))
        self.assertEqual(claims["exp"] - claims["iat"], 120)
        # The CLI token is accepted by a proxy with the same secret.
        p = self.start_proxy(secret=secret)
        admin = run_cli(["token", "--server-id", "operator", "--admin"], {"FEDMCP_JWT_SECRET": secret})
        r = p.http("GET", "/v1/servers", token=admin.stdout.strip())
        self.assertEqual(r.status, 200, r)

    async def test_cli_token_with_generated_secret(self):
        state = tempfile.mkdtemp(prefix="fedmcp-interop-state-")
        self.addCleanup(shutil.rmtree, state, True)
        out = run_cli(["token", "--server-id", "operator", "--admin"], {"FEDMCP_STATE_DIR": state})
        self.assertEqual(out.returncode, 0, out.stderr)
        path = os.path.join(state, "jwt-secret")
        self.assertTrue(os.path.isfile(path), os.listdir(state))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path, "rb") as f:
            secret = f.read().strip()
        self.assertRegex(secret.decode(), r"^[0-9a-f]{64}$")
        claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
        self.assertEqual((claims["serverId"], claims["type"]), ("operator", "admin"))
        # A proxy on the same state dir keeps that secret and accepts the token.
        p = self.start_proxy(secret="", state_dir=state)
        r = p.http("GET", "/v1/servers", token=out.stdout.strip())
        self.assertEqual(r.status, 200, r)
        with open(path, "rb") as f:
            self.assertEqual(f.read().strip(), secret)

    async def test_previous_secret_is_accepted(self):
        old = "old-secret-" + "x" * 32
        p = self.start_proxy({"FEDMCP_JWT_PREVIOUS_SECRET": old})
        tok = p.token("ops", "admin", key=old.encode())
        self.assertEqual(p.http("GET", "/v1/servers", token=tok).status, 200)

    async def test_jti_revocation_with_pyjwt_and_websockets(self):
        """v1.1 §2: every issued token has a jti (read here with PyJWT); revoking it refuses
        the token everywhere, closes the session opened with it (4001), and covers admin
        tokens minted by PyJWT with a jti of their own."""
        p = self.start_proxy()
        body = p.register("alice")
        claims = jwt.decode(body["token"], p.secret, algorithms=["HS256"])
        self.assertRegex(claims.get("jti", ""), r"^[0-9a-f]{32}$", claims)
        c = await p.online("alice", token=body["token"])
        r = p.http("DELETE", "/v1/tokens/" + claims["jti"], token=p.admin_token())
        self.assertEqual(r.status, 204, r)
        self.assertEqual(await c.expect_close(), 4001)
        self.assert_401(p.http("POST", "/v1/token", token=body["token"]), "revoked")
        with self.assertRaises(InvalidStatus) as e:
            await p.connect(body["token"])
        self.assertEqual(e.exception.response.status_code, 401)
        # A fresh token for the same server is not affected.
        fresh = p.http("POST", "/v1/servers", {"serverId": "alice"}, token=p.admin_token()).json()
        c2 = await p.online("alice", token=fresh["token"])
        await c2.close()
        # An operator's own admin token, minted with PyJWT and a jti, revoked by another.
        now = int(time.time())
        ops = jwt.encode({"serverId": "ops", "type": "admin", "iat": now, "exp": now + 300,
                          "jti": "ops-laptop-1"}, p.secret, algorithm="HS256")
        self.assertEqual(p.http("GET", "/v1/servers", token=ops).status, 200)
        self.assertEqual(p.http("DELETE", "/v1/tokens/ops-laptop-1", token=p.admin_token()).status, 204)
        self.assert_401(p.http("GET", "/v1/servers", token=ops), "revoked")

    async def test_signing_key_rotation_moves_the_epoch(self):
        """v1.1 §6: the key is HMAC(secret, "fedmcp/v1/sign/" + id + "/" + epoch); a rotation
        or a removal and new registration moves to the next epoch."""
        p = self.start_proxy()
        b1 = p.register("alice")
        self.assertEqual(b1["signingKeyEpoch"], 1)
        self.assertEqual(b64url_decode(b1["signingKey"]), signing_key(p.key, "alice", 1))
        r = p.http("POST", "/v1/servers/alice/signing-key", token=p.admin_token())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["signingKeyEpoch"], 2)
        self.assertEqual(b64url_decode(r.json()["signingKey"]), signing_key(p.key, "alice", 2))
        self.assertEqual(p.http("DELETE", "/v1/servers/alice", token=p.admin_token()).status, 204)
        b3 = p.register("alice")
        self.assertEqual(b3["signingKeyEpoch"], 3, b3)
        self.assertEqual(b64url_decode(b3["signingKey"]), signing_key(p.key, "alice", 3))
