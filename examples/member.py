"""A member of the federation in Python: it registers itself, joins over the control channel
with `websockets`, declares two tools, and answers their calls. MCP clients of the proxy see
them as `demo-py__upper` and `demo-py__count`.

    make run                                   # in one terminal; it prints an admin token
    FEDMCP_TOKEN=<that token> .venv/bin/python examples/member.py

FEDMCP_URL (default http://127.0.0.1:8443) is the proxy; FEDMCP_SERVER_ID (default demo-py)
the id it registers. With a federation token instead of an admin one it skips registering
and joins as the token's server. Needs `websockets` (in the venv `make test` creates).
"""

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request

import websockets

TOOLS = [
    {"name": "upper", "description": "Upper-cases its text.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "count", "description": "Counts the words of its text.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
]


def call(name, args):
    """The answer to one tools/call: (result, None) or (None, JSON-RPC error object)."""
    text = args.get("text") if isinstance(args, dict) else None
    if not isinstance(text, str):
        return None, {"code": -32602, "message": f"{name} takes {{\"text\": string}}"}
    if name == "upper":
        return {"content": [{"type": "text", "text": text.upper()}]}, None
    if name == "count":
        return {"content": [{"type": "text", "text": str(len(text.split()))}]}, None
    return None, {"code": -32601, "message": f"no tool {name}"}


def register(base, token, server_id):
    """An admin token registers this member and returns its federation token; any other
    token is taken as the member's own."""
    body = json.dumps({"serverId": server_id, "capabilities": {"tools": TOOLS}}).encode()
    req = urllib.request.Request(base + "/v1/servers", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["token"]
    except urllib.error.HTTPError as e:
        if e.code == 403:  # not an admin token
            return token
        raise SystemExit(f"member: registering {server_id}: {e.code} {e.read().decode()}")


async def serve(base, token):
    url = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/control"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                  subprotocols=["fedmcp.v1"]) as ws:
        print("member: joined; serving upper and count (Ctrl-C ends)", file=sys.stderr)
        async for raw in ws:
            m = json.loads(raw)
            method = m.get("method")
            if method == "federation/welcome":
                answer = {"jsonrpc": "2.0", "id": m["id"], "result": {"capabilities": {"tools": TOOLS}}}
            elif method == "federation/deliver" and "id" in m:
                msg = m["params"]["message"]
                if isinstance(msg, dict) and msg.get("method") == "tools/call":
                    p = msg.get("params", {})
                    result, error = call(p.get("name"), p.get("arguments", {}))
                else:
                    result, error = {"received": msg}, None
                answer = {"jsonrpc": "2.0", "id": m["id"]}
                answer.update({"error": error} if error else {"result": result})
            else:
                continue
            await ws.send(json.dumps(answer))


def main():
    base = os.environ.get("FEDMCP_URL", "http://127.0.0.1:8443").rstrip("/")
    token = os.environ.get("FEDMCP_TOKEN") or sys.exit("member: FEDMCP_TOKEN is required")
    server_id = os.environ.get("FEDMCP_SERVER_ID", "demo-py")
    asyncio.run(serve(base, register(base, token, server_id)))


if __name__ == "__main__":
    main()
