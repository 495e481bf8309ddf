"""The Python example member (examples/member.py), run as the README says: the admin token
in FEDMCP_TOKEN, the proxy in FEDMCP_URL. It registers itself, joins with `websockets`, and
its two tools answer MCP calls made through the facade's Streamable HTTP endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unittest

from fedmcp_harness import ProxyTestCase, clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "member.py")


class PythonExampleMember(ProxyTestCase):
    def mcp(self, p, token, body, session=None):
        headers = {"Accept": "application/json, text/event-stream"}
        if session:
            headers["Mcp-Session-Id"] = session
        r = p.http("POST", "/mcp", body, token=token, headers=headers)
        return r

    async def test_the_python_example_serves_its_tools(self):
        p = self.start_proxy()
        self.assertTrue(os.path.exists(EXAMPLE), EXAMPLE)
        member = subprocess.Popen(
            [sys.executable, EXAMPLE],
            env=clean_env({"FEDMCP_URL": p.base, "FEDMCP_TOKEN": p.admin_token()}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(member.wait, 10)
        self.addCleanup(member.kill)
        t = p.token("client")
        r = self.mcp(p, t, {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                            "params": {"protocolVersion": "2025-06-18"}})
        self.assertEqual(r.status, 200, r)
        sid = r.headers["Mcp-Session-Id"]
        names: list[str] = []
        for _ in range(100):
            r = self.mcp(p, t, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, sid)
            names = [x["name"] for x in r.json()["result"]["tools"]]
            if len(names) == 2:
                break
            if member.poll() is not None:
                self.fail(f"the example exited: {member.stderr.read().decode()}")
            time.sleep(0.1)
        self.assertEqual(names, ["demo-py__count", "demo-py__upper"])
        r = self.mcp(p, t, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                            "params": {"name": "demo-py__upper", "arguments": {"text": "hi there"}}}, sid)
        self.assertEqual(r.json()["result"]["content"][0]["text"], "HI THERE", r)
        r = self.mcp(p, t, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                            "params": {"name": "demo-py__count", "arguments": {"text": "a b c"}}}, sid)
        self.assertEqual(r.json()["result"]["content"][0]["text"], "3", r)
        r = self.mcp(p, t, {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                            "params": {"name": "demo-py__count", "arguments": {}}}, sid)
        self.assertEqual(r.json()["error"]["code"], -32602, r)


if __name__ == "__main__":
    unittest.main()
