"""Shared harness for the fedmcp interop suite.

Starts the real `fedmcp` binary on 127.0.0.1 port 0 with a temporary state dir and a
secret chosen here, waits (bounded) for its `listening on http://HOST:PORT` line, offers
plain HTTP (urllib), token minting (PyJWT) and a WebSocket control client (websockets),
and kills the process on teardown. Every wait is bounded: no test can hang.

The binary is $FEDMCP_BIN, or target/debug/fedmcp of this repository.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from typing import Any, Callable

import jwt
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# How long any single wait may take.
WAIT = 10.0
READY_RE = re.compile(r"^listening on (https?)://(\S+):(\d+)$")
SUBPROTOCOL = "fedmcp.v1"


def binary() -> str:
    b = os.environ.get("FEDMCP_BIN")
    if b:
        return os.path.abspath(b)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "debug", "fedmcp")


def _die_with_parent() -> None:
    """Child side of fork: receive SIGKILL if the test runner dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The runner's environment without any FEDMCP_* or RUST_LOG, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMCP_") and k != "RUST_LOG"}
    env.update(extra or {})
    return env


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def signing_key(secret: bytes, server_id: str, epoch: int = 1) -> bytes:
    """K = HMAC-SHA256(secret, "fedmcp/v1/sign/" + serverId + "/" + epoch) (contract §6)."""
    data = b"fedmcp/v1/sign/" + server_id.encode() + b"/" + str(epoch).encode()
    return hmac.new(secret, data, hashlib.sha256).digest()


def message_sig(key: bytes, msg_id: str, sender: str, message_bytes: bytes) -> str:
    """base64url(HMAC-SHA256(K, msgId + "\\n" + from + "\\n" + message_bytes)) (contract §6)."""
    data = msg_id.encode() + b"\n" + sender.encode() + b"\n" + message_bytes
    return b64url(hmac.new(key, data, hashlib.sha256).digest())


