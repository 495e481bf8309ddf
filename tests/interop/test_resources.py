"""Resources of the HTTP data channel (contract §3) with `curl` and Python's urllib.

Uploads by `Content-Length` (`curl --data-binary @file`, urllib bytes) and chunked (`curl -H
"Transfer-Encoding: chunked"`, urllib with an iterable body), downloads to files and by range
(`curl -r`), each compared by SHA-256 with `hashlib`. One test records the throughput of the
proxy over loopback for a 256 MiB file next to `python3 -m http.server` serving the same file,
for docs/PERFORMANCE.md (the figures are of the binary under test: debug unless FEDMCP_BIN
names a release build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request

from fedmcp_harness import ProxyTestCase, WAIT, binary, clean_env

CURL = shutil.which("curl")
MIB = 1024 * 1024
# The throughput test: file size and the bound on each of its transfers.
BIG = 256 * MIB
BIG_TIMEOUT = 120

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def curl(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(timeout)), *args],
        capture_output=True, text=True, timeout=timeout + 5, env=clean_env(), stdin=subprocess.DEVNULL)


def write_random(path: str, size: int) -> str:
    """Writes `size` random bytes to `path` 1 MiB at a time; returns their SHA-256 hex."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MIB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def split_status(out: subprocess.CompletedProcess) -> tuple[str, str]:
    """curl output ending in `-w "\\n%{http_code}"`: (body, status)."""
    body, _, code = out.stdout.rpartition("\n")
    return body, code


