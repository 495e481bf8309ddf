"""The official MCP Python SDK against the MCP facade (contract §9).

Two federation members, played here with `websockets` on /v1/control, declare tools in their
welcome answer and answer the `federation/deliver` requests the facade turns `tools/call`s
into. Five clients of the SDK use them, each through the same steps: initialize, list the
two members' tools, call one tool on each, see a member's JSON-RPC error as the SDK's MCP
error and a member's `isError` result as a result, then see the tools of a member that left
vanish from the next `tools/list` (a call to one of them is an error, not delivered).

- SDK 2.3.0 (this venv): its high-level `Client` over Streamable HTTP in its default mode
  (`server/discover` first, then `initialize` on our 400; token as `?token=`), and in
  `mode="legacy"` (straight to `initialize`; admin token as `Authorization: Bearer`); and its
  `stdio_client` starting `fedmcp mcp-stdio` as an MCP host would (the bridge to /mcp over
  WebSocket; the discover probe gets `-32601` there and the client falls back).
- SDK 1.30.0 (.venv-mcp1, `$FEDMCP_MCP1_PYTHON`): `mcp1_client.py` in that interpreter, with
  its `websocket_client` (`?token=`, subprotocol `mcp`; must also get
  `notifications/tools/list_changed` within a second of the member leaving) and its
  `streamablehttp_client` (bearer token in its `headers`).

A missing SDK or interpreter is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any

from fedmcp_harness import REPO, WAIT, Client as ControlClient, ConnectionClosed, Proxy, ProxyTestCase, binary, clean_env

try:
    from importlib.metadata import version as _dist_version

    from mcp import Client as McpClient
    from mcp.client.streamable_http import streamable_http_client
    from mcp.client.stdio import StdioServerParameters, stdio_client
    import httpx2  # the SDK's HTTP client (a dependency of mcp 2.x)
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    SDK2_VERSION = _dist_version("mcp")
    SDK2_IMPORT_ERROR: str | None = None
except Exception as _e:  # reported by every test that needs it
    SDK2_VERSION = None
    SDK2_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

HERE = os.path.dirname(os.path.abspath(__file__))
MCP1_SCRIPT = os.path.join(HERE, "mcp1_client.py")
SDK2_PIN = "2.3.0"
SDK1_PIN = "1.30.0"
SERVED_REVISIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")

# ---- the members -------------------------------------------------------------------------

ALPHA_TOOLS = [
    {
        "name": "echo",
        "title": "Echo",
        "description": "Says the text back.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "refuse",
        "description": "Always answers with a JSON-RPC error.",
        "inputSchema": {"type": "object"},
    },
]
BETA_TOOLS = [
    {
        "name": "add",
        "description": "Adds two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        "outputSchema": {"type": "object", "properties": {"sum": {"type": "number"}}, "required": ["sum"]},
    },
    {
        "name": "soft",
        "description": "Answers a result with isError set.",
        "inputSchema": {"type": "object"},
    },
]
REFUSE_CODE = -32042
REFUSE_MESSAGE = "alpha refuses"


def tool_answer(server_id: str, name: str, args: dict) -> tuple[str, Any]:
    """What a member answers to a tools/call: ("result", ...) or ("error", ...)."""
    if name == "echo":
        return "result", {"content": [{"type": "text", "text": f"{server_id}: {args.get('text')}"}]}
    if name == "refuse":
        return "error", {"code": REFUSE_CODE, "message": REFUSE_MESSAGE, "data": {"why": "interop"}}
    if name == "add":
        total = args["a"] + args["b"]
        return "result", {"content": [{"type": "text", "text": str(total)}], "structuredContent": {"sum": total}}
    if name == "soft":
        return "result", {"content": [{"type": "text", "text": f"{server_id}: soft failure"}], "isError": True}
    return "error", {"code": -32601, "message": f"no tool {name}"}


class Member:
    """A federation member that answers every `federation/deliver` request in a task."""

    def __init__(self, proxy: Proxy, server_id: str, ctl: ControlClient):
        self.proxy = proxy
        self.server_id = server_id
        self.ctl = ctl
        self.deliveries: list[dict] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            try:
                req = await self.ctl.recv_method("federation/deliver", timeout=3600)
            except ConnectionClosed:
                return
            params = req.get("params") or {}
            self.deliveries.append(params)
            if "id" not in req:
                continue
            msg = params.get("message") or {}
            call = msg.get("params") or {}
            kind, body = tool_answer(self.server_id, call.get("name"), call.get("arguments") or {})
            if kind == "result":
                await self.ctl.answer(req, body)
            else:
                await self.ctl.answer_error(req, body)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def leave(self) -> None:
        """Closes the control session, then waits (bounded) until the registry says offline."""
        await self.stop()
        await self.ctl.close()
        admin = self.proxy.admin_token()
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            r = await asyncio.to_thread(self.proxy.http, "GET", f"/v1/servers/{self.server_id}", None, admin)
            if r.status == 200 and r.json().get("state") != "online":
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.server_id} still online {WAIT}s after leaving: {r!r}")
            await asyncio.sleep(0.02)


def dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def outcome(coro: Any) -> dict:
    """The SDK's answer to one call: {"result": ...} or {"raised": type, "code", "message", "data"}."""
    try:
        return {"result": dump(await coro)}
    except Exception as e:  # what the SDK raises is the observation
        err = getattr(e, "error", None)
        return {
            "raised": f"{type(e).__module__}.{type(e).__qualname__}",
            "code": getattr(err, "code", None),
            "message": getattr(err, "message", str(e)),
            "data": getattr(err, "data", None),
        }


