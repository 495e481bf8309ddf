"""The §4 control channel with the `websockets` client: every flow, close codes, signing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

from fedmcp_harness import (
    InvalidStatus, ProxyTestCase, b64url_decode, jwt, message_sig, raw_member,
)



def send_params(to, message=None, **kw):
    p = {"to": to, "message": message if message is not None else {"hello": to}}
    p.update(kw)
    return p


class Handshake(ProxyTestCase):
    async def test_header_auth_subprotocol_and_welcome(self):
        p = self.start_proxy()
        tok = p.token("alice", ttl=600)
        exp = jwt.decode(tok, p.secret, algorithms=["HS256"])["exp"]
        c = await self.connect(p, tok, via="header")
        self.assertEqual(c.subprotocol, "fedmcp.v1")
        w = await c.recv()
        self.assertEqual(w.get("jsonrpc"), "2.0", w)
        self.assertEqual(w.get("method"), "federation/welcome", w)
        self.assertIsNotNone(w.get("id"), "the welcome is a request")
        params = w["params"]
        self.assertEqual(set(params), {"serverId", "sessionId", "expiresAt", "heartbeatMs", "limits"}, params)
        self.assertEqual(params["serverId"], "alice")
        self.assertIsInstance(params["sessionId"], str)
        self.assertTrue(params["sessionId"])
        self.assertEqual(params["expiresAt"], exp * 1000)
        self.assertEqual(params["heartbeatMs"], 15000)
        self.assertEqual(params["limits"], {"maxMessageBytes": 1048576, "ratePerSec": 1000, "burst": 2000})

    async def test_query_token_and_configured_limits(self):
        p = self.start_proxy({"FEDMCP_HEARTBEAT_MS": "2500", "FEDMCP_RATE_LIMIT": "50/s,burst=70",
                              "FEDMCP_MAX_MESSAGE_BYTES": "65536"})
        tok = p.token("bob")
        c = await self.connect(p, urllib.parse.quote(tok, safe=""), via="query",
                               subprotocols=["other.v9", "fedmcp.v1"])
        self.assertEqual(c.subprotocol, "fedmcp.v1")
        w = await c.recv_method("federation/welcome")
        self.assertEqual(w["params"]["serverId"], "bob")
        self.assertEqual(w["params"]["heartbeatMs"], 2500)
        self.assertEqual(w["params"]["limits"], {"maxMessageBytes": 65536, "ratePerSec": 50, "burst": 70})
        # Two sessions get distinct session ids.
        c2 = await self.connect(p, p.token("carol"))
        w2 = await c2.recv_method("federation/welcome")
        self.assertNotEqual(w["params"]["sessionId"], w2["params"]["sessionId"])

    async def test_bad_token_is_401_before_upgrade(self):
        p = self.start_proxy()
        cases = {
            "missing_token": None,
            "bad_signature": jwt.encode({"serverId": "a", "type": "federation", "iat": int(time.time()),
                                         "exp": int(time.time()) + 60}, "z" * 40, algorithm="HS256"),
            "wrong_type": p.admin_token(),
        }
        for code, tok in cases.items():
            with self.subTest(code=code):
                with self.assertRaises(InvalidStatus) as cm:
                    if tok is None:
                        await p.connect("", via="none")
                    else:
                        await p.connect(tok)
                status = cm.exception.response.status_code
                self.assertEqual(status, 403 if code == "wrong_type" else 401)
                self.assertEqual(json.loads(cm.exception.response.body)["error"]["code"], code)

    async def test_connecting_until_welcome_answered(self):
        p = self.start_proxy()
        p.register("alice")
        bob = await self.online(p, "bob")
        a = await self.connect(p, p.token("alice"))
        w = await a.recv_method("federation/welcome")
        entry = p.http("GET", "/v1/servers/alice", token=p.admin_token()).json()
        self.assertEqual(entry["state"], "connecting", entry)
        r = await bob.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["bob"])
        # Not yet a recipient...
        r = await bob.call("federation/send", send_params("alice"))
        self.assert_rpc_error(r, -32002, "server_offline")
        # ...but it may send.
        rid = await a.request("federation/send", send_params("bob", {"early": True}))
        d = await bob.recv_method("federation/deliver")
        self.assertEqual(d["params"]["from"], "alice")
        await bob.answer(d, "ok")
        self.assertEqual((await a.recv_id(rid))["result"]["status"], "delivered")
        caps = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}], "x-flag": True}
        await a.answer(w, {"capabilities": caps})
        r = await a.call("federation/servers")
        servers = {s["serverId"]: s for s in r["result"]["servers"]}
        self.assertEqual(set(servers), {"alice", "bob"})
        self.assertEqual(servers["alice"], {"serverId": "alice", "capabilities": caps})
        self.assertEqual(servers["bob"]["serverId"], "bob")
        entry = p.http("GET", "/v1/servers/alice", token=p.admin_token()).json()
        self.assertEqual(entry["state"], "online", entry)
        self.assertEqual(entry["direction"], "inbound", entry)
        self.assertEqual(entry["capabilities"], caps, entry)
        self.assertIsInstance(entry["connectedAt"], int, entry)
        self.assertGreater(entry["connectedAt"], 10**12, "connectedAt is ms since the epoch")
        self.assertGreaterEqual(entry["stats"]["sent"], 1, entry)

    async def test_welcome_not_answered_closes_1008(self):
        p = self.start_proxy({"FEDMCP_HANDSHAKE_TIMEOUT_MS": "300"})
        c = await self.connect(p, p.token("slow"))
        await c.recv_method("federation/welcome")
        self.assertEqual(await c.expect_close(5), 1008)

    async def test_replaced_session_closed_4003(self):
        p = self.start_proxy()
        old = await self.online(p, "alice")
        new = await self.connect(p, p.token("alice"))
        w = await new.recv_method("federation/welcome")
        self.assertEqual(await old.expect_close(), 4003)
        await new.answer(w, {})
        r = await new.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["alice"])

    async def test_server_delete_closes_4001_and_revokes(self):
        p = self.start_proxy()
        tok = p.token("bob", iat=int(time.time()) - 5)
        p.register("bob")
        bob = await self.online(p, "bob", token=tok)
        alice = await self.online(p, "alice")
        r = p.http("DELETE", "/v1/servers/bob", token=p.admin_token())
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"")
        self.assertEqual(await bob.expect_close(), 4001)
        self.assert_http_error(p.http("GET", "/v1/servers/bob", token=p.admin_token()), 404, "unknown_server")
        # A token issued before the removal is refused: revoked.
        with self.assertRaises(InvalidStatus) as cm:
            await p.connect(tok)
        self.assertEqual(cm.exception.response.status_code, 401)
        self.assertEqual(json.loads(cm.exception.response.body)["error"]["code"], "revoked")
        r = await alice.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["alice"])


class Messaging(ProxyTestCase):
    async def test_request_deliver_answer_delivered_and_sig(self):
        p = self.start_proxy()
        reg = p.register("bob")
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        raw_message = '{ "x" : 1.50, "s": "caf\\u00e9 \u00e9", "n": [1,2 ,3] }'
        before = int(time.time() * 1000)
        await alice.send_raw('{"jsonrpc":"2.0","id":"req-1","method":"federation/send",'
                             '"params":{"to":"bob","message":' + raw_message + '}}')
        text, d = await bob.recv_method("federation/deliver", raw=True)
        self.assertEqual(d.get("jsonrpc"), "2.0")
        self.assertIsNotNone(d.get("id"), "a request when the sender awaits an answer")
        params = d["params"]
        self.assertEqual(set(params), {"msgId", "from", "message", "sentAt", "sig"}, params)
        self.assertEqual(params["from"], "alice")
        self.assertIsInstance(params["msgId"], str)
        self.assertTrue(params["msgId"])
        self.assertLessEqual(before - 1000, params["sentAt"])
        self.assertLessEqual(params["sentAt"], int(time.time() * 1000) + 1000)
        msg_bytes = raw_member(text, "params", "message")
        self.assertEqual(msg_bytes, raw_message, "message forwarded byte for byte")
        # sig = base64url(HMAC(K_bob, msgId \n from \n message_bytes)), K_bob from registration.
        k_bob = b64url_decode(reg["signingKey"])
        self.assertEqual(params["sig"], message_sig(k_bob, params["msgId"], "alice", msg_bytes.encode()))
        self.assertNotEqual(params["sig"], message_sig(p.signing_key("alice"), params["msgId"], "alice",
                                                        msg_bytes.encode()))
        await bob.answer(d, {"ok": True, "n": 2})
        r = await alice.recv_id("req-1")
        self.assertEqual(r.get("jsonrpc"), "2.0")
        self.assertEqual(r["result"], {"msgId": params["msgId"], "status": "delivered", "reply": {"ok": True, "n": 2}})
        stats = p.http("GET", "/v1/servers/bob", token=p.admin_token()).json()["stats"]
        self.assertGreaterEqual(stats["received"], 1, stats)

    async def test_order_per_sender_and_recipient(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        for i in range(50):
            await alice.notify("federation/send", send_params("bob", i))
        rids = [await alice.request("federation/send", send_params("bob", 100 + i)) for i in range(10)]
        got = [(await bob.recv_method("federation/deliver")) for _ in range(60)]
        self.assertEqual([d["params"]["message"] for d in got], list(range(50)) + list(range(100, 110)))
        for d in got[50:]:
            await bob.answer(d, d["params"]["message"])
        for i, rid in enumerate(rids):
            self.assertEqual((await alice.recv_id(rid))["result"]["reply"], 100 + i)

    async def test_rejected(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        rid = await alice.request("federation/send", send_params("bob"))
        d = await bob.recv_method("federation/deliver")
        err = {"code": -1234, "message": "no thanks", "data": {"why": "busy"}}
        await bob.answer_error(d, err)
        r = await alice.recv_id(rid)
        self.assertEqual(r["result"], {"msgId": d["params"]["msgId"], "status": "rejected", "error": err})

    async def test_unknown_and_offline(self):
        p = self.start_proxy()
        p.register("bob")
        alice = await self.online(p, "alice")
        self.assert_rpc_error(await alice.call("federation/send", send_params("nobody")), -32001, "unknown_server")
        self.assert_rpc_error(await alice.call("federation/send", send_params("bob")), -32002, "server_offline")
        self.assert_rpc_error(await alice.call("federation/send", send_params("bob", queue=False)),
                              -32002, "server_offline")
        # A server that went offline after being online.
        carol = await self.online(p, "carol")
        await carol.close()
        await asyncio.sleep(0.2)
        self.assert_rpc_error(await alice.call("federation/send", send_params("carol")), -32002, "server_offline")
        # Bad params.
        self.assert_rpc_error(await alice.call("federation/send", {"message": 1}), -32602, "invalid_params")

    async def test_delivery_timeout(self):
        p = self.start_proxy({"FEDMCP_DELIVERY_TIMEOUT_MS": "300"})
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        rid = await alice.request("federation/send", send_params("bob"))
        await bob.recv_method("federation/deliver")
        self.assert_rpc_error(await alice.recv_id(rid, timeout=5), -32003, "delivery_timeout")

    async def test_notification_forward(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        await alice.notify("federation/send", send_params("bob", [1, "two", None]))
        text, d = await bob.recv_method("federation/deliver", raw=True)
        self.assertNotIn("id", d, "forwarded as a notification")
        self.assertEqual(d["params"]["from"], "alice")
        self.assertEqual(d["params"]["message"], [1, "two", None])
        self.assertEqual(d["params"]["sig"], message_sig(p.signing_key("bob"), d["params"]["msgId"], "alice",
                                                         raw_member(text, "params", "message").encode()))
        # Nothing comes back to the sender: its next answer is the one to its next request.
        r = await alice.call("federation/servers")
        self.assertIn("result", r)
        await alice.expect_nothing(0.3)
        # A notification to an unknown server is silently dropped too.
        await alice.notify("federation/send", send_params("nobody"))
        await alice.call("federation/servers")
        await alice.expect_nothing(0.3)

    async def test_broadcast(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        carol = await self.online(p, "carol")
        p.register("dave")  # registered but offline: not a recipient
        r = await alice.call("federation/send", send_params("*", {"all": 1}))
        res = r["result"]
        self.assertEqual(res["status"], "broadcast", r)
        self.assertEqual(res["recipients"], 2, r)
        self.assertIsInstance(res["msgId"], str)
        for name, c in (("bob", bob), ("carol", carol)):
            text, d = await c.recv_method("federation/deliver", raw=True)
            self.assertNotIn("id", d, "broadcast deliveries are notifications")
            self.assertEqual(d["params"]["from"], "alice")
            self.assertEqual(d["params"]["msgId"], res["msgId"])
            self.assertEqual(d["params"]["message"], {"all": 1})
            self.assertEqual(d["params"]["sig"], message_sig(p.signing_key(name), res["msgId"], "alice",
                                                             raw_member(text, "params", "message").encode()))
        await alice.call("federation/servers")
        await alice.expect_nothing(0.2)

    async def test_queue_to_offline_then_deliver_on_connect(self):
        p = self.start_proxy()
        p.register("bob")
        alice = await self.online(p, "alice")
        ids = []
        for i in range(3):
            r = await alice.call("federation/send", send_params("bob", {"n": i}, queue=True))
            self.assertEqual(set(r["result"]), {"msgId", "status"}, r)
            self.assertEqual(r["result"]["status"], "queued", r)
            ids.append(r["result"]["msgId"])
        self.assertEqual(len(set(ids)), 3)
        entry = p.http("GET", "/v1/servers/bob", token=p.admin_token()).json()
        self.assertEqual(entry["queued"], 3, entry)
        bob = await self.connect(p, p.token("bob"))
        w = await bob.recv_method("federation/welcome")
        await bob.answer(w, {})
        got = []
        for i in range(3):
            text, d = await bob.recv_method("federation/deliver", raw=True)
            got.append(d)
            self.assertIsNotNone(d.get("id"), "the sender awaits an answer")
            self.assertEqual(d["params"]["from"], "alice")
            self.assertEqual(d["params"]["sig"], message_sig(p.signing_key("bob"), d["params"]["msgId"], "alice",
                                                             raw_member(text, "params", "message").encode()))
        self.assertEqual([d["params"]["msgId"] for d in got], ids, "delivered in order")
        self.assertEqual([d["params"]["message"] for d in got], [{"n": 0}, {"n": 1}, {"n": 2}])
        await bob.answer(got[0], {"done": 0})
        await bob.answer_error(got[1], {"code": 7, "message": "nope"})
        await bob.answer(got[2], None)
        notes = [await alice.recv_method("federation/delivered") for _ in range(3)]
        for n in notes:
            self.assertNotIn("id", n, "federation/delivered is a notification")
        by_id = {n["params"]["msgId"]: n["params"] for n in notes}
        self.assertEqual(by_id[ids[0]], {"msgId": ids[0], "status": "delivered", "reply": {"done": 0}})
        self.assertEqual(by_id[ids[1]], {"msgId": ids[1], "status": "rejected", "error": {"code": 7, "message": "nope"}})
        self.assertEqual(by_id[ids[2]]["status"], "delivered")
        self.assertIsNone(by_id[ids[2]].get("reply", None))
        entry = p.http("GET", "/v1/servers/bob", token=p.admin_token()).json()
        self.assertEqual(entry["queued"], 0, entry)

    async def test_queued_notification_delivered_on_connect(self):
        p = self.start_proxy()
        p.register("bob")
        alice = await self.online(p, "alice")
        await alice.notify("federation/send", send_params("bob", {"later": True}, queue=True))
        await alice.call("federation/servers")
        bob = await self.connect(p, p.token("bob"))
        w = await bob.recv_method("federation/welcome")
        await bob.answer(w, {})
        d = await bob.recv_method("federation/deliver")
        self.assertEqual(d["params"]["message"], {"later": True})
        self.assertNotIn("id", d)

    async def test_ttl_expiry(self):
        p = self.start_proxy()
        p.register("bob")
        alice = await self.online(p, "alice")
        r = await alice.call("federation/send", send_params("bob", {"stale": 1}, queue=True, ttlMs=200))
        self.assertEqual(r["result"]["status"], "queued")
        keep = await alice.call("federation/send", send_params("bob", {"fresh": 1}, queue=True, ttlMs=60000))
        n = await alice.recv_method("federation/delivered", timeout=5)
        self.assertEqual(n["params"]["msgId"], r["result"]["msgId"])
        self.assertEqual(n["params"]["status"], "expired")
        entry = p.http("GET", "/v1/servers/bob", token=p.admin_token()).json()
        self.assertEqual(entry["queued"], 1, entry)
        bob = await self.connect(p, p.token("bob"))
        w = await bob.recv_method("federation/welcome")
        await bob.answer(w, {})
        d = await bob.recv_method("federation/deliver")
        self.assertEqual(d["params"]["msgId"], keep["result"]["msgId"], "the expired one is not delivered")
        await bob.answer(d, 1)
        n = await alice.recv_method("federation/delivered")
        self.assertEqual((n["params"]["msgId"], n["params"]["status"]), (keep["result"]["msgId"], "delivered"))
        await bob.call("federation/servers")
        await bob.expect_nothing(0.3)

    async def test_queue_full(self):
        p = self.start_proxy({"FEDMCP_QUEUE_MAX_MESSAGES": "2"})
        p.register("bob")
        alice = await self.online(p, "alice")
        for _ in range(2):
            r = await alice.call("federation/send", send_params("bob", queue=True))
            self.assertEqual(r["result"]["status"], "queued", r)
        self.assert_rpc_error(await alice.call("federation/send", send_params("bob", queue=True)),
                              -32005, "queue_full")

    async def test_http_post_messages(self):
        p = self.start_proxy()
        reg = p.register("alice")
        bob = await self.online(p, "bob")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, lambda: p.http("POST", "/v1/messages",
                                                        {"to": "bob", "message": {"via": "http"}},
                                                        token=reg["token"]))
        d = await bob.recv_method("federation/deliver")
        self.assertEqual(d["params"]["from"], "alice")
        await bob.answer(d, {"got": "it"})
        r = await asyncio.wait_for(fut, 10)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"msgId": d["params"]["msgId"], "status": "delivered", "reply": {"got": "it"}})
        r = await loop.run_in_executor(None, lambda: p.http("POST", "/v1/messages",
                                                            {"to": "nobody", "message": 1}, token=reg["token"]))
        self.assertGreaterEqual(r.status, 400, r)
        self.assertEqual(r.json()["error"]["code"], "unknown_server", r)


class Framing(ProxyTestCase):
    async def test_batch(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        await alice.send([
            {"jsonrpc": "2.0", "id": 1, "method": "federation/servers"},
            {"jsonrpc": "2.0", "id": 2, "method": "federation/send", "params": send_params("bob", {"b": 1})},
            {"jsonrpc": "2.0", "method": "federation/servers"},
            {"jsonrpc": "2.0", "id": 3, "method": "no/such/method"},
            {"jsonrpc": "2.0", "id": 4, "method": "federation/send", "params": send_params("nobody")},
        ])
        d = await bob.recv_method("federation/deliver")
        await bob.answer(d, "B")
        arr = await alice.recv_match(lambda m: isinstance(m, list))
        by_id = {m["id"]: m for m in arr}
        self.assertEqual(len(arr), 4, arr)
        self.assertEqual(set(by_id), {1, 2, 3, 4}, arr)
        self.assertEqual(len(by_id[1]["result"]["servers"]), 2)
        self.assertEqual(by_id[2]["result"], {"msgId": d["params"]["msgId"], "status": "delivered", "reply": "B"})
        self.assert_rpc_error(by_id[3], -32601, "method_not_found")
        self.assert_rpc_error(by_id[4], -32001, "unknown_server")
        # A batch of notifications only gets no answer at all.
        await alice.send([{"jsonrpc": "2.0", "method": "federation/servers"}])
        await alice.call("federation/servers")
        await alice.expect_nothing(0.2)

    async def test_empty_batch_and_invalid_requests(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        await alice.send_raw("[]")
        r = await alice.recv()
        self.assertIsInstance(r, dict, "an empty batch gets a single error, as JSON-RPC says")
        self.assertIsNone(r["id"])
        self.assert_rpc_error(r, -32600, "invalid_request")
        await alice.send_raw('{"jsonrpc":"1.0","id":9,"method":"federation/servers"}')
        self.assert_rpc_error(await alice.recv(), -32600, "invalid_request")
        await alice.send_raw("[1]")
        arr = await alice.recv()
        self.assertIsInstance(arr, list)
        self.assertIsNone(arr[0]["id"])
        self.assert_rpc_error(arr[0], -32600, "invalid_request")

    async def test_parse_error_keeps_session(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        await alice.send_raw('{"jsonrpc": "2.0", "id": 1, "method": ')
        r = await alice.recv()
        self.assertIn("id", r)
        self.assertIsNone(r["id"])
        self.assert_rpc_error(r, -32700, "parse_error")
        await alice.send_raw("[{]")
        self.assert_rpc_error(await alice.recv(), -32700, "parse_error")
        r = await alice.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["alice"])

    async def test_binary_frame_closes_1003(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        await alice.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"federation/servers"}')
        self.assertEqual(await alice.expect_close(), 1003)

    async def test_oversize_message_closes_1009(self):
        p = self.start_proxy({"FEDMCP_MAX_MESSAGE_BYTES": "4096"})
        alice = self.track(await p.connect(p.token("alice")))
        w = await alice.recv_method("federation/welcome")
        self.assertEqual(w["params"]["limits"]["maxMessageBytes"], 4096)
        await alice.answer(w, {})
        # Just under the limit is fine.
        head = '{"jsonrpc":"2.0","id":1,"method":"federation/servers","params":{"pad":"'
        msg = head + "x" * (4096 - len(head) - 3) + '"}}'
        self.assertEqual(len(msg), 4096)
        await alice.send_raw(msg)
        r = await alice.recv_id(1)
        self.assertIn("result", r)
        await alice.send_raw(head + "x" * 5000 + '"}}')
        self.assertEqual(await alice.expect_close(), 1009)


class SessionLife(ProxyTestCase):
    async def test_refresh(self):
        p = self.start_proxy()
        now = int(time.time())
        tok = p.token("alice", ttl=2)
        alice = self.track(await p.connect(tok))
        w = await alice.recv_method("federation/welcome")
        await alice.answer(w, {})
        r = await alice.call("federation/refresh")
        res = r["result"]
        self.assertEqual(set(res), {"token", "expiresAt"}, res)
        claims = jwt.decode(res["token"], p.secret, algorithms=["HS256"])
        self.assertEqual((claims["serverId"], claims["type"]), ("alice", "federation"))
        self.assertEqual(res["expiresAt"], claims["exp"] * 1000)
        self.assertGreater(claims["exp"], now + 3600)
        # The session now ends at the new expiry: it outlives the first token.
        await asyncio.sleep(max(0.0, now + 2 - time.time()) + 1.2)
        r = await alice.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["alice"])
        self.assertFalse([m for _, m in alice.pending if m.get("method") not in ("federation/tokenExpiring",)],
                         alice.pending)
        # The new token works elsewhere.
        self.assertEqual(p.http("POST", "/v1/token", token=res["token"]).status, 200)

    async def test_token_expiry_closes_4002_after_token_expiring(self):
        p = self.start_proxy()
        now = int(time.time())
        # Lifetime 20 s of which 2 s remain: inside the last tenth, the notice is due at once.
        tok = p.token("alice", iat=now - 18, exp=now + 2)
        alice = self.track(await p.connect(tok))
        w = await alice.recv_method("federation/welcome")
        await alice.answer(w, {})
        n = await alice.recv_method("federation/tokenExpiring", timeout=1.5)
        self.assertNotIn("id", n, "tokenExpiring is a notification")
        self.assertEqual(n["params"], {"expiresAt": (now + 2) * 1000})
        self.assertEqual(await alice.expect_close(5), 4002)
        self.assertFalse([m for _, m in alice.pending if m.get("method") == "federation/tokenExpiring"],
                         "tokenExpiring is sent once")

    async def test_token_expiring_sent_for_a_short_token(self):
        # A 3 s token: the notice is due when 0.3 s remain, before the 4002 close.
        p = self.start_proxy()
        now = int(time.time())
        alice = self.track(await p.connect(p.token("alice", iat=now, exp=now + 3)))
        w = await alice.recv_method("federation/welcome")
        await alice.answer(w, {})
        self.assertEqual(await alice.expect_close(6), 4002)
        notes = [m for _, m in alice.pending if m.get("method") == "federation/tokenExpiring"]
        self.assertEqual(len(notes), 1, f"one federation/tokenExpiring before the close; got {alice.pending}")

    async def test_rate_limit(self):
        p = self.start_proxy({"FEDMCP_RATE_LIMIT": "1/s,burst=2"})
        alice = await self.online(p, "alice")  # uses one token of the bucket (federation/servers)
        ids = [await alice.request("federation/servers") for _ in range(3)]
        answers = [await alice.recv_id(i) for i in ids]
        limited = [a for a in answers if "error" in a]
        self.assertTrue(limited, answers)
        err = self.assert_rpc_error(limited[-1], -32029, "rate_limited")
        self.assertIsInstance(err["data"].get("retryAfterMs"), int, err)
        self.assertGreater(err["data"]["retryAfterMs"], 0, err)
        self.assertLessEqual(err["data"]["retryAfterMs"], 1000, err)
        await asyncio.sleep(err["data"]["retryAfterMs"] / 1000 + 0.1)
        r = await alice.call("federation/servers")
        self.assertIn("result", r, "allowed again after retryAfterMs")

    async def test_rate_abuse_closes_1008(self):
        p = self.start_proxy({"FEDMCP_RATE_LIMIT": "1/s,burst=2"})
        alice = await self.online(p, "alice")
        for _ in range(300):
            try:
                await alice.notify("federation/servers")
            except Exception:
                break
        self.assertEqual(await alice.expect_close(5), 1008)


    async def test_silent_session_dropped_after_two_heartbeats(self):
        p = self.start_proxy({"FEDMCP_HEARTBEAT_MS": "200"})
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        # Alice stops reading: she no longer answers pings, so she sends nothing at all.
        alice.ws.transport.pause_reading()
        deadline = time.monotonic() + 5
        state = None
        while time.monotonic() < deadline:
            state = p.http("GET", "/v1/servers/alice", token=p.admin_token()).json()["state"]
            if state == "offline":
                break
            await asyncio.sleep(0.1)
        self.assertEqual(state, "offline")
        self.assert_rpc_error(await bob.call("federation/send", send_params("alice")), -32002, "server_offline")
        # Bob answers the pings (websockets does) and stays online throughout.
        await asyncio.sleep(0.6)
        r = await bob.call("federation/servers")
        self.assertEqual([s["serverId"] for s in r["result"]["servers"]], ["bob"])


class Signing(ProxyTestCase):
    async def test_signed_send_with_require_signed(self):
        p = self.start_proxy({"FEDMCP_REQUIRE_SIGNED": "1"})
        reg = p.register("alice")
        key = b64url_decode(reg["signingKey"])
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        raw_message = '{"amount": 10, "to" : "bob"}'
        sig = message_sig(key, "", "", raw_message.encode())
        await alice.send_raw('{"jsonrpc":"2.0","id":1,"method":"federation/send","params":'
                             '{"to":"bob","message":' + raw_message + ',"sig":"' + sig + '"}}')
        text, d = await bob.recv_method("federation/deliver", raw=True)
        self.assertEqual(raw_member(text, "params", "message"), raw_message)
        self.assertEqual(d["params"]["sig"], message_sig(p.signing_key("bob"), d["params"]["msgId"], "alice",
                                                         raw_message.encode()))
        await bob.answer(d, "paid")
        r = await alice.recv_id(1)
        self.assertEqual(r["result"]["status"], "delivered", r)
        # Unsigned: refused.
        self.assert_rpc_error(await alice.call("federation/send", {"to": "bob", "message": {"amount": 10}}),
                              -32006, "bad_signature")
        # Signed with someone else's key, or over other bytes: refused.
        wrong_key = message_sig(p.signing_key("bob"), "", "", raw_message.encode())
        other_bytes = message_sig(key, "", "", b'{"amount": 11, "to" : "bob"}')
        with_ids = message_sig(key, "x", "alice", raw_message.encode())
        for bad in (wrong_key, other_bytes, with_ids, "", "not base64!"):
            with self.subTest(sig=bad):
                await alice.send_raw('{"jsonrpc":"2.0","id":2,"method":"federation/send","params":'
                                     '{"to":"bob","message":' + raw_message + ',"sig":' + json.dumps(bad) + '}}')
                self.assert_rpc_error(await alice.recv_id(2), -32006, "bad_signature")
        await bob.call("federation/servers")
        await bob.expect_nothing(0.2)

    async def test_bad_sig_refused_without_requirement(self):
        p = self.start_proxy()
        alice = await self.online(p, "alice")
        bob = await self.online(p, "bob")
        self.assert_rpc_error(
            await alice.call("federation/send", {"to": "bob", "message": 1,
                                                 "sig": message_sig(p.signing_key("bob"), "", "", b"1")}),
            -32006, "bad_signature")
        # A good one is accepted, an unsigned one too.
        rid = await alice.request("federation/send", {"to": "bob", "message": 1,
                                                      "sig": message_sig(p.signing_key("alice"), "", "", b"1")})
        d = await bob.recv_method("federation/deliver")
        await bob.answer(d, 0)
        self.assertEqual((await alice.recv_id(rid))["result"]["status"], "delivered")
        rid = await alice.request("federation/send", {"to": "bob", "message": 2})
        d = await bob.recv_method("federation/deliver")
        await bob.answer(d, 0)
        self.assertEqual((await alice.recv_id(rid))["result"]["status"], "delivered")


class Logs(ProxyTestCase):
    """§2: no token, secret or signature is ever written to a log, at any log level."""

    async def check_level(self, level: str):
        p = self.start_proxy({"RUST_LOG": level})
        reg = p.register("alice")
        secrets_seen = {p.secret, reg["token"], reg["signingKey"], p.admin_token()}
        alice = await self.online(p, "alice", token=reg["token"])
        bob = await self.online(p, "bob")
        sig = message_sig(b64url_decode(reg["signingKey"]), "", "", b'{"m":1}')
        secrets_seen.add(sig)
        await alice.send_raw('{"jsonrpc":"2.0","id":77,"method":"federation/send",'
                             '"params":{"to":"bob","message":{"m":1},"sig":"' + sig + '"}}')
        d = await bob.recv_method("federation/deliver")
        secrets_seen.add(d["params"]["sig"])
        await bob.answer(d, 1)
        self.assertEqual((await alice.recv_id(77))["result"]["status"], "delivered")
        r = await alice.call("federation/refresh")
        secrets_seen.add(r["result"]["token"])
        bad = jwt.encode({"serverId": "x", "type": "admin", "iat": 1, "exp": 2}, "w" * 40, algorithm="HS256")
        secrets_seen.add(bad)
        p.http("GET", "/v1/servers", token=bad)
        try:
            await p.connect(bad, via="query")
        except Exception:
            pass
        await asyncio.sleep(0.2)
        log = p.stderr_tail(10**8)
        self.assertTrue(log, "the proxy logged something")
        leaked = sorted({piece for s in secrets_seen for piece in (s, s.rsplit(".", 1)[-1]) if piece in log})
        self.assertFalse(leaked, f"RUST_LOG={level}: secrets in the log: {leaked}")

    async def test_no_secrets_in_logs_at_info(self):
        await self.check_level("info")

    async def test_no_secrets_in_logs_at_debug(self):
        await self.check_level("debug")

    async def test_no_secrets_in_logs_at_trace(self):
        await self.check_level("trace")
