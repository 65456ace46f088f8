"""A real Orthanc PACS for the tests: the DICOMweb client is tested against a server, not against our idea of one.

Orthanc (https://www.orthanc-server.com) is an open-source PACS with a DICOMweb plugin; Debian packages both
(``apt-get install -y orthanc orthanc-dicomweb``). :class:`OrthancServer` runs a private instance of it: its own
config, storage and index under a folder of the caller's, free ports on 127.0.0.1, remote access off, HTTP
authentication on with a test user. It answers 0.05-0.2 s after it is started (Orthanc 1.10 on Debian 12) and is
killed at the end::

    with OrthancServer(tmp_path) as server:
        server.upload(paths)
        client = connect(server.url_with_credentials())

Where Orthanc is not installed (CI machines), :func:`orthanc_available` says so, and the tests skip with that
reason. ``ORTHANC_BINARY`` and ``ORTHANC_DICOMWEB_PLUGIN`` point at another installation (e.g. Orthanc's own
Linux binaries).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

__all__ = ["orthanc_available", "OrthancServer", "OrthancError"]

PLUGIN_CANDIDATES = (  # Debian/Ubuntu, a local build, Orthanc's Linux binaries unpacked in /opt
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/opt/orthanc/plugins/libOrthancDicomWeb.so",
)
BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc", "/opt/orthanc/Orthanc")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb"
USER, PASSWORD = "selfmedmae", "test-Pa55word-not-for-logs"


class OrthancError(RuntimeError):
    """The test Orthanc did not start, or refused an upload; the message holds its log."""


def _binary() -> str | None:
    if os.environ.get("ORTHANC_BINARY"):  # the one asked for, or none: not another one found by chance
        return shutil.which(os.environ["ORTHANC_BINARY"])
    found = shutil.which("Orthanc")  # /usr/sbin, where Debian puts it, is often not on a user's PATH
    return found or next((p for p in BINARY_CANDIDATES if os.access(p, os.X_OK)), None)


def _plugin() -> str | None:
    candidates = (
        [os.environ["ORTHANC_DICOMWEB_PLUGIN"]] if os.environ.get("ORTHANC_DICOMWEB_PLUGIN") else PLUGIN_CANDIDATES
    )
    return next((p for p in candidates if os.path.isfile(p)), None)


def orthanc_available() -> str | None:
    """None where an Orthanc with its DICOMweb plugin can be started, else the reason to skip."""
    if _binary() is None:
        if os.environ.get("ORTHANC_BINARY"):
            return f"ORTHANC_BINARY={os.environ['ORTHANC_BINARY']} is no executable"
        return f"Orthanc is not installed ({INSTALL}, or set ORTHANC_BINARY)"
    if _plugin() is None:
        return f"the Orthanc DICOMweb plugin is not installed ({INSTALL}, or set ORTHANC_DICOMWEB_PLUGIN)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """A private Orthanc with DICOMweb at :attr:`url`, run for the length of a ``with`` block.

    Everything it writes lies under ``workdir`` (config.json, storage/, index/, orthanc.log); nothing is removed
    on exit, so a failed test leaves the log to read.

    Args:
        workdir: a folder of the caller's (created if missing).
        timeout: seconds to wait for ``/system`` to answer before giving up with the log.
    """

    def __init__(self, workdir: str | os.PathLike, timeout: float = 30.0):
        reason = orthanc_available()
        if reason:
            raise OrthancError(reason)
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.credentials = (USER, PASSWORD)
        self.http_port = self.dicom_port = 0
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        """The REST root, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        """The DICOMweb root (no credentials): ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.base}/dicom-web"

    def url_with_credentials(self, user: str | None = None, password: str | None = None) -> str:
        """:attr:`url` with ``user:password@`` in it (the test user's unless given)."""
        user, password = user or USER, password or PASSWORD
        return f"http://{user}:{password}@127.0.0.1:{self.http_port}/dicom-web"

    def config(self) -> dict:
        """The Orthanc configuration this server runs with."""
        return {
            "Name": "selfmedmae-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "MetricsEnabled": False,
        }

    def start(self, attempts: int = 3) -> OrthancServer:
        """Start Orthanc and wait until it answers; a port taken meanwhile is retried with new ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for attempt in range(attempts):
            self.http_port, self.dicom_port = free_port(), free_port()
            config = self.workdir / "config.json"
            config.write_text(json.dumps(self.config(), indent=2))
            with open(self.workdir / "orthanc.log", "wb") as log:
                self._process = subprocess.Popen([_binary(), str(config)], stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                self.startup_s = time.monotonic() - start
                return self
            code = self._process.poll()
            if code is None or attempt == attempts - 1:  # hung, or failed every time: not a port race
                self.stop()
                break
        what = f"did not answer within {self.timeout} s" if code is None else f"exited with code {code}"
        raise OrthancError(f"Orthanc {what} ({self.base}/system, config {config}); its log:\n{self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                self.request("GET", "/system", timeout=2)
                return True
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        return False

    def stop(self, graceful: bool = False) -> None:
        """Stop Orthanc; its files stay. Killed at once unless ``graceful`` (SIGTERM: Orthanc then takes 3.5 s,
        its HTTP and DICOM servers polling before they stop; SIGKILL after 10 s). Killing loses nothing a test
        needs: the log is written as it goes, and the SQLite index survives a kill."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate() if graceful else self._process.kill()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def request(self, method: str, path: str, data: bytes | None = None, timeout: float = 30) -> bytes:
        """One authenticated REST call (``path`` from the root, e.g. ``/system``); the response body."""
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def upload(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """``POST /instances`` each DICOM file; Orthanc's instance ids. Raises OrthancError with the log if one is
        refused."""
        ids = []
        for path in paths:
            try:
                answer = json.loads(self.request("POST", "/instances", Path(path).read_bytes()))
            except urllib.error.HTTPError as e:
                raise OrthancError(f"Orthanc refused {path}: HTTP {e.code} {e.read()[:500]!r}\n{self.log()}") from e
            ids.append(answer["ID"])
        return ids

    def log(self) -> str:
        """What Orthanc has written to its log so far."""
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""
