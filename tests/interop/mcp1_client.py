"""The MCP SDK 1.x side of test_mcp_sdk.py: run by it with the python of .venv-mcp1.

    mcp1_client.py ws|http BASE_URL        (the token comes in $FEDMCP_MCP1_TOKEN)

`ws`: the SDK's `websocket_client` on `ws://.../mcp?token=TOKEN` (it sends no headers; it
offers the subprotocol `mcp`). `http`: its `streamablehttp_client` on `http://.../mcp` with
`Authorization: Bearer TOKEN` in its `headers`. Both drive a `ClientSession` through the
same steps and record what the SDK gave back (a result, or the exception it raised); the
test that started this process asserts on that record, so the checks live in one place.

Protocol on stdout, one JSON object a line:
    {"event": "leave"}                 then one line on stdin once a member has gone offline
    {"event": "done", "report": {...}} last
A step the SDK could not do at all ends the process with a traceback on stderr, exit 1.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

import anyio
import httpx
import mcp
import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.client.websocket import websocket_client
from mcp.shared._httpx_utils import create_mcp_http_client

# Both transports are marked deprecated in 1.x (websocket_client goes away in 2.0): that is
# what the facade is for, so keep stderr for real failures.
warnings.simplefilter("ignore", DeprecationWarning)

WAIT = 10.0
# How long to wait for notifications/tools/list_changed after the member left (the contract
# says within a second; the test asserts that on the recorded delay).
NOTIFY_WAIT = 5.0


def emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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


async def steps(session: ClientSession, notes: list[dict], changed: anyio.Event,
                changed_at: list[float]) -> dict:
    rep: dict[str, Any] = {"sdk": mcp.__name__ + " " + _version(),
                           "asked_version": types.LATEST_PROTOCOL_VERSION}
    init = await session.initialize()
    rep["initialize"] = dump(init)
    rep["tools_before"] = dump(await session.list_tools())["tools"]
    rep["echo"] = await outcome(session.call_tool("alpha__echo", {"text": "hello from sdk 1.x"}))
    rep["add"] = await outcome(session.call_tool("beta__add", {"a": 2, "b": 3}))
    rep["refuse"] = await outcome(session.call_tool("alpha__refuse", {}))
    rep["soft"] = await outcome(session.call_tool("beta__soft", {}))
    rep["notes_before_leave"] = [n["method"] for n in notes]

    emit({"event": "leave"})
    with anyio.fail_after(WAIT * 2):
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if not line.strip():
        raise RuntimeError("the test closed stdin instead of confirming the member left")
    left_at = time.monotonic()
    rep["list_changed_after"] = None
    with anyio.move_on_after(NOTIFY_WAIT):
        await changed.wait()
        # A notification that came before the line above counts as at once.
        rep["list_changed_after"] = max(0.0, changed_at[0] - left_at)
    rep["notes"] = notes
    rep["tools_after"] = dump(await session.list_tools())["tools"]
    rep["call_after_leave"] = await outcome(session.call_tool("beta__add", {"a": 1, "b": 1}))
    rep["ping"] = await outcome(session.send_ping())
    return rep


def _version() -> str:
    from importlib.metadata import version

    return version("mcp")


async def main() -> dict:
    transport, base = sys.argv[1], sys.argv[2].rstrip("/")
    token = os.environ["FEDMCP_MCP1_TOKEN"]
    notes: list[dict] = []
    changed = anyio.Event()
    changed_at: list[float] = []

    async def on_message(msg: Any) -> None:
        # ClientSession hands notifications (and transport exceptions) to message_handler.
        if isinstance(msg, types.ServerNotification):
            notes.append({"method": msg.root.method, "at": time.monotonic()})
            if isinstance(msg.root, types.ToolListChangedNotification) and not changed.is_set():
                changed_at.append(time.monotonic())
                changed.set()
        elif isinstance(msg, Exception):
            notes.append({"method": None, "exception": repr(msg)})

    async def run(read: Any, write: Any) -> dict:
        async with ClientSession(read, write, read_timeout_seconds=_td(WAIT),
                                 message_handler=on_message) as session:
            return await steps(session, notes, changed, changed_at)

    with anyio.fail_after(60):
        if transport == "ws":
            url = base.replace("http://", "ws://", 1) + "/mcp?token=" + token
            async with websocket_client(url) as (read, write):
                rep = await run(read, write)
            rep["http"] = None
        elif transport == "http":
            exchanges: list[dict] = []

            async def on_response(r: httpx.Response) -> None:
                method = None
                if r.request.method == "POST":
                    try:
                        method = json.loads(r.request.content).get("method")
                    except ValueError:
                        pass
                exchanges.append({"verb": r.request.method, "method": method, "status": r.status_code,
                                  "contentType": r.headers.get("content-type")})

            def factory(headers: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                        auth: httpx.Auth | None = None) -> httpx.AsyncClient:
                # The SDK's own client, with a hook that records each exchange.
                c = create_mcp_http_client(headers=headers, timeout=timeout, auth=auth)
                c.event_hooks = {"request": [], "response": [on_response]}
                return c

            async with streamablehttp_client(base + "/mcp", headers={"Authorization": f"Bearer {token}"},
                                             timeout=WAIT, httpx_client_factory=factory) as (read, write, _sid):
                rep = await run(read, write)
            rep["http"] = exchanges  # includes the DELETE sent when the transport closed
        else:
            raise SystemExit(f"unknown transport {transport!r}")
    for n in notes:
        n.pop("at", None)
    return rep


def _td(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)


if __name__ == "__main__":
    try:
        report = anyio.run(main)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    emit({"event": "done", "report": report})
