"""Lab: a throw-away etcd cluster on loopback, for the cluster mode's tests.

Members are /usr/bin/etcd processes on free 127.0.0.1 ports, each with its own
data directory under one temporary root. Tests kill, stop and restart them to
see what the agents do; `close` removes every process and file, also after a
failure.

Optionally the client port speaks TLS and wants a client certificate from the
lab's own CA (`Pki`), and `enable_rbac` turns on etcd's authentication with one
role per node. What the JSON gateway (the product's path, through etcd3gw)
accepts shapes both, see `Pki.issue_client` and `Credentials`.
"""

from __future__ import annotations

import atexit
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..resource import Resource

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
LOOPBACK = "127.0.0.1"
DEFAULT_PREFIX = "/isoebpf/"
ADMIN = "isoebpf-admin"
ROOT = "root"  # etcd wants this user (with its role) before it enables authentication


class Pki:
    """A CA and the certificates it signs, made with the openssl CLI in `directory`.

    EC P-256 keys: made at once, where RSA keys would cost a visible share of a start."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700)
        self.ca = directory / "ca.crt"
        self._ca_key = directory / "ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-days", "2", "-subj", "/CN=isoebpf lab CA",
                 "-keyout", str(self._ca_key), "-out", str(self.ca))

    def issue_server(self) -> tuple[Path, Path]:
        """The members' certificate for 127.0.0.1. It is also a client certificate because
        the JSON gateway inside each member dials its own gRPC port with it. Its CN is no
        etcd user: 3.4 ignores it on gateway requests, but gRPC would grant that user's rights."""
        return self._issue("server", "/CN=isoebpf lab etcd member",
                           f"subjectAltName=IP:{LOOPBACK}\nextendedKeyUsage=serverAuth,clientAuth\n")

    def issue_client(self, name: str, *, common_name: bool) -> tuple[Path, Path]:
        """A client certificate. With `common_name`, its CN is `name` and etcd takes it for
        that user on gRPC (etcdctl). Without, it only opens the TLS door: with auth on, the
        gateway answers HTTP 400 to any certificate that has a CN, so gateway clients carry
        one without and say who they are with a password."""
        subject = f"/CN={name}" if common_name else f"/O=isoebpf/OU={name}"
        return self._issue(name, subject, "extendedKeyUsage=clientAuth\n")

    def _issue(self, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
        cert, key, request = (self.directory / f"{name}.{suffix}" for suffix in ("crt", "key", "csr"))
        profile = self.directory / f"{name}.ext"
        profile.write_text(extensions)
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-subj", subject, "-keyout", str(key), "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-days", "2", "-CA", str(self.ca),
                 "-CAkey", str(self._ca_key), "-CAcreateserial",
                 "-CAserial", str(self.directory / "ca.srl"), "-extfile", str(profile),
                 "-out", str(cert))
        return cert, key


@dataclass(frozen=True)
class Credentials:
    """How one etcd user reaches the JSON gateway: a client certificate without a CN and
    a password, which POST /v3/auth/authenticate trades for a token the requests carry
    in their `Authorization` header."""

    user: str
    cert: Path
    key: Path
    password_file: Path

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()


@dataclass(frozen=True)
class Rbac:
    """The users `enable_rbac` made, and the keys their roles cover."""

    prefix: str
    admin: Credentials
    nodes: dict[str, Credentials]

    @property
    def policy_prefix(self) -> str:
        return f"{self.prefix}policy/"

    def node_prefix(self, node: str) -> str:
        """Where a node's agent reports (its status and its heartbeat)."""
        return f"{self.prefix}nodes/{node}/"

    def status_key(self, node: str) -> str:
        return f"{self.node_prefix(node)}status"


@dataclass(eq=False)  # members are told apart by identity: kill(m), start(m)
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    scheme: str
    process: subprocess.Popen[bytes] | None = None  # None: not started, or stopped by the lab
    id: int | None = None  # etcd's member id, once it has answered

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    @property
    def running(self) -> bool:
        """Started and not stopped by the lab (one that died by itself counts, to be noticed)."""
        return self.process is not None


