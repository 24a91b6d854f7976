"""A private, unprivileged-port Postfix instance under a temp directory (never the system's /etc/postfix).

Its own config_directory, queue_directory and data_directory; smtpd on 127.0.0.1:<port> with STARTTLS (the
test CA's certificate) and Cyrus SASL (sasldb, PLAIN/LOGIN, AUTH only after STARTTLS); relays every message to
relayhost = [127.0.0.1]:<sink port>. Started with `postfix -c DIR start`, stopped with `postfix -c DIR stop`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .net import free_port

HOSTNAME = "pftest.localdomain"

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# nobody is trusted by address: relaying needs SASL
mynetworks = 192.0.2.1/32
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_auth_only = yes
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
message_size_limit = {size_limit}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_local_domain = $myhostname
# Debian's Postfix looks in $config_directory/sasl whatever this says; both name the same directory here.
cyrus_sasl_config_path = {root}/etc/sasl
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtputf8_enable = no
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
biff = no
# the message is not Postfix's to edit (no Message-Id/Date added): the sink must see the client's bytes
local_header_rewrite_clients =
append_dot_mydomain = no
"""

SMTPD_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {root}/sasldb2
mech_list: PLAIN LOGIN
"""


class Postfix:
    def __init__(
        self, sink_port: int, cert: Path, key: Path, user: str, password: str, size_limit: int = 10240000
    ) -> None:
        self.sink_port = sink_port
        self.size_limit = size_limit
        self.user = user
        self.password = password
        # Not under pytest's 0700 tmp dir: Postfix's daemons run as the postfix user and must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="smtp-relay-postfix-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.cert = self.root / "cert.pem"
        self.key = self.root / "key.pem"
        shutil.copyfile(cert, self.cert)
        shutil.copyfile(key, self.key)
        self.key.chmod(0o600)

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.root / "etc"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> Postfix:
        etc = self.root / "etc"
        sasl = etc / "sasl"
        for d in (etc, sasl, self.root / "data", self.root / "spool"):
            d.mkdir()
        fields = {
            "root": self.root,
            "hostname": HOSTNAME,
            "sink_port": self.sink_port,
            "size_limit": self.size_limit,
            "cert": self.cert,
            "key": self.key,
            "listen": f"127.0.0.1:{self.port}",
        }
        (etc / "main.cf").write_text(MAIN_CF.format(**fields))
        (etc / "master.cf").write_text(MASTER_CF.format(**fields))
        (sasl / "smtpd.conf").write_text(SMTPD_CONF.format(**fields))
        sasldb = self.root / "sasldb2"
        subprocess.run(
            ["saslpasswd2", "-f", str(sasldb), "-u", HOSTNAME, "-p", "-c", self.user],
            input=self.password,
            text=True,
            check=True,
            timeout=10,
        )
        shutil.chown(self.root / "data", "postfix", "postfix")
        shutil.chown(sasldb, "postfix", "postfix")
        sasldb.chmod(0o600)
        check = self._postfix("check")
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stderr}\n{check.stdout}")
        started = self._postfix("start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr}\n{started.stdout}\n{self.log()}")
        self._wait_listening(20)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.1)
        raise RuntimeError(f"postfix not listening on {self.port}\n{self.log()}")

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue_is_empty(self) -> bool:
        spool = self.root / "spool"
        return not any(
            f.is_file() for name in ("incoming", "active", "deferred", "hold") for f in (spool / name).rglob("*")
        )

    def stop(self) -> None:
        self._postfix("stop", timeout=30)
        pid_file = self.root / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.1)
        else:
            if pid_file.exists():
                with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
