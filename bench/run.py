"""`make bench`: smtp-relay vs a Postfix authenticated relay vs the direct-to-sink ceiling, side by side.

Everything runs on 127.0.0.1 under a temporary directory: Postfix's `smtp-sink` counts what is delivered, stunnel
puts implicit TLS in front of it, a private Postfix instance (own config/queue/data directories, Cyrus sasldb) is the
relay an operator would otherwise deploy, and `smtp-relay` is started as a user runs it (the installed command with
environment variables). The system mail configuration (/etc/postfix) is never touched.

    python bench/run.py [--quick] [--repeats N]

Exit status 1 if any message failed or was not delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from smtp_relay.config import usable_cpus, variable_names

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
USER, PASSWORD = "bench", "bench-Secret-42"
CLK = os.sysconf("SC_CLK_TCK")
# Every process the run starts, registered as soon as it exists: stopped at the end whatever happened.
STARTED: list[subprocess.Popen[bytes]] = []
# A load generator run never takes longer than this (a hung target fails the run instead of stalling it).
LOAD_TIMEOUT = 600
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- tools ------------------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """Install smtp-sink (postfix), saslpasswd2, the SASL modules and stunnel if missing (Debian)."""
    needed = {
        "/usr/sbin/smtp-sink": "postfix",
        "/usr/sbin/postfix": "postfix",
        "/usr/sbin/saslpasswd2": "sasl2-bin",
        "/usr/bin/stunnel4": "stunnel4",
    }
    missing = sorted({pkg for path, pkg in needed.items() if not Path(path).exists()})
    if not list(Path("/usr/lib").glob("*/sasl2/libplain.so*")):  # Postfix's AUTH PLAIN (a Recommends of sasl2)
        missing.append("libsasl2-modules")
    if not missing:
        return
    log(f"installing {' '.join(missing)} (apt-get)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(
        [*sudo, "debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    # --no-remove: Debian's postfix conflicts with other mail servers (exim4, nullmailer); never replace one.
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-remove", *missing], check=True, env=env)


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (plus its reaped children when asked)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK


def tree_cpu(root: int) -> float:
    """CPU of a process, its reaped children, and its live children (Postfix's master and its daemons)."""
    return proc_cpu(root, children=True) + sum(proc_cpu(pid) for pid in family(root)[1:])


def machine_busy() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def quiet_machine(busy_below: float = 0.25, window: float = 0.2, limit: float = 5.0) -> None:
    """Wait (at most `limit` seconds) until the machine's CPUs are mostly idle over a short window.

    A sample should not start while the previous one's work still runs: Postfix goes on writing and removing queue
    files and logging after the last message reached the sink, and that would land on whichever target comes next.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy0, total0 = machine_busy()
        time.sleep(window)
        busy1, total1 = machine_busy()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            return


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def family(root: int) -> list[int]:
    """A process and its live children (a WORKERS supervisor and its workers)."""
    pids = [root]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                pids.append(int(stat.parent.name))
    return pids


def rss_sum_kb(pids: list[int]) -> int:
    return sum(rss_kb(pid) for pid in pids)


# -- the pieces -------------------------------------------------------------------------------------------------


class Sink:
    """smtp-sink with running counters (-c): `delivered` is its count of messages received."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["/usr/sbin/smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "2048"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        STARTED.append(self.proc)
        wait_port(self.port)

    def counters(self) -> tuple[int, int]:
        """(sessions, messages) so far, from the end of its output (which grows by a line per count)."""
        with open(self.out, "rb") as out:
            out.seek(max(0, out.seek(0, os.SEEK_END) - 200))
            tail = out.read().split(b"\r")
        for chunk in reversed(tail):
            parts = dict(p.split(b"=", 1) for p in chunk.split() if b"=" in p)
            if b"mesg" in parts and b"sess" in parts:
                return int(parts[b"sess"]), int(parts[b"mesg"])
        return 0, 0

    @property
    def delivered(self) -> int:
        return self.counters()[1]


class Stunnel:
    """Implicit TLS on `port` in front of the sink, with a trustme certificate for 127.0.0.1."""

    def __init__(self, workdir: Path, sink_port: int, cert: Path, key: Path) -> None:
        self.port = free_port()
        conf = workdir / "stunnel.conf"
        conf.write_text(
            f"foreground = yes\npid =\nsyslog = no\noutput = {workdir / 'stunnel.log'}\ndebug = 3\n"
            f"[smtps]\naccept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{sink_port}\n"
            f"cert = {cert}\nkey = {key}\n"
        )
        self.proc = subprocess.Popen(
            ["/usr/bin/stunnel4", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        STARTED.append(self.proc)
        wait_port(self.port)


def relay_command() -> list[str]:
    installed = Path(sys.executable).parent / "smtp-relay"
    if installed.exists():
        return [str(installed)]
    found = shutil.which("smtp-relay")
    return [found] if found else [sys.executable, "-m", "smtp_relay"]


class Relay:
    """The smtp-relay command with AUTH and allowlists on, as a user runs it."""

    def __init__(self, workdir: Path, name: str, upstream_port: int, **env: str) -> None:
        self.port = free_port()
        # The caller's own relay settings (a WORKERS or LOG_LEVEL left in the shell) must not change a target.
        outside = {k: v for k, v in os.environ.items() if k not in variable_names()}
        full = dict(
            outside,
            LISTEN_HOST="127.0.0.1",
            LISTEN_PORT=str(self.port),
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=str(upstream_port),
            RELAY_USE_TLS="false",
            SMTP_AUTH_USERNAME=USER,
            SMTP_AUTH_PASSWORD=PASSWORD,
            ALLOWED_FROM_DOMAINS="example.com",
            ALLOWED_TO_DOMAINS="example.com",
            MAX_CONNECTIONS="600",
            LOG_FILE="",
            **env,
        )
        with open(workdir / f"relay-{name}.log", "wb") as out:
            self.proc = subprocess.Popen(
                relay_command(), env=full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        STARTED.append(self.proc)
        wait_port(self.port)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)


MASTER_CF = """\
{listen} inet n - n - 200 smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: SASL-authenticated submission, sender/recipient allowlists, relayhost = sink."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.port = free_port()
        self.dir = workdir / "postfix"
        # Debian's Postfix reads <config_directory>/sasl/smtpd.conf: keep cyrus_sasl_config_path pointing there.
        conf, queue, data, sasl = (self.dir / d for d in ("etc", "queue", "data", "etc/sasl"))
        for d in (conf, queue, data, sasl):
            d.mkdir(parents=True)
        shutil.chown(data, "postfix", "postfix")
        sasldb = sasl / "sasldb2"
        subprocess.run(
            ["/usr/sbin/saslpasswd2", "-c", "-p", "-f", str(sasldb), "-u", "bench.localdomain", USER],
            input=PASSWORD.encode(),
            check=True,
        )
        shutil.chown(sasldb, "postfix", "postfix")
        os.chmod(sasldb, 0o600)
        (sasl / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\nmech_list: PLAIN LOGIN\n"
        )
        (conf / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
maillog_file_prefixes = {self.dir}
maillog_file = {self.dir / "maillog"}
myhostname = bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.1/32
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = [127.0.0.1]:{sink_port}
biff = no
alias_maps =
alias_database =
local_recipient_maps =
append_dot_mydomain = no
smtputf8_enable = no
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_local_domain = bench.localdomain
cyrus_sasl_config_path = {sasl}
smtpd_sasl_security_options = noanonymous
broken_sasl_auth_clients = no
smtpd_client_restrictions =
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_sender_restrictions = check_sender_access inline:{{ example.com=OK }}, reject
smtpd_recipient_restrictions = check_recipient_access inline:{{ example.com=OK }}, reject
smtp_tls_security_level = none
message_size_limit = 26214400
default_process_limit = 200
"""
        )
        (conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        self.conf, self.queue = conf, queue
        self.master = 0

    def start(self) -> None:
        """Separate from the set-up, so that the caller holds the object (and its `stop`) before anything runs."""
        subprocess.run(["/usr/sbin/postfix", "-c", str(self.conf), "start"], check=True, capture_output=True)
        wait_port(self.port)
        self.master = int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def cpu(self) -> float:
        return tree_cpu(self.master)

    def stop(self) -> None:
        subprocess.run(["/usr/sbin/postfix", "-c", str(self.conf), "stop"], check=False, capture_output=True)


# The relay as the README advises for a multi-core host: WORKERS=auto, one worker per usable CPU.
WORKERS_TARGET = f"smtp-relay, WORKERS=auto ({min(64, usable_cpus())})"
WORKERS_TLS_TARGET = f"{WORKERS_TARGET}, TLS upstream"
MAIN_TARGETS = ("ceiling", "smtp-relay", WORKERS_TARGET, "postfix")

# -- measurements -----------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    size: int
    conns: int
    per_conn: int
    rounds: int
    targets: tuple[str, ...]
    # Measured twice per repeat, the second time in reverse order (A B B A): a ratio with a small margin gets
    # twice the pairs, and a machine that speeds up or slows down during the repeat favours neither target.
    twice: bool = False


@dataclass
class Sample:
    rate: float
    p50: float
    p99: float
    cpu_ms: float
    gen_cpu_ms: float
    upstream_sessions: int


@dataclass
class Row:
    samples: list[Sample] = field(default_factory=list)


def loadgen_command(port: int, auth: bool, **options: int) -> list[str]:
    """The load generator's command line: `options` are its flags (size=1024 -> --size 1024)."""
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--port", str(port)]
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    if auth:
        cmd += ["--user", USER, "--password", PASSWORD]
    return cmd


def run_load(port: int, sc: Scenario, auth: bool, sink: Sink, cpu_of: callable) -> Sample:  # type: ignore[valid-type]
    expected = sc.conns * sc.per_conn * sc.rounds
    sess0, before = sink.counters()
    cpu0 = cpu_of()
    cmd = loadgen_command(port, auth, size=sc.size, conns=sc.conns, per_conn=sc.per_conn, rounds=sc.rounds)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=LOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"load generator on {sc.name} did not finish within {LOAD_TIMEOUT} s") from None
    result = json.loads(done.stdout or "{}") if done.stdout.strip() else {}
    if done.returncode != 0:
        raise SystemExit(f"load generator failed on {sc.name}: {result.get('errors') or done.stderr[-2000:]}")
    exited = time.monotonic()
    deadline = exited + 120
    while sink.delivered - before < expected and time.monotonic() < deadline:
        time.sleep(0.005)
    finished = time.monotonic()
    cpu1 = cpu_of()
    delivered = sink.delivered - before
    if delivered < expected:
        raise SystemExit(f"{sc.name}: only {delivered} of {expected} messages were delivered to the sink")
    time.sleep(0.05)  # a message delivered twice would show up right behind the last one
    if sink.delivered - before != expected:
        raise SystemExit(f"{sc.name}: {sink.delivered - before} deliveries for {expected} messages")
    # Delivered rate: the generator's own sending time plus however long delivery lagged behind its exit.
    elapsed = result["elapsed"] + (finished - exited)
    return Sample(
        rate=expected / elapsed,
        p50=result["p50_ms"],
        p99=result["p99_ms"],
        cpu_ms=(cpu1 - cpu0) * 1000 / expected,
        gen_cpu_ms=result["cpu_s"] * 1000 / expected,
        upstream_sessions=sink.counters()[0] - sess0,
    )


def fmt_range(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


@dataclass
class Memory:
    idle_kb: float  # RSS per idle authenticated connection
    idle_n: int
    large_mb: float  # peak RSS added while `large_n` 10 MB messages are relayed at once
    large_n: int


def memory(relay: Relay, sink: Sink, quick: bool) -> Memory:
    try:
        return _memory(relay, sink, quick)
    finally:
        relay.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):  # else stopped with the rest at the end
            relay.proc.wait(timeout=15)


def _memory(relay: Relay, sink: Sink, quick: bool) -> Memory:
    time.sleep(1.0)  # started, and with WORKERS its workers forked
    pids = family(relay.proc.pid)  # its workers too, with WORKERS
    idle_n = 100 if quick else 500
    base = rss_sum_kb(pids)
    gen = subprocess.Popen(
        loadgen_command(relay.port, True, conns=idle_n, per_conn=0, hold=4),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(gen)  # type: ignore[arg-type]
    lines: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        assert gen.stderr is not None
        for line in gen.stderr:
            lines.put(line)
        lines.put("")  # end of output

    threading.Thread(target=read_stderr, daemon=True).start()
    ready, err, deadline = "", [], time.monotonic() + 120
    while not ready.startswith("ready"):  # "ready N" once every connection is open and logged in
        try:
            ready = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise SystemExit(f"idle connections: not all {idle_n} logged in within 120 s") from None
        if not ready:
            break  # the generator ended without saying so: judged below
        if not ready.startswith("ready"):
            err.append(ready)
    held = rss_sum_kb(pids)
    try:
        gen.wait(timeout=60)  # its only stdout is one short JSON line, which the pipe holds until read
    except subprocess.TimeoutExpired:
        raise SystemExit("idle connections: the load generator did not finish") from None
    assert gen.stdout is not None
    out = gen.stdout.read()
    result = json.loads(out) if out.strip() else {}
    if gen.returncode != 0 or ready.split()[:2] != ["ready", str(idle_n)] or result.get("failed"):
        raise SystemExit(f"idle connections: not all {idle_n} logged in: {ready!r} {result.get('errors')} {err[-5:]}")
    idle_kb = (held - base) / idle_n
    # Peak RSS while 20 concurrent 10 MB messages are relayed.
    n, size = (5, 10_000_000) if quick else (20, 10_000_000)
    time.sleep(0.5)
    base = rss_sum_kb(pids)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, rss_sum_kb(pids))
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    before = sink.delivered
    try:
        done = subprocess.run(
            loadgen_command(relay.port, True, conns=n, per_conn=1, rounds=1, size=size),
            capture_output=True,
            text=True,
            check=False,
            timeout=LOAD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"large-message run did not finish within {LOAD_TIMEOUT} s") from None
    finally:
        stop.set()
        t.join()
    if done.returncode != 0:
        raise SystemExit(f"large-message run failed: {done.stdout} {done.stderr[-1000:]}")
    time.sleep(0.2)
    if sink.delivered - before != n:
        raise SystemExit(f"large-message run: {sink.delivered - before} deliveries for {n} messages")
    return Memory(idle_kb, idle_n, (peak - base) / 1024, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages and one repeat (about a minute)")
    ap.add_argument("--repeats", type=int, default=0, help="repeats per scenario (default 5, --quick 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    k = 1 if args.quick else 3  # rounds multiplier
    if os.geteuid() != 0:
        log("note: the private Postfix instance needs root; run as root (e.g. in the CI container)")
    ensure_tools()
    import trustme  # test extra, installed by `make install`

    workdir = Path(tempfile.mkdtemp(prefix="smtp-relay-bench-"))
    os.chmod(workdir, 0o755)  # noqa: S103 (Postfix daemons and smtp-sink run as other users)
    postfix: Postfix | None = None

    def stop_run(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    # A closed terminal or a CI timeout stops the run as Ctrl-C does: through `finally`, nothing left behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_run)
    failed = False
    try:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert_pem, key_pem, ca_pem = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
        cert_pem.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_pem))
        ca.cert_pem.write_to_path(str(ca_pem))
        sink = Sink(workdir)
        tunnel = Stunnel(workdir, sink.port, cert_pem, key_pem)
        relay = Relay(workdir, "plain", sink.port)
        # One worker per usable CPU, as the README advises for a multi-core host.
        relay_workers = Relay(workdir, "workers", sink.port, WORKERS="auto")
        relay_tls = Relay(
            workdir,
            "tls",
            tunnel.port,
            RELAY_USE_SSL="true",
            RELAY_TLS_CA_FILE=str(ca_pem),
        )
        relay_workers_tls = Relay(
            workdir, "workers-tls", tunnel.port, WORKERS="auto", RELAY_USE_SSL="true", RELAY_TLS_CA_FILE=str(ca_pem)
        )
        # The same with upstream connection reuse off: what the pool saves over a TLS handshake per message.
        relay_tls_fresh = Relay(
            workdir,
            "tls-no-pool",
            tunnel.port,
            RELAY_USE_SSL="true",
            RELAY_TLS_CA_FILE=str(ca_pem),
            RELAY_POOL_SIZE="0",
        )
        postfix = Postfix(workdir, sink.port)
        postfix.start()
        log(
            f"workdir {workdir}; sink :{sink.port}, stunnel :{tunnel.port}, relay :{relay.port}, "
            f"postfix :{postfix.port}"
        )

        targets = {
            "ceiling": (sink.port, False, lambda: proc_cpu(sink.proc.pid)),
            "smtp-relay": (relay.port, True, relay.cpu),
            WORKERS_TARGET: (relay_workers.port, True, lambda: tree_cpu(relay_workers.proc.pid)),
            "postfix": (postfix.port, True, postfix.cpu),
            "smtp-relay, TLS upstream": (relay_tls.port, True, relay_tls.cpu),
            "smtp-relay, TLS upstream, no reuse": (relay_tls_fresh.port, True, relay_tls_fresh.cpu),
            WORKERS_TLS_TARGET: (relay_workers_tls.port, True, lambda: tree_cpu(relay_workers_tls.proc.pid)),
        }
        scenarios = [
            Scenario("1 KB, 10/conn, 10 conns", 1024, 10, 10, 20 * k, MAIN_TARGETS),
            Scenario("1 KB, 1/conn, 50 conns", 1024, 50, 1, 10 * k, MAIN_TARGETS),
            Scenario("100 KB, 10/conn, 10 conns", 100_000, 10, 10, 3 * k, MAIN_TARGETS),
            Scenario(
                "1 KB, 10/conn, 10 conns, upstream",
                1024,
                10,
                10,
                20 * k,
                ("smtp-relay", "smtp-relay, TLS upstream"),
                twice=True,
            ),
            Scenario(
                "1 KB, 10/conn, 10 conns, TLS upstream",
                1024,
                10,
                10,
                2 * k,
                ("smtp-relay, TLS upstream", "smtp-relay, TLS upstream, no reuse"),
            ),
            # The TLS target for the configuration that meets the throughput targets, too.
            Scenario(
                "1 KB, 10/conn, 10 conns, upstream, WORKERS=auto",
                1024,
                10,
                10,
                20 * k,
                (WORKERS_TARGET, WORKERS_TLS_TARGET),
                twice=True,
            ),
        ]
        # Warm-up (imports, TLS contexts, Postfix's processes) outside the measurements.
        warm = Scenario("warm-up", 1024, 5, 2, 1, ())
        for name in (
            "smtp-relay",
            WORKERS_TARGET,
            "postfix",
            "smtp-relay, TLS upstream",
            "smtp-relay, TLS upstream, no reuse",
            WORKERS_TLS_TARGET,
        ):
            port, auth, cpu_of = targets[name]
            run_load(port, warm, auth, sink, cpu_of)
        results: dict[tuple[str, str], Row] = {}
        for rep in range(repeats):
            for sc in scenarios:
                # Every other repeat in reverse order: a target that always ran first (or right after Postfix,
                # whose queue work can linger) would carry that position's bias into every paired ratio.
                order = list(sc.targets if rep % 2 == 0 else reversed(sc.targets))
                for name in order + order[::-1] if sc.twice else order:
                    port, auth, cpu_of = targets[name]
                    # A few messages first, so that every target starts warm (upstream sessions open), as in
                    # steady traffic: an idle pool expires between a target's turns in this interleaved run.
                    quiet_machine()
                    run_load(port, warm, auth, sink, cpu_of)
                    sample = run_load(port, sc, auth, sink, cpu_of)
                    results.setdefault((sc.name, name), Row()).samples.append(sample)
                    log(f"rep {rep + 1}/{repeats} {sc.name} / {name}: {sample.rate:.0f} msg/s p99 {sample.p99:.1f} ms")
        # Memory on a fresh relay process, so that heap left over from the runs above does not hide the cost.
        mems = {
            "smtp-relay": memory(Relay(workdir, "memory", sink.port), sink, args.quick),
            WORKERS_TARGET: memory(Relay(workdir, "memory-workers", sink.port, WORKERS="auto"), sink, args.quick),
        }
        print_report(scenarios, results, mems, repeats)
    except SystemExit as exc:
        log(f"FAILED: {exc}")
        failed = True
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        if postfix is not None:
            postfix.stop()
        for p in STARTED:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in STARTED:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def print_report(
    scenarios: list[Scenario], results: dict[tuple[str, str], Row], mems: dict[str, Memory], reps: int
) -> None:
    print(f"\nmedian (min-max) of {reps} interleaved run(s); CPU = ms of CPU per message in the system under test")
    print("(ceiling: smtp-sink itself), gen = the load generator's CPU per message; up = upstream sessions opened\n")
    header = "| scenario | target | msgs/s | p50 ms | p99 ms | CPU ms/msg | gen ms/msg | up |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for sc in scenarios:
        for name in sc.targets:
            s = results[(sc.name, name)].samples
            print(
                f"| {sc.name} | {name} | {fmt_range([x.rate for x in s])} | {fmt_range([x.p50 for x in s], 1)} "
                f"| {fmt_range([x.p99 for x in s], 1)} | {fmt_range([x.cpu_ms for x in s], 2)} "
                f"| {fmt_range([x.gen_cpu_ms for x in s], 2)} | {s[-1].upstream_sessions} |"
            )

    def med(sc: str, name: str, attr: str = "rate") -> float:
        return statistics.median(getattr(x, attr) for x in results[(sc, name)].samples)

    def paired(sc: str, a: str, b: str, attr: str = "rate") -> list[float]:
        """a / b per repeat: both were measured moments apart, so a slow phase of the machine hits both."""
        pairs = zip(results[(sc, a)].samples, results[(sc, b)].samples, strict=True)
        return [getattr(x, attr) / getattr(y, attr) for x, y in pairs]

    print("\nratios: median (min-max) over the repeats of a / b measured in the same repeat")
    checks: list[tuple[str, float, bool]] = []
    for n, sc in enumerate(scenarios[:3]):
        for relay in ("smtp-relay", WORKERS_TARGET):
            rate = paired(sc.name, relay, "postfix")
            p99 = paired(sc.name, relay, "postfix", "p99")
            print(
                f"- {sc.name}, {relay}: msgs/s / postfix = {fmt_range(rate, 2)}x, "
                f"/ ceiling = {fmt_range(paired(sc.name, relay, 'ceiling'), 2)}x, "
                f"p99 / postfix p99 = {fmt_range(p99, 2)}x"
            )
            if n == 0:
                checks.append(
                    (f"1 KB, 10/conn >= 4x Postfix ({relay})", statistics.median(rate), statistics.median(rate) >= 4)
                )
            elif n == 1:
                checks.append(
                    (f"p99 at 50 conns <= Postfix's ({relay})", statistics.median(p99), statistics.median(p99) <= 1)
                )
            else:
                checks.append(
                    (f"100 KB, 10/conn >= 2x Postfix ({relay})", statistics.median(rate), statistics.median(rate) >= 2)
                )
    for sc, plain, tls_target in (
        (scenarios[3].name, "smtp-relay", "smtp-relay, TLS upstream"),
        (scenarios[5].name, WORKERS_TARGET, WORKERS_TLS_TARGET),
    ):
        tls_ratio = paired(sc, tls_target, plain)
        median = statistics.median(tls_ratio)
        print(
            f"- TLS upstream / plain upstream ({plain}) = {fmt_range(tls_ratio, 2)}x "
            f"({len(tls_ratio)} pairs: twice per repeat)"
        )
        checks.append((f"TLS upstream >= 0.8x plain ({plain})", median, median >= 0.8))
    tls, reuse, fresh = scenarios[4].name, "smtp-relay, TLS upstream", "smtp-relay, TLS upstream, no reuse"
    print(
        f"- TLS upstream, connection reuse / a connection per message (RELAY_POOL_SIZE=0) = "
        f"{fmt_range(paired(tls, reuse, fresh), 2)}x msgs/s, "
        f"{fmt_range(paired(tls, fresh, reuse, 'cpu_ms'), 2)}x less CPU per message"
    )
    for relay, mem in mems.items():
        together = "" if relay == "smtp-relay" else "; the supervisor's and its workers' RSS together"
        print(f"\nmemory ({relay}{together}):")
        print(f"- {mem.idle_kb:.1f} KB per idle authenticated connection ({mem.idle_n} open)")
        print(f"- +{mem.large_mb:.0f} MB peak RSS while {mem.large_n} concurrent 10 MB messages are relayed")
        checks.append((f"idle authenticated connection <= 12 KB ({relay})", mem.idle_kb, mem.idle_kb <= 12))
        checks.append((f"concurrent 10 MB messages add < 100 MB RSS ({relay})", mem.large_mb, mem.large_mb < 100))
    print("\ntargets (medians above):")
    for label, value, met in checks:
        print(f"- {label}: {value:.2f} -> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