@dataclass(eq=False)
class EtcdCluster(Resource):
    """`size` etcd members on loopback. With `tls`, clients need a certificate from `pki`.

    Members die with the thread that starts them (the kernel's parent-death signal), so
    start a cluster from a thread that lives as long as it: pytest's main thread."""

    size: int = 3
    tls: bool = False
    # Fast elections, so that a test sees a new leader within about a second.
    heartbeat_ms: int = 50
    election_ms: int = 500
    # How often idle watches that asked for it get a progress notification (etcd: 10m).
    progress_notify_interval: str = "1s"
    start_timeout: float = 15.0
    members: list[Member] = field(default_factory=list)
    pki: Pki | None = None
    rbac: Rbac | None = None
    _root: Path | None = None
    _server_flags: tuple[str, ...] = ()
    _etcdctl_flags: tuple[str, ...] = ()

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _open(self) -> None:
        atexit.register(self.close)  # a cluster a test forgot to close still goes at exit
        self._root = Path(tempfile.mkdtemp(prefix="isoebpf-etcd-"))
        scheme = "https" if self.tls else "http"
        ports = _free_ports(2 * self.size)
        self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self._root / f"m{i}", scheme)
                        for i in range(self.size)]
        if self.tls:
            self._prepare_tls()
        for member in self.members:
            self._spawn(member)
        self.leader(timeout=self.start_timeout)

    def _prepare_tls(self) -> None:
        """The CA, the members' certificate and `root`'s, which the lab's etcdctl presents."""
        assert self._root is not None
        self.pki = Pki(self._root / "pki")
        cert, key = self.pki.issue_server()
        self._server_flags = ("--client-cert-auth", "--trusted-ca-file", str(self.pki.ca),
                              "--cert-file", str(cert), "--key-file", str(key))
        cert, key = self.pki.issue_client(ROOT, common_name=True)
        self._etcdctl_flags = ("--cacert", str(self.pki.ca), "--cert", str(cert), "--key", str(key))

    def _command(self, member: Member) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            # setpriv (util-linux, essential in Debian) makes the kernel SIGKILL the member
            # when this process dies, even by SIGKILL: no member outlives the tests.
            "setpriv", "--pdeathsig", "KILL", "--",
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            # Peers stay plain HTTP: the lab's peer traffic never leaves loopback.
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", member.data_dir.parent.name,  # unique: the temporary root
            "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
            "--experimental-watch-progress-notify-interval", self.progress_notify_interval,
            "--auto-compaction-retention", "0",  # tests compact, when they want to, with compact()
            "--logger", "zap", "--log-level", "warn",
            *self._server_flags,
        ]

    def _spawn(self, member: Member) -> None:
        """Start the member's process; on a restart the data dir's WAL makes it rejoin."""
        command = self._command(member)
        with member.log.open("ab") as log:
            member.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening(member)

    def _wait_listening(self, member: Member) -> None:
        """Until the member's client port takes connections: a gRPC client (etcdctl) that
        dials before then backs off for a second or more before it tries again."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                socket.create_connection((LOOPBACK, member.client_port), timeout=0.5).close()
                return
            except OSError:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {member.name} does not listen{self._logs()}") from None
                time.sleep(0.01)

    def leaders_named(self) -> dict[str, int] | None:
        """Member name -> the leader's member id as each running member names it (0: none
        yet); None while one does not answer. A member answers once it has joined a
        cluster with a leader: on a fresh start the first call waits for the election."""
        named = {}
        for member in (m for m in self.members if m.running):
            done = self._etcdctl([member], "--command-timeout", "2s", "endpoint", "status", "-w", "json")
            if done.returncode != 0:
                return None
            status = json.loads(done.stdout)[0]["Status"]
            member.id = status["header"]["member_id"]
            named[member.name] = status.get("leader", 0)  # JSON leaves out a zero: no leader yet
        return named

    def leader(self, timeout: float = 10.0) -> Member:
        """The member every running member names as leader, once they agree on a running one."""
        deadline = time.monotonic() + timeout
        while True:
            named = self.leaders_named()
            if named is not None and len(set(named.values())) == 1:
                leader = next((m for m in self.members if m.running and m.id in named.values()), None)
                if leader is not None:
                    return leader
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader within {timeout} s; members name {named}{self._logs()}")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        """A member that died by itself (a bad flag, a port taken) fails the wait at once."""
        for member in self.members:
            if member.process is not None and member.process.poll() is not None:
                raise RuntimeError(f"etcd member {member.name} exited {member.process.returncode}"
                                   f"{self._logs()}")

    def _logs(self) -> str:
        """The members' logs, for an error message (they go with the cluster). Head and
        tail: a bad flag is said on the first line, above etcd's usage text."""
        shown = []
        for member in (m for m in self.members if m.log.exists()):
            lines = member.log.read_text(errors="replace").splitlines()
            if len(lines) > 8:
                lines = [*lines[:3], "...", *lines[-5:]]
            shown.append(f"\n--- {member.name}:\n" + "\n".join(lines))
        return "".join(shown)

    def kill(self, member: Member) -> None:
        """SIGKILL: a crash, no goodbye to the peers or clients."""
        assert member.process is not None
        member.process.kill()
        member.process.wait()
        member.process = None

    def stop(self, member: Member) -> None:
        """SIGTERM, the orderly stop: the member hands on leadership and closes its streams."""
        assert member.process is not None
        member.process.terminate()
        try:
            member.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()
        member.process = None

    def start(self, member: Member, timeout: float = 10.0) -> None:
        """Restart a stopped or killed member on its data dir and wait until it is back in."""
        if member.running:
            raise RuntimeError(f"etcd member {member.name} is running")
        self._spawn(member)
        self.leader(timeout=timeout)

    def _etcdctl(self, members: Sequence[Member], *args: str,
                 stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        endpoints = ",".join(m.client_url for m in members)
        return subprocess.run([ETCDCTL, "--endpoints", endpoints, *self._etcdctl_flags, *args],
                              input=stdin, capture_output=True, text=True)

    def etcdctl(self, *args: str, stdin: str | None = None) -> str:
        """etcdctl against the running members; with TLS as `root` (its certificate's CN)."""
        done = self._etcdctl([m for m in self.members if m.running], *args, stdin=stdin)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def compact(self, revision: int) -> None:
        """Drop the history before `revision`; watches from earlier revisions are refused."""
        self.etcdctl("compact", str(revision), "--physical")

    def enable_rbac(self, nodes: Sequence[str], prefix: str = DEFAULT_PREFIX) -> Rbac:
        """Turn on etcd's authentication with the cluster mode's roles:
        `isoebpf-admin` reads and writes all of `prefix`; user and role `node-<name>`, one per
        node, read `<prefix>policy/` and write only under `<prefix>nodes/<name>/`. `root` is made
        too (etcd requires it) and keeps working for etcdctl through its certificate's CN.
        The other users log in with a password, made into the cluster's directory."""
        if self.pki is None:
            raise ValueError("enable_rbac needs a cluster started with tls=True")
        self.etcdctl("user", "add", ROOT, "--no-password")
        self.etcdctl("user", "grant-role", ROOT, "root")
        admin = self._add_user(ADMIN)
        self.etcdctl("role", "grant-permission", ADMIN, "--prefix", "readwrite", prefix)
        self.rbac = Rbac(prefix, admin, {})
        for node in nodes:
            user = self._add_user(f"node-{node}")
            self.etcdctl("role", "grant-permission", user.user, "--prefix", "read", self.rbac.policy_prefix)
            self.etcdctl("role", "grant-permission", user.user, "--prefix", "write",
                         self.rbac.node_prefix(node))
            self.rbac.nodes[node] = user
        self.etcdctl("auth", "enable")
        return self.rbac

    def _add_user(self, name: str) -> Credentials:
        """A user with a role of the same name and a fresh password. The password goes to
        etcdctl on stdin, not in its arguments, which every process can read."""
        assert self.pki is not None and self._root is not None
        secrets_dir = self._root / "passwords"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        password_file = secrets_dir / name
        password_file.write_text(secrets.token_hex(16))
        password_file.chmod(0o600)
        # A password must be set at creation: `user passwd` on a --no-password user
        # answers "Password updated" and the user still cannot log in (3.4.23).
        self.etcdctl("user", "add", name, "--interactive=false", stdin=password_file.read_text() + "\n")
        self.etcdctl("role", "add", name)
        self.etcdctl("user", "grant-role", name, name)
        cert, key = self.pki.issue_client(name, common_name=False)
        return Credentials(name, cert, key, password_file)

    def close(self) -> None:
        atexit.unregister(self.close)
        for member in self.members:
            if member.process is not None:
                member.process.kill()
                member.process.wait()
                member.process = None
        if self._root is not None:
            shutil.rmtree(self._root)
            self._root = None


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback now, all different: held open together while the kernel picks."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {done.stderr.strip()}")