class _Records(logging.Handler):
    """Keeps httpx2's "HTTP Request: VERB URL "HTTP/1.1 STATUS REASON"" lines as (verb, status)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.exchanges: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("HTTP Request:") and len(record.args or ()) >= 4:
            self.exchanges.append((str(record.args[0]), int(record.args[3])))


# ---- the tests ---------------------------------------------------------------------------


class McpSdkCase(ProxyTestCase):
    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        self.members: list[Member] = []

    async def asyncTearDown(self) -> None:
        for m in self.members:
            await m.stop()
        await super().asyncTearDown()

    async def federation(self) -> tuple[Proxy, Member, Member]:
        p = self.start_proxy()
        for sid in ("alpha", "beta"):
            p.register(sid)
        alpha = Member(p, "alpha", await self.online(p, "alpha", {"tools": ALPHA_TOOLS}))
        self.members.append(alpha)
        beta = Member(p, "beta", await self.online(p, "beta", {"tools": BETA_TOOLS}))
        self.members.append(beta)
        return p, alpha, beta

    def check_report(self, rep: dict, caller: str, alpha: Member, beta: Member, error_type: str) -> None:
        """What every client must have seen (the report of the steps in the module docstring)."""
        ctx = json.dumps(rep, indent=1)[:6000]
        init = rep["initialize"]
        asked = rep["asked_version"]
        self.assertEqual(init["protocolVersion"], asked if asked in SERVED_REVISIONS else "2025-11-25", ctx)
        self.assertEqual(init["serverInfo"]["name"], "fedmcp", ctx)
        self.assertIs(init["capabilities"]["tools"]["listChanged"], True, ctx)

        # tools/list: the union, renamed <serverId>__<name>, every declared field kept.
        tools = {t["name"]: t for t in rep["tools_before"]}
        self.assertEqual(sorted(tools), ["alpha__echo", "alpha__refuse", "beta__add", "beta__soft"], ctx)
        for sid, declared in (("alpha", ALPHA_TOOLS), ("beta", BETA_TOOLS)):
            for d in declared:
                seen = tools[f"{sid}__{d['name']}"]
                for key, value in d.items():
                    if key != "name":
                        self.assertEqual(seen.get(key), value, f"{sid}__{d['name']}.{key}: {ctx}")

        # One tool on each member; the member's result is the call's result.
        echo = rep["echo"].get("result")
        self.assertIsNotNone(echo, f"alpha__echo raised: {ctx}")
        self.assertFalse(echo.get("isError", False), ctx)
        self.assertEqual(echo["content"][0]["type"], "text", ctx)
        self.assertTrue(echo["content"][0]["text"].startswith("alpha: hello from sdk"), ctx)
        add = rep["add"].get("result")
        self.assertIsNotNone(add, f"beta__add raised: {ctx}")
        self.assertEqual(add.get("structuredContent"), {"sum": 5}, ctx)
        self.assertFalse(add.get("isError", False), ctx)

        # A member's JSON-RPC error is the SDK's MCP error, with the member's code and message.
        refuse = rep["refuse"]
        self.assertNotIn("result", refuse, f"a member's error came back as a result: {ctx}")
        self.assertEqual(refuse["raised"], error_type, ctx)
        self.assertEqual(refuse["code"], REFUSE_CODE, ctx)
        self.assertEqual(refuse["message"], REFUSE_MESSAGE, ctx)
        # An isError result stays a result.
        soft = rep["soft"].get("result")
        self.assertIsNotNone(soft, f"beta__soft raised: {ctx}")
        self.assertIs(soft.get("isError"), True, ctx)

        # What the members got: federation/deliver from the caller, the original tool name.
        def calls(m: Member) -> list[tuple[str, dict]]:
            out = []
            for d in m.deliveries:
                self.assertEqual(d.get("from"), caller, d)
                msg = d.get("message")
                self.assertEqual(msg.get("method"), "tools/call", d)
                self.assertLessEqual(set(msg["params"]), {"name", "arguments", "_meta"}, d)
                out.append((msg["params"]["name"], msg["params"].get("arguments")))
            return out

        alpha_calls = calls(alpha)
        self.assertEqual([n for n, _ in alpha_calls], ["echo", "refuse"], alpha.deliveries)
        self.assertTrue(alpha_calls[0][1]["text"].startswith("hello from sdk"), alpha.deliveries)
        self.assertEqual(calls(beta), [("add", {"a": 2, "b": 3}), ("soft", {})], beta.deliveries)

        # The member left: its tools are gone from the next tools/list, and calling one is an
        # error that is not delivered. §9 has two rules that fit: "a name not in the list is
        # -32602" and "the owner offline is -32002" (data.reason server_offline); the proxy
        # answers the latter for a registered member that went offline.
        self.assertEqual(sorted(t["name"] for t in rep["tools_after"]), ["alpha__echo", "alpha__refuse"], ctx)
        after = rep["call_after_leave"]
        self.assertEqual(after.get("raised"), error_type, ctx)
        self.assertIn(after.get("code"), (-32602, -32002), ctx)
        if after["code"] == -32002:
            self.assertEqual((after.get("data") or {}).get("reason"), "server_offline", ctx)
        self.assertEqual(len(beta.deliveries), 2, beta.deliveries)

    # ---- SDK 2.x (this venv) -----------------------------------------------------------

    def require_sdk2(self) -> None:
        if SDK2_IMPORT_ERROR is not None:
            self.fail(f"the MCP SDK {SDK2_PIN} cannot be imported in {sys.executable} ({SDK2_IMPORT_ERROR}); "
                      f"`make interop` installs it from tests/interop/requirements.txt")
        self.assertEqual(SDK2_VERSION, SDK2_PIN, f"mcp {SDK2_VERSION} installed in {sys.executable}")

    async def sdk2_steps(self, client: Any, beta: Member) -> dict:
        rep: dict[str, Any] = {"asked_version": LATEST_HANDSHAKE_VERSION}
        rep["initialize"] = {
            "protocolVersion": client.protocol_version,
            "serverInfo": dump(client.server_info),
            "capabilities": dump(client.server_capabilities),
        }
        rep["tools_before"] = dump(await client.list_tools())["tools"]
        rep["echo"] = await outcome(client.call_tool("alpha__echo", {"text": "hello from sdk 2.x"}))
        rep["add"] = await outcome(client.call_tool("beta__add", {"a": 2, "b": 3}))
        rep["refuse"] = await outcome(client.call_tool("alpha__refuse", {}))
        rep["soft"] = await outcome(client.call_tool("beta__soft", {}))
        await beta.leave()
        rep["tools_after"] = dump(await client.list_tools())["tools"]
        rep["call_after_leave"] = await outcome(client.call_tool("beta__add", {"a": 1, "b": 1}))
        return rep

    async def test_sdk2_client_default_mode(self):
        """`Client(url)`: probes server/discover, takes our 400 as "fall back", initializes."""
        self.require_sdk2()
        p, alpha, beta = await self.federation()
        records = _Records()
        log = logging.getLogger("httpx2")
        old_level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(records)
        try:
            url = f"{p.base}/mcp?token={p.token('sdk2-auto')}"

            async def scenario() -> tuple[dict, Any, Any]:
                async with McpClient(url, read_timeout_seconds=WAIT) as client:
                    rep = await self.sdk2_steps(client, beta)
                    return rep, client.session.initialize_result, client.session.discover_result

            rep, init_result, discover_result = await asyncio.wait_for(scenario(), 4 * WAIT)
        finally:
            log.removeHandler(records)
            log.setLevel(old_level)
        self.assertIsNotNone(init_result, "the client did not fall back to initialize")
        self.assertIsNone(discover_result, "the client adopted a server/discover result")
        ex = records.exchanges
        # The probe (server/discover, no session) answered 400, then initialize answered 200.
        self.assertGreaterEqual(len(ex), 2, ex)
        self.assertEqual(ex[0], ("POST", 400), ex)
        self.assertEqual(ex[1], ("POST", 200), ex)
        self.check_report(rep, "sdk2-auto", alpha, beta, "mcp.shared.exceptions.MCPError")
        self.assertIn(("DELETE", 204), ex, "the session was not ended with DELETE 204")

    async def test_sdk2_client_legacy_mode_bearer_admin_token(self):
        """`Client(transport, mode="legacy")`, an admin token in Authorization: Bearer."""
        self.require_sdk2()
        p, alpha, beta = await self.federation()
        exchanges: list[dict] = []

        async def on_response(r: Any) -> None:
            method = None
            if r.request.method == "POST":
                with contextlib.suppress(ValueError):
                    method = json.loads(r.request.content).get("method")
            exchanges.append({"verb": r.request.method, "method": method, "status": r.status_code,
                              "contentType": r.headers.get("content-type"),
                              "session": r.request.headers.get("mcp-session-id") is not None})

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {p.admin_token()}"},
                                  timeout=httpx2.Timeout(WAIT), event_hooks={"response": [on_response]})
        try:
            async def scenario() -> dict:
                transport = streamable_http_client(f"{p.base}/mcp", http_client=http)
                async with McpClient(transport, mode="legacy", read_timeout_seconds=WAIT) as client:
                    self.assertIsNotNone(client.session.initialize_result)
                    return await self.sdk2_steps(client, beta)

            rep = await asyncio.wait_for(scenario(), 4 * WAIT)
        finally:
            await http.aclose()
        ctx = json.dumps(exchanges, indent=1)
        posts = [e for e in exchanges if e["verb"] == "POST"]
        self.assertNotIn("server/discover", [e["method"] for e in posts], ctx)
        self.assertEqual(posts[0]["method"], "initialize", ctx)
        for e in posts:
            if e["method"] == "notifications/initialized":
                self.assertEqual(e["status"], 202, ctx)
            else:
                self.assertEqual(e["status"], 200, ctx)
                self.assertEqual(e["contentType"], "application/json", ctx)
        self.assertTrue(all(e["session"] for e in exchanges[1:]), ctx)
        # The SDK's GET for a server stream is refused 405; it ends the session with DELETE.
        self.assertEqual({e["status"] for e in exchanges if e["verb"] == "GET"}, {405}, ctx)
        self.assertEqual([e["status"] for e in exchanges if e["verb"] == "DELETE"], [204], ctx)
        # An admin token's caller is its serverId, "operator".
        self.check_report(rep, "operator", alpha, beta, "mcp.shared.exceptions.MCPError")

    async def test_sdk2_stdio_client_through_the_bridge(self):
        """`fedmcp mcp-stdio` started by the SDK's `stdio_client`, as an MCP host starts it:
        the same steps, through the bridge (stdio ↔ /mcp over WebSocket)."""
        self.require_sdk2()
        p, alpha, beta = await self.federation()
        params = StdioServerParameters(
            command=binary(), args=["mcp-stdio"],
            env={"FEDMCP_URL": p.base, "FEDMCP_TOKEN": p.token("sdk2-stdio")},
        )
        errlog_path = os.path.join(p.tmp, "mcp-stdio.stderr")

        async def scenario() -> dict:
            with open(errlog_path, "w") as errlog:
                async with McpClient(stdio_client(params, errlog=errlog), read_timeout_seconds=WAIT) as client:
                    return await self.sdk2_steps(client, beta)

        try:
            rep = await asyncio.wait_for(scenario(), 4 * WAIT)
        except BaseException as e:
            with open(errlog_path) as f:
                raise AssertionError(f"through the bridge: {e!r}; its stderr:\n{f.read()[-4000:]}") from e
        self.check_report(rep, "sdk2-stdio", alpha, beta, "mcp.shared.exceptions.MCPError")

    # ---- SDK 1.x (.venv-mcp1, a separate process) --------------------------------------

    def mcp1_python(self) -> str:
        py = os.environ.get("FEDMCP_MCP1_PYTHON") or os.path.join(REPO, ".venv-mcp1", "bin", "python")
        if not os.access(py, os.X_OK):
            self.fail(f"no python for the MCP SDK {SDK1_PIN} at {py} ($FEDMCP_MCP1_PYTHON): "
                      f"`make interop` makes .venv-mcp1 from tests/interop/requirements-mcp1.txt")
        return py

    async def run_mcp1(self, p: Proxy, transport: str, caller: str, beta: Member) -> dict:
        """Runs mcp1_client.py; makes `beta` leave when it asks; returns its report."""
        py = self.mcp1_python()
        stderr_path = os.path.join(p.tmp, f"mcp1-{transport}.stderr")
        with open(stderr_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                py, MCP1_SCRIPT, transport, p.base,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                env=clean_env({"FEDMCP_MCP1_TOKEN": p.token(caller)}), cwd=p.tmp,
            )
        report = None
        lines: list[bytes] = []
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 4 * WAIT)
                if not line:
                    break
                lines.append(line)
                ev = json.loads(line)
                if ev.get("event") == "leave":
                    await beta.leave()
                    proc.stdin.write(b"left\n")
                    await proc.stdin.drain()
                elif ev.get("event") == "done":
                    report = ev["report"]
            rc = await asyncio.wait_for(proc.wait(), WAIT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        with open(stderr_path, "rb") as f:
            stderr = f.read()[-6000:].decode("utf-8", "replace")
        self.assertEqual(rc, 0, f"mcp1_client.py {transport} failed; stdout {lines!r}; stderr:\n{stderr}")
        self.assertIsNotNone(report, f"no report; stdout {lines!r}; stderr:\n{stderr}")
        self.assertEqual(report["sdk"], f"mcp {SDK1_PIN}", f"{py} has {report['sdk']}")
        return report

    async def test_sdk1_websocket_client(self):
        """`websocket_client("ws://.../mcp?token=...")`: also tools/list_changed within a second."""
        p, alpha, beta = await self.federation()
        rep = await self.run_mcp1(p, "ws", "sdk1-ws", beta)
        self.check_report(rep, "sdk1-ws", alpha, beta, "mcp.shared.exceptions.McpError")
        ctx = json.dumps(rep, indent=1)[:6000]
        self.assertEqual(rep["notes_before_leave"], [], ctx)
        self.assertIn("notifications/tools/list_changed", [n["method"] for n in rep["notes"]], ctx)
        self.assertIsNotNone(rep["list_changed_after"], f"no tools/list_changed within 5 s: {ctx}")
        # The contract's second, with room for scheduling the two processes.
        self.assertLessEqual(rep["list_changed_after"], 1.5, ctx)
        self.assertEqual(rep["ping"], {"result": {}}, ctx)

    async def test_sdk1_streamablehttp_client(self):
        """`streamablehttp_client(url, headers={"Authorization": "Bearer ..."})`."""
        p, alpha, beta = await self.federation()
        rep = await self.run_mcp1(p, "http", "sdk1-http", beta)
        self.check_report(rep, "sdk1-http", alpha, beta, "mcp.shared.exceptions.McpError")
        ex = rep["http"]
        ctx = json.dumps(ex, indent=1)
        posts = [e for e in ex if e["verb"] == "POST"]
        self.assertEqual(posts[0]["method"], "initialize", ctx)
        for e in posts:
            if e["method"] == "notifications/initialized":
                self.assertEqual(e["status"], 202, ctx)
            else:
                self.assertEqual(e["status"], 200, ctx)
                self.assertEqual(e["contentType"], "application/json", ctx)
        self.assertEqual({e["status"] for e in ex if e["verb"] == "GET"}, {405}, ctx)
        self.assertEqual([e["status"] for e in ex if e["verb"] == "DELETE"], [204], ctx)
        self.assertEqual(rep["ping"], {"result": {}}, json.dumps(rep)[:3000])