class Resources(ProxyTestCase):
    def setUp(self):
        if CURL is None:
            self.fail("curl is required for these checks (make test installs it)")
        self.dir = tempfile.mkdtemp(prefix="fedmcp-res-interop-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def test_curl_upload_download_and_ranges(self):
        p = self.start_proxy()
        tok = p.token("curl-res")
        auth = f"Authorization: Bearer {tok}"
        src = self.path("src.bin")
        size = 3 * MIB + 12345
        want = write_random(src, size)
        with open(src, "rb") as f:
            data = f.read()

        # Content-Length upload (curl sends `Expect: 100-continue` for a body this large).
        out = curl("-X", "PUT", "--data-binary", f"@{src}", "-H", auth,
                   "-H", "Content-Type: application/octet-stream",
                   "-w", "\n%{http_code}", p.base + "/v1/resources/by-length.bin")
        self.assertEqual(out.returncode, 0, out.stderr)
        body, code = split_status(out)
        self.assertEqual(code, "201", body)
        self.assertEqual(json.loads(body),
                         {"owner": "curl-res", "name": "by-length.bin", "size": size, "sha256": want,
                          "readers": None})

        # Chunked upload.
        out = curl("-X", "PUT", "--data-binary", f"@{src}", "-H", auth,
                   "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/octet-stream",
                   "-w", "\n%{http_code}", p.base + "/v1/resources/chunked.bin")
        self.assertEqual(out.returncode, 0, out.stderr)
        body, code = split_status(out)
        self.assertEqual(code, "201", body)
        self.assertEqual(json.loads(body)["sha256"], want)
        self.assertEqual(json.loads(body)["size"], size)

        # Downloads to files, compared with hashlib; the ETag is the SHA-256.
        for name in ("by-length.bin", "chunked.bin"):
            dst = self.path(f"got-{name}")
            hdr = self.path(f"hdr-{name}")
            out = curl("-f", "-H", auth, "-D", hdr, "-o", dst, f"{p.base}/v1/resources/curl-res/{name}")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(os.path.getsize(dst), size)
            self.assertEqual(file_sha(dst), want)
            with open(hdr) as f:
                headers = f.read().lower()
            self.assertIn(f'etag: "{want}"', headers)
            self.assertIn("accept-ranges: bytes", headers)

        # A range: -r 10-19 gives 206 and those ten bytes.
        part = self.path("part.bin")
        out = curl("-r", "10-19", "-H", auth, "-o", part, "-D", "-", "-w", "%{http_code}",
                   p.base + "/v1/resources/curl-res/by-length.bin")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(out.stdout.endswith("206"), out.stdout)
        self.assertIn(f"content-range: bytes 10-19/{size}", out.stdout.lower())
        with open(part, "rb") as f:
            self.assertEqual(f.read(), data[10:20])
        # The last bytes, by suffix.
        out = curl("-r", "-7", "-H", auth, "-o", part, "-w", "%{http_code}",
                   p.base + "/v1/resources/curl-res/chunked.bin")
        self.assertEqual(out.stdout, "206")
        with open(part, "rb") as f:
            self.assertEqual(f.read(), data[-7:])

        # HEAD: the length, no body.
        out = curl("-I", "-H", auth, p.base + "/v1/resources/curl-res/chunked.bin")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(f"content-length: {size}", out.stdout.lower())

        # Listing and delete.
        out = curl("-f", "-H", auth, p.base + "/v1/resources")
        self.assertEqual(out.returncode, 0, out.stderr)
        names = sorted((r["owner"], r["name"], r["size"], r["sha256"]) for r in json.loads(out.stdout)["resources"])
        self.assertEqual(names, [("curl-res", "by-length.bin", size, want), ("curl-res", "chunked.bin", size, want)])
        out = curl("-X", "DELETE", "-H", f"Authorization: Bearer {p.token('other')}", "-o", "/dev/null",
                   "-w", "%{http_code}", p.base + "/v1/resources/curl-res/chunked.bin")
        self.assertEqual(out.stdout, "403")
        out = curl("-X", "DELETE", "-H", auth, "-o", "/dev/null", "-w", "%{http_code}",
                   p.base + "/v1/resources/curl-res/chunked.bin")
        self.assertEqual(out.stdout, "204")
        out = curl("-H", auth, "-o", "/dev/null", "-w", "%{http_code}", p.base + "/v1/resources/curl-res/chunked.bin")
        self.assertEqual(out.stdout, "404")

    def test_curl_download_with_connection_close_is_complete(self):
        """HTTP/1.0 (and so `Connection: close`): the whole body, then the close."""
        p = self.start_proxy()
        tok = p.token("curl-res")
        src = self.path("src.bin")
        size = 2 * MIB + 1
        want = write_random(src, size)
        out = curl("-X", "PUT", "--data-binary", f"@{src}", "-H", f"Authorization: Bearer {tok}",
                   "-o", "/dev/null", "-w", "%{http_code}", p.base + "/v1/resources/c.bin")
        self.assertEqual(out.stdout, "201", out.stderr)
        dst = self.path("got.bin")
        out = curl("--http1.0", "-H", f"Authorization: Bearer {tok}", "-o", dst,
                   p.base + "/v1/resources/curl-res/c.bin")
        self.assertEqual(out.returncode, 0, f"curl --http1.0 download: {out.stderr}")
        self.assertEqual(os.path.getsize(dst), size)
        self.assertEqual(file_sha(dst), want)

    def test_urllib_put_get(self):
        p = self.start_proxy()
        tok = p.token("py-res")
        data = os.urandom(MIB + 3)
        want = hashlib.sha256(data).hexdigest()
        octet = {"Content-Type": "application/octet-stream"}

        r = p.http("PUT", "/v1/resources/py.bin", data, token=tok, headers=octet)
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.json(), {"owner": "py-res", "name": "py.bin", "size": len(data), "sha256": want,
                                    "readers": None})

        # An iterable body without a length: urllib sends it chunked.
        def pieces():
            for i in range(0, len(data), 100_000):
                yield data[i:i + 100_000]

        req = urllib.request.Request(p.base + "/v1/resources/py-chunked.bin", data=pieces(), method="PUT",
                                     headers={"Authorization": f"Bearer {tok}", **octet})
        with OPENER.open(req, timeout=WAIT) as resp:
            self.assertEqual(resp.status, 201)
            self.assertEqual(json.loads(resp.read())["sha256"], want)

        r = p.http("GET", "/v1/resources/py-res/py.bin", token=tok, headers={"Range": "bytes=-5"})
        self.assertEqual(r.status, 206, r)
        self.assertEqual(r.body, data[-5:])
        self.assertEqual(r.headers["Content-Range"], f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}")
        r = p.http("GET", "/v1/resources/py-res/py.bin", token=tok,
                   headers={"Range": f"bytes={len(data)}-"})
        self.assertEqual(r.status, 416, r)
        self.assertEqual(r.headers["Content-Range"], f"bytes */{len(data)}")
        r = p.http("GET", "/v1/resources/py-res/py.bin", token=tok, headers={"If-None-Match": f'"{want}"'})
        self.assertEqual(r.status, 304, r)
        # The admin token reads too; a bad name is refused.
        r = p.http("HEAD", "/v1/resources/py-res/py.bin", token=p.admin_token())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.headers["Content-Length"], str(len(data)))
        r = p.http("PUT", "/v1/resources/..%2fescape", b"x", token=tok, headers=octet)
        self.assert_http_error(r, 400, "invalid_name")
        r = p.http("GET", "/v1/resources", token=p.admin_token())
        self.assertEqual(r.status, 200, r)
        self.assertEqual(sorted(x["name"] for x in r.json()["resources"]), ["py-chunked.bin", "py.bin"])
        # Whole downloads last (urllib always sends `Connection: close`).
        for name in ("py.bin", "py-chunked.bin"):
            r = p.http("GET", f"/v1/resources/py-res/{name}", token=tok)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.headers["ETag"], f'"{want}"')
            self.assertEqual(len(r.body), len(data), f"urllib download of {name}")
            self.assertEqual(hashlib.sha256(r.body).hexdigest(), want)

    def test_throughput_256mib_against_python_http_server(self):
        p = self.start_proxy()
        tok = p.token("bench")
        auth = f"Authorization: Bearer {tok}"
        src = self.path("big.bin")
        want = write_random(src, BIG)
        mib = BIG / MIB

        # Upload, streamed from the file (`-T` is PUT).
        out = curl("-T", src, "-H", auth, "-w", "\n%{http_code} %{time_total} %{speed_upload}",
                   p.base + "/v1/resources/big.bin", timeout=BIG_TIMEOUT)
        self.assertEqual(out.returncode, 0, out.stderr)
        body, _, stats = out.stdout.rpartition("\n")
        code, up_secs, _ = stats.split()
        self.assertEqual(code, "201", body)
        self.assertEqual(json.loads(body)["sha256"], want)
        up_secs = float(up_secs)

        # Download to a file.
        dst = self.path("got.bin")
        out = curl("-f", "-H", auth, "-o", dst, "-w", "%{time_total}",
                   p.base + "/v1/resources/bench/big.bin", timeout=BIG_TIMEOUT)
        self.assertEqual(out.returncode, 0, out.stderr)
        down_secs = float(out.stdout)
        self.assertEqual(os.path.getsize(dst), BIG)
        self.assertEqual(file_sha(dst), want)
        os.remove(dst)

        # The same file from `python3 -m http.server` on the same machine.
        srv = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", self.dir],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=clean_env())
        self.addCleanup(lambda: (srv.kill(), srv.wait(WAIT)))
        line: list[bytes] = []
        t = threading.Thread(target=lambda: line.append(srv.stdout.readline()), daemon=True)
        t.start()
        t.join(WAIT)
        self.assertTrue(line and b" port " in line[0], f"http.server did not start: {line!r}")
        port = int(line[0].split(b" port ")[1].split()[0])
        out = curl("-f", "-o", dst, "-w", "%{time_total}", f"http://127.0.0.1:{port}/big.bin",
                   timeout=BIG_TIMEOUT)
        self.assertEqual(out.returncode, 0, out.stderr)
        py_secs = float(out.stdout)
        self.assertEqual(os.path.getsize(dst), BIG)

        which = os.path.relpath(binary()) if binary().startswith(os.getcwd()) else binary()
        print(f"\nresources throughput, curl over loopback, {mib:.0f} MiB, fedmcp ({which}): "
              f"upload {mib / up_secs:.0f} MiB/s ({up_secs:.2f} s), "
              f"download {mib / down_secs:.0f} MiB/s ({down_secs:.2f} s)", flush=True)
        print(f"resources throughput, curl over loopback, {mib:.0f} MiB, python3 -m http.server "
              f"(Python {sys.version.split()[0]}): download {mib / py_secs:.0f} MiB/s ({py_secs:.2f} s)",
              flush=True)
