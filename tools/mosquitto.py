"""A throwaway Mosquitto broker on a free 127.0.0.1 port, for tests, the benchmark and the demo.

Persistence is on and stop() uses SIGTERM, so a restart on the same port keeps persistent
sessions and queued messages, as a production broker would.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gateway.errors import FogmeshError
from tools.net import free_port

__all__ = ["Mosquitto", "MosquittoError", "MosquittoTls", "find_mosquitto", "free_port"]

_INSTALL_HINT = "install it: apt-get install -y mosquitto"
_HOST = "127.0.0.1"  # never anything but loopback


class MosquittoError(FogmeshError):
    """Mosquitto is missing, or did not start or stop as asked."""


@dataclass(frozen=True, slots=True)
class MosquittoTls:
    """Server side of a TLS listener; with `require_certificate` clients must present one."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


def find_mosquitto() -> Path:
    """Path of the mosquitto binary; MosquittoError with the install command when absent."""
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MosquittoError(f"mosquitto is not installed; {_INSTALL_HINT}")


class Mosquitto:
    """One broker process. Use as a context manager, or call start()/stop() yourself.

    `users` maps user names to passwords (a password file is written with mosquitto_passwd and
    anonymous access is then refused); `acl` is the text of an ACL file; `extra_config` is
    appended verbatim to the generated mosquitto.conf.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: MosquittoTls | None = None,
        extra_config: str = "",
        start_timeout_s: float = 10.0,
    ) -> None:
        self.binary = find_mosquitto()
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fogmesh-mosquitto-"))
        self.users = users
        self.acl = acl
        self.tls = tls
        self.extra_config = extra_config
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ---- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return _HOST

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    # ---- config ------------------------------------------------------------------------

    def _write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {_HOST}",
            "persistence true",
            f"persistence_location {data}/",
            "autosave_interval 1",  # also keeps most of the state if the broker is SIGKILLed
            "max_queued_messages 0",  # unlimited: an offline subscriber must not lose messages
            "max_queued_bytes 0",
            "max_inflight_messages 1000",  # also the Receive Maximum given to MQTT 5 clients
            "persistent_client_expiration 1d",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Run as root, mosquitto would switch to user `mosquitto`, who can't write workdir.
            lines.append(f"user {getpass.getuser()}")
        if self.users is not None:
            pwfile = self.workdir / "passwd"
            pwfile.unlink(missing_ok=True)
            pwfile.touch(mode=0o600)
            mp = shutil.which("mosquitto_passwd")
            if mp is None:
                raise MosquittoError(f"mosquitto_passwd is not installed; {_INSTALL_HINT}")
            for user, password in self.users.items():
                subprocess.run(
                    [mp, "-b", str(pwfile), user, password], check=True, capture_output=True
                )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl)
            acl_file.chmod(0o600)
            lines.append(f"acl_file {acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        if self.extra_config:
            lines.append(self.extra_config)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def set_acl(self, acl: str) -> None:
        """Replace the ACL file and make the running broker reload it (SIGHUP)."""
        if self.acl is None:
            raise MosquittoError("the broker was started without an ACL file")
        self.acl = acl
        (self.workdir / "acl").write_text(acl)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Mosquitto:
        if self.running:
            return self
        self._write_config()
        self.proc = subprocess.Popen(
            [str(self.binary), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise MosquittoError(
                    f"mosquitto exited at start on port {self.port}: "
                    f"{err.strip() or self._log_tail()}"
                )
            with contextlib.suppress(OSError), socket.create_connection((_HOST, self.port), 0.2):
                self.starts += 1
                return self
            time.sleep(0.02)
        self.kill()
        raise MosquittoError(f"mosquitto did not accept connections on port {self.port}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, so the broker writes its persistence file, then wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise MosquittoError(
                    f"mosquitto did not stop within {timeout_s} s; killed"
                ) from None
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: the broker loses what it had not saved."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (SIGTERM), stay down for down_s, start again on the same port."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