def run_cli(args: list[str], env: dict[str, str], timeout: float = WAIT) -> subprocess.CompletedProcess:
    """Runs the binary with `args` (e.g. the `token` subcommand) in a clean environment."""
    return subprocess.run(
        [binary(), *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class Resp:
    def __init__(self, status: int, headers: Any, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.body[:300]!r}>"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Proxy:
    """One running fedmcp process."""

    def __init__(self, env: dict[str, str] | None = None, secret: str | None = None,
                 state_dir: str | None = None):
        self.tmp = tempfile.mkdtemp(prefix="fedmcp-interop-")
        self.secret = secret if secret is not None else "interop-" + secrets.token_hex(32)
        self.state_dir = state_dir if state_dir is not None else os.path.join(self.tmp, "state")
        self.stderr_path = os.path.join(self.tmp, "stderr.log")
        cfg = {
            "FEDMCP_LISTEN": "127.0.0.1:0",
            "FEDMCP_STATE_DIR": self.state_dir,
            "RUST_LOG": "info",
        }
        if self.secret:
            cfg["FEDMCP_JWT_SECRET"] = self.secret
        cfg.update(env or {})
        self.env = cfg
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [binary()],
            env=clean_env(cfg),
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
        )
        lines: list[str] = []
        got = threading.Event()

        def read_ready() -> None:
            assert self.proc.stdout is not None
            lines.append(self.proc.stdout.readline().decode("utf-8", "replace"))
            got.set()
            # Keep draining so the child never blocks on a full stdout pipe.
            for _ in self.proc.stdout:
                pass

        threading.Thread(target=read_ready, daemon=True).start()
        if not got.wait(WAIT) or not lines[0]:
            self.stop()
            raise RuntimeError(f"fedmcp printed no ready line within {WAIT}s; stderr:\n{self.stderr_tail()}")
        self.ready_line = lines[0].rstrip("\r\n")
        m = READY_RE.match(self.ready_line)
        if not m:
            self.stop()
            raise RuntimeError(f"unexpected ready line {self.ready_line!r}")
        self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
        self.base = f"{self.scheme}://{self.host}:{self.port}"
        self.ws_base = f"ws://{self.host}:{self.port}"

    # ---- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.close()
        if not os.environ.get("FEDMCP_INTEROP_KEEP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # ---- tokens ----------------------------------------------------------------------
    @property
    def key(self) -> bytes:
        return self.secret.encode()

    def token(self, server_id: str, typ: str = "federation", ttl: int = 3600,
              algorithm: str = "HS256", key: bytes | None = None, **extra: Any) -> str:
        now = int(time.time())
        claims = {"serverId": server_id, "type": typ, "iat": now, "exp": now + ttl}
        claims.update(extra)
        return jwt.encode(claims, key if key is not None else self.key, algorithm=algorithm)

    def admin_token(self) -> str:
        return self.token("operator", "admin")

    def signing_key(self, server_id: str) -> bytes:
        return signing_key(self.key, server_id)

    # ---- HTTP ------------------------------------------------------------------------
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
            with _OPENER.open(req, timeout=WAIT) as r:
                return Resp(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Resp(e.code, e.headers, e.read())

    def register(self, server_id: str, capabilities: dict | None = None, expect: int = 201) -> dict:
        body: dict[str, Any] = {"serverId": server_id}
        if capabilities is not None:
            body["capabilities"] = capabilities
        r = self.http("POST", "/v1/servers", body, token=self.admin_token())
        if r.status != expect:
            raise AssertionError(f"register {server_id}: expected {expect}, got {r!r}")
        return r.json()

    # ---- control channel -------------------------------------------------------------
    async def connect(self, token: str, via: str = "header", subprotocols: list[str] | None = None,
                      **kw: Any) -> "Client":
        url = self.ws_base + "/v1/control"
        headers = {}
        if via == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif via == "query":
            url += "?token=" + token
        elif via != "none":
            raise ValueError(via)
        ws = await asyncio.wait_for(
            ws_connect(
                url,
                additional_headers=headers,
                subprotocols=[SUBPROTOCOL] if subprotocols is None else subprotocols,
                proxy=None,
                open_timeout=WAIT,
                close_timeout=2,
                ping_interval=None,
                max_size=None,
                **kw,
            ),
            WAIT,
        )
        return Client(ws)

    async def online(self, server_id: str, capabilities: dict | None = None,
                     token: str | None = None) -> "Client":
        """Connects `server_id`, answers the welcome, and waits until it is online."""
        c = await self.connect(token or self.token(server_id))
        w = await c.recv_method("federation/welcome")
        await c.answer(w, {"capabilities": capabilities} if capabilities is not None else {})
        # Same connection: once this answer arrives, the welcome answer has been processed.
        r = await c.call("federation/servers")
        ids = [s["serverId"] for s in r["result"]["servers"]]
        if server_id not in ids:
            raise AssertionError(f"{server_id} not online after answering the welcome: {r}")
        return c


class Client:
    """A control-channel client that keeps messages it was not waiting for."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.pending: list[tuple[str, Any]] = []
        self._next_id = 1000

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), WAIT)
        except Exception:
            pass

    async def send_raw(self, data: str | bytes) -> None:
        await asyncio.wait_for(self.ws.send(data), WAIT)

    async def send(self, obj: Any) -> None:
        await self.send_raw(json.dumps(obj))

    async def _recv_raw(self, timeout: float) -> str:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if not isinstance(data, str):
            raise AssertionError(f"proxy sent a binary frame: {data[:100]!r}")
        return data

    async def recv_match(self, pred: Callable[[Any], bool], timeout: float = WAIT,
                         raw: bool = False) -> Any:
        """The first message (from the buffer, then the socket) for which pred is true."""
        for i, (text, obj) in enumerate(self.pending):
            if pred(obj):
                del self.pending[i]
                return (text, obj) if raw else obj
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise asyncio.TimeoutError(f"no matching message within {timeout}s; buffered: {self.pending!r}")
            text = await self._recv_raw(left)
            obj = json.loads(text)
            if pred(obj):
                return (text, obj) if raw else obj
            self.pending.append((text, obj))

    async def recv(self, timeout: float = WAIT) -> Any:
        return await self.recv_match(lambda _: True, timeout)

    async def recv_method(self, method: str, timeout: float = WAIT, raw: bool = False) -> Any:
        return await self.recv_match(
            lambda m: isinstance(m, dict) and m.get("method") == method, timeout, raw)

    async def recv_id(self, rid: Any, timeout: float = WAIT) -> Any:
        return await self.recv_match(
            lambda m: isinstance(m, dict) and "method" not in m and m.get("id") == rid, timeout)

    async def expect_nothing(self, seconds: float = 0.3) -> None:
        if self.pending:
            raise AssertionError(f"unexpected messages: {self.pending!r}")
        try:
            text = await self._recv_raw(seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected message: {text}")

    async def expect_close(self, timeout: float = WAIT) -> int | None:
        """Reads until the proxy closes; returns the close code it sent."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise asyncio.TimeoutError(f"session not closed within {timeout}s")
                data = await asyncio.wait_for(self.ws.recv(), left)
                if isinstance(data, str):
                    self.pending.append((data, json.loads(data)))
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd is not None else None

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def request(self, method: str, params: Any = None, rid: Any = None) -> Any:
        rid = self.next_id() if rid is None else rid
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        return rid

    async def call(self, method: str, params: Any = None, timeout: float = WAIT) -> Any:
        rid = await self.request(method, params)
        return await self.recv_id(rid, timeout)

    async def notify(self, method: str, params: Any = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)

    async def answer(self, req: dict, result: Any) -> None:
        await self.send({"jsonrpc": "2.0", "id": req["id"], "result": result})

    async def answer_error(self, req: dict, error: dict) -> None:
        await self.send({"jsonrpc": "2.0", "id": req["id"], "error": error})


class ProxyTestCase(unittest.IsolatedAsyncioTestCase):
    """Each test gets its own proxy (configured by `env`) so tests are independent."""

    env: dict[str, str] = {}

    def start_proxy(self, env: dict[str, str] | None = None, **kw: Any) -> Proxy:
        merged = dict(self.env)
        merged.update(env or {})
        p = Proxy(merged, **kw)
        self.addCleanup(p.stop)
        return p

    async def asyncSetUp(self) -> None:
        self.clients: list[Client] = []
        # Some checks run a short blocking subprocess (curl, the CLI): not worth a warning.
        asyncio.get_running_loop().slow_callback_duration = 5.0

    async def asyncTearDown(self) -> None:
        for c in self.clients:
            await c.close()

    def track(self, c: Client) -> Client:
        self.clients.append(c)
        return c

    async def connect(self, p: Proxy, token: str, **kw: Any) -> Client:
        return self.track(await p.connect(token, **kw))

    async def online(self, p: Proxy, server_id: str, capabilities: dict | None = None,
                     token: str | None = None) -> Client:
        return self.track(await p.online(server_id, capabilities, token))

    def assert_rpc_error(self, msg: dict, code: int, reason: str) -> dict:
        self.assertIn("error", msg, msg)
        self.assertNotIn("result", msg, msg)
        self.assertEqual(msg.get("jsonrpc"), "2.0", msg)
        err = msg["error"]
        self.assertEqual(err["code"], code, msg)
        self.assertIsInstance(err.get("message"), str, msg)
        self.assertIsInstance(err.get("data"), dict, msg)
        self.assertEqual(err["data"].get("reason"), reason, msg)
        return err

    def assert_http_error(self, r: Resp, status: int, code: str) -> None:
        self.assertEqual(r.status, status, r)
        body = r.json()
        self.assertEqual(set(body), {"error"}, body)
        self.assertEqual(body["error"]["code"], code, body)
        self.assertIsInstance(body["error"].get("message"), str, body)


__all__ = [
    "ConnectionClosed", "InvalidStatus", "Proxy", "ProxyTestCase", "Client", "Resp", "WAIT",
    "b64url", "b64url_decode", "binary", "clean_env", "message_sig", "run_cli", "signing_key",
    "websockets", "jwt",
]


# ---- exact JSON text of a member (for byte-for-byte checks) ----------------------------------

_DEC = json.JSONDecoder()


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def raw_member(text: str, *path: str) -> str:
    """The exact JSON text of the member at `path` (object keys) inside `text`."""
    for key in path:
        i = _skip_ws(text, 0)
        if text[i] != "{":
            raise KeyError(key)
        i += 1
        found = None
        while True:
            i = _skip_ws(text, i)
            if text[i] == "}":
                break
            k, i = _DEC.raw_decode(text, i)
            i = _skip_ws(text, i)
            assert text[i] == ":"
            i = _skip_ws(text, i + 1)
            _, end = _DEC.raw_decode(text, i)
            if k == key:
                found = text[i:end]
            i = _skip_ws(text, end)
            if text[i] == ",":
                i += 1
        if found is None:
            raise KeyError(key)
        text = found
    return text

