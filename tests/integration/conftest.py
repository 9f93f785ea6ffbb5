"""Integration tier: real traffic between namespaces. Needs root and `ip netns`."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from etcd3gw.client import Etcd3Client

from isoebpf import pipeline
from isoebpf.backends import links, state
from isoebpf.backends.state import Scope
from isoebpf.ir.tables import IR
from isoebpf.lab import docker as docker_lab
from isoebpf.lab.docker import DockerEngine
from isoebpf.lab.etcd import ETCD, ETCDCTL, LOOPBACK, Credentials, EtcdCluster, Member
from isoebpf.lab.testbed import Testbed, default_prefix, it_hr
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "it-hr.yaml"
DOCKER = ROOT / "tests" / "data" / "docker-fresh.iptables.save"  # Docker's own chains
# Policy B swaps which of HR's services IT hosts may reach, and opens IT -> HR tcp/80:
# tries that A and B answer differently tell which one is in force.
POLICY_B = SEED.read_text().replace(
    "  - {from: hr, to: it, ports: [tcp/80]}",
    "  - {from: hr, to: it, ports: [tcp/22, udp/53]}\n  - {from: it, to: hr, ports: [tcp/80]}")

# The seed with a rule inserted above its only allow rule, `hr -> it tcp/80`, which
# becomes allow:1 (WEB is what it is, whatever its name).
SEED_RULE_ABOVE = SEED.read_text().replace("allow:\n", "allow:\n  - {from: it, to: hr, ports: [udp/53]}\n")
WEB = "allow hr -> it tcp/80"


def policy_files(folder: Path) -> dict[str, tuple[Path, IR]]:
    """Policies A (the seed) and B written into `folder`, with their compiled IRs."""
    found = {}
    for name, text in (("A", SEED.read_text()), ("B", POLICY_B)):
        path = folder / f"{name}.yaml"
        path.write_text(text)
        found[name] = (path, pipeline.read(path).ir)
    return found


@pytest.fixture
def policies(tmp_path: Path) -> dict[str, tuple[Path, IR]]:
    return policy_files(tmp_path)


def isoebpf(*args: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it; `env`: more environment."""
    done = subprocess.run([sys.executable, "-m", "isoebpf.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"isoebpf {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done


def assert_clean(testbed: Testbed) -> None:
    scope = Scope(testbed.router)
    assert not scope.pin_dir.exists(), "pins left behind"
    assert scope.read() is None, "state record left behind"
    # Only the record of a refused change may stay: status shows it until one succeeds.
    left = {p.name for p in scope.run_dir.iterdir()} if scope.run_dir.exists() else set()
    assert left <= {scope.failure_path.name}, f"state files left behind: {left}"
    assert left or not scope.lock_path.exists(), "lock file left behind"
    with links.netlink(testbed.router) as sock:
        for link in links.links(sock):
            assert links.xdp_state(sock, link.index) == (0, None), link.name
            assert not links.has_our_tc(sock, link.index), link.name


@pytest.fixture
def unloaded(testbed: Testbed) -> Iterator[None]:
    """Nothing loaded before the test, nothing left after it."""
    isoebpf("unload", "--netns", testbed.router)
    try:
        yield
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


class Trace:
    """`isoebpf trace --json` running beside the traffic a test makes, once it listens."""

    def __init__(self, testbed: Testbed, backend: str, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "isoebpf.cli", "trace", "--netns", testbed.router, "--json",
             "--timeout", "20", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert self.process.stderr is not None
            started = self.process.stderr.readline()
            assert started.startswith(f"tracing {backend} verdicts"), started + self.process.stderr.read()
        except BaseException:
            self.close()
            raise

    def finish(self) -> tuple[list[dict[str, Any]], str]:
        out, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()], err

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the trace if it still runs (SIGTERM, which removes its nft table; SIGKILL
        if that takes over 10 s) and wait for it, its pipes closed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()
        self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def filtered_trace(testbed: Testbed, backend: str) -> list[dict[str, Any]]:
    """The events of a trace filtered to HR's allow rules from 192.168.2.0/24 (two
    wanted), beside traffic of which only hr2's two connections match every filter."""
    with Trace(testbed, backend, "--rule", "allow:*", "--overlay", "hr", "--address",
               "192.168.2.0/24", "--count", "2") as tracing:
        for client, server in (("it1", "it2"), ("hr1", "it1"), ("hr2", "it2"), ("hr2", "it1")):
            assert testbed.probe(client, "tcp", server, 80, timeout=1.0)["outcome"] == "connected"
        events, _ = tracing.finish()
    return events


def flood_udp(testbed: Testbed, client: str, address: str, port: int, count: int) -> None:
    """`count` datagrams from `client` to address:port, as fast as a socket sends them."""
    testbed.run_in(testbed.netns(client), sys.executable, "-c",
                   "import socket\nsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                   f"for _ in range({count}): sock.sendto(b'x', ({address!r}, {port}))")


def suppressed(summary: str) -> int:
    """The verdicts `trace`'s closing summary says the rate limit kept back."""
    return int(summary.split(" verdicts suppressed")[0].rsplit(" ", 1)[1])


def packets_by_rule(record: dict[str, Any]) -> dict[str, int]:
    """Rule name -> packets, from a status record's counters."""
    return {c["rule"]: c["packets"] for c in record["counters"]}


def counts_by_identity(record: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Rule identity -> (its name now, packets), from a status record's counters."""
    return {c["identity"]: (c["rule"], c["packets"]) for c in record["counters"]}


def flush_iptables(testbed: Testbed) -> None:
    """Empty the router's nat and filter tables (what a test restored there)."""
    for table in ("nat", "filter"):
        for step in ("-F", "-X"):
            testbed.run_in(testbed.router, "iptables", "-t", table, step)


class AgentProcess:
    """`isoebpf agent` running in a process of its own, its JSON log lines read as they come."""

    def __init__(self, policy: Path | None, netns: str, *more: str, inside: bool = False) -> None:
        """`policy` None: the options say where it comes from (--etcd). `inside`: the agent
        runs in `netns` (its own connections, to etcd, go from there), not beside it."""
        self.events: list[dict[str, object]] = []
        self.process = subprocess.Popen(
            [*(["nsenter", f"--net=/run/netns/{netns}"] if inside else []),
             sys.executable, "-m", "isoebpf.cli", "agent", *([str(policy)] if policy else []),
             "--netns", netns, "--iface", "v-*", "--repair-interval", "0.5", *more],
            stderr=subprocess.PIPE, cwd=ROOT)
        self._lines: queue.Queue[str] = queue.Queue()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Lines of the agent's log into a queue; "" at the end. Owns (and closes) the pipe."""
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        pending = b""
        while True:
            if not select.select([fd], [], [], 0.2)[0]:
                if self._done.is_set():
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._lines.put(line.decode() + "\n")
        self.process.stderr.close()
        self._lines.put("")

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, object]:
        """The next log line of this kind (earlier lines of other kinds are kept)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                raise AssertionError(f"agent exited while waiting for {event}: {self.events}")
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": "unstructured", "line": line.rstrip()}
            self.events.append(entry)
            if entry["event"] == event:
                return entry
        raise AssertionError(f"no {event} within {timeout} s: {self.events}")

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # deaf to SIGTERM: killed, its code says so (-9)
            self.process.kill()
            code = self.process.wait()
        self._done.set()
        self._reader.join()
        return code


@pytest.fixture(scope="session", autouse=True)
def no_state_outlives_its_namespace() -> Iterator[None]:
    """After the tier, nothing is left under /run/isoebpf or in bpffs (record, pins,
    lock file) for a namespace this run made and deleted."""
    yield
    left = []
    for root in (state.RUN_DIR, state.BPFFS):
        for path in root.glob(f"netns-{default_prefix()}-*"):
            if Scope(path.name.removeprefix("netns-").removesuffix(".lock")).namespace_gone:
                left.append(str(path))
    assert not left, f"left behind for scopes that no longer exist: {left}"


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    probe = subprocess.run(["ip", "netns", "add", "isoebpf-capability-probe"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        require("network namespaces", probe.stderr.strip())
    subprocess.run(["ip", "netns", "del", "isoebpf-capability-probe"], check=True)
    bed = it_hr()
    try:
        with bed:
            yield bed
    finally:  # a backstop: whatever a failed test left loaded never reaches the next module
        isoebpf("unload", "--netns", bed.router, check=False)


def require_etcd() -> None:
    """Skip (fail under CI) where etcd, etcdctl or openssl does not run."""
    for tool in (ETCD, ETCDCTL, "openssl"):
        try:
            ran = subprocess.run([tool, "version" if tool != ETCD else "--version"],
                                 capture_output=True, text=True)
        except FileNotFoundError:
            require(tool, "not installed (scripts/setup.sh installs etcd-server, etcd-client, openssl)")
        if ran.returncode != 0:
            require(tool, ran.stderr.strip())


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """Three etcd members on loopback: plain HTTP, no users."""
    require_etcd()
    with EtcdCluster() as cluster:
        yield cluster


NODES = ("a", "b")


@pytest.fixture
def secured_etcd() -> Iterator[EtcdCluster]:
    """Three members that want a client certificate from the lab's CA, with the cluster
    mode's roles: `cluster.rbac` holds the admin's and nodes a and b's credentials."""
    require_etcd()
    with EtcdCluster(tls=True) as cluster:
        cluster.enable_rbac(NODES)
        yield cluster


GatewayClient = Callable[..., Etcd3Client]


@pytest.fixture
def gateway_client() -> Iterator[GatewayClient]:
    """Makes etcd3gw clients on a member's JSON gateway, as the agents will reach etcd:
    `gateway_client(cluster, member=None, credentials=None)`; with credentials, logged
    in. Their sessions close after the test."""
    sessions: list[requests.Session] = []

    def connect(cluster: EtcdCluster, member: Member | None = None,
                credentials: Credentials | None = None) -> Etcd3Client:
        member = member or next(m for m in cluster.members if m.running)
        session = requests.Session()
        sessions.append(session)
        # Else REQUESTS_CA_BUNDLE, where set, replaces the CA etcd3gw puts on the session.
        session.trust_env = False
        if cluster.pki is not None:
            session.verify = str(cluster.pki.ca)
        client = Etcd3Client(LOOPBACK, member.client_port, protocol=member.scheme, session=session,
                             timeout=10)
        if credentials is not None:
            session.cert = (str(credentials.cert), str(credentials.key))
            answer = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": credentials.user, "password": credentials.password})
            session.headers["Authorization"] = answer["token"]
        return client

    yield connect
    for session in sessions:
        session.close()


def require_docker() -> None:
    """Skip (fail under CI) where Debian's dockerd, its CLI or busybox-static is missing."""
    for tool in (docker_lab.DOCKERD, docker_lab.DOCKER, docker_lab.BUSYBOX):
        if not Path(tool).exists():
            require(tool, "not installed (scripts/setup.sh installs docker.io, busybox-static)")
    ran = subprocess.run([docker_lab.DOCKERD, "--version"], capture_output=True, text=True)
    if ran.returncode != 0:
        require(docker_lab.DOCKERD, ran.stderr.strip())


@pytest.fixture
def docker_engine() -> Iterator[DockerEngine]:
    """dockerd in a namespace of its own, the busybox image imported, no networks yet.
    Tests that want it where isoebpf enforces open `DockerEngine(netns=testbed.router)`."""
    require_docker()
    with DockerEngine() as engine:
        yield engine
