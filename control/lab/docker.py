"""Lab: a throw-away Docker engine in a network namespace, for tests against the real thing.

Debian's dockerd (docker.io 20.10) runs with its own containerd, every path of its own
under one temporary root: socket, data root, exec root, pidfile, daemon.json, trust key.
Started through `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the
cgroup mounts dockerd needs), it makes its bridges, veths and iptables chains in that
namespace only. Containers run a busybox image imported from Debian's busybox-static,
no registry involved.

Docker 20.10 writes one thing outside the root whatever it is told: the plugin directory
/run/docker/plugins (hard-coded on Linux). The engine removes it again when it made it
and it is empty. A Docker installed on the host is never used: the CLI is Debian's
/usr/bin/docker pointed at the lab's socket.

`close` removes every container, network, process (dockerd, containerd, shims and the
containers' own), mount and file, also after a failure. dockerd and containerd die with
the thread that starts them (parent-death signal); shims and containers are daemons by
design and outlive a SIGKILLed test process: `close` (run at exit too) sweeps them.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..resource import Resource
from .testbed import stop_servers

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's CLI, the daemon's version: not one found first on PATH
BUSYBOX = "/bin/busybox"  # busybox-static: runs in an image that holds nothing else
IMAGE = "isoebpf-busybox"
HTTPD = ("httpd", "-f", "-p", "80")  # busybox's web server, in the foreground
PLUGINS = Path("/run/docker/plugins")  # hard-coded in dockerd 20.10 (getPluginExecRoot)
CGROUPS = Path("/sys/fs/cgroup")


@dataclass(eq=False)
class DockerEngine(Resource):
    """dockerd in network namespace `netns` (made, and deleted after, when None).

    With `live_restore`, containers keep running while dockerd is stopped or restarted;
    without, `stop` stops them all and `start` brings back only those with a restart
    policy. dockerd dies with the thread that starts it: use one that lives as long."""

    netns: str | None = None
    live_restore: bool = False
    start_timeout: float = 30.0
    _root: Path | None = None
    _made_netns: bool = False
    _made_plugins: list[Path] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None
    _servers: list[subprocess.Popen[str]] = field(default_factory=list)
    _cgroup_parent: str = ""

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("the engine is not open")
        return self._root

    @property
    def namespace(self) -> str:
        if self.netns is None:
            raise RuntimeError("the engine is not open")
        return self.netns

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def log(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def running(self) -> bool:
        return self._process is not None

    def _open(self) -> None:
        atexit.register(self.close)  # an engine a test forgot to close still goes at exit
        self._root = Path(tempfile.mkdtemp(prefix="isoebpf-docker-"))
        self._cgroup_parent = self._root.name  # unique; containers' cgroups go under it
        if self.netns is None:
            self.netns = f"{self._root.name}-ns"
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
            self._made_netns = True
        self._made_plugins = [p for p in (PLUGINS.parent, PLUGINS) if not p.exists()]
        (self._root / "daemon.json").write_text(json.dumps({
            # Else dockerd writes its trust key to /etc/docker/key.json; this build has
            # no such flag, only the daemon.json key.
            "deprecated-key-path": str(self._root / "key.json"),
        }))
        self.start()
        self._import_image()

    def _command(self) -> list[str]:
        root = self.root
        return [
            # setpriv makes the kernel SIGKILL dockerd when this thread dies; dockerd gives
            # its containerd the same signal. Shims and containers live on: `close` sweeps.
            "setpriv", "--pdeathsig", "KILL", "--",
            "nsenter", f"--net=/run/netns/{self.namespace}",
            DOCKERD, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "-H", f"unix://{self.socket}", "--pidfile", str(root / "docker.pid"),
            "--config-file", str(root / "daemon.json"),
            "--storage-driver", "vfs",  # plain directories: no overlay mounts to leave behind
            # Relative: under this process's cgroup in every hierarchy, where `close` finds
            # (and kills) what is left of the containers.
            "--cgroup-parent", self._cgroup_parent,
            *(["--live-restore"] if self.live_restore else []),
        ]

    def start(self) -> None:
        """Start dockerd on the engine's roots and wait until it answers."""
        if self._process is not None:
            raise RuntimeError("dockerd is running")
        command = self._command()
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while self.docker("version", check=False).returncode != 0:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise RuntimeError(f"dockerd exited {code}{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd does not answer within {self.start_timeout} s"
                                   f"{self._log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as a service manager stops it. Without live restore dockerd first stops
        every container (SIGTERM to its init, SIGKILL after 10 s). It leaves its iptables
        rules and bridges as they are."""
        if self._process is None:
            raise RuntimeError("dockerd is not running")
        self._process.terminate()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, a crash: containerd dies with dockerd (its parent-death signal); shims
        and containers run on, unmanaged, until `start` or `close`."""
        if self._process is None:
            raise RuntimeError("dockerd is not running")
        self._process.kill()
        self._process.wait()
        self._process = None

    def restart(self) -> None:
        """`stop` and `start` on the same roots. dockerd re-inserts its FORWARD jumps on
        start; containers come back as `stop` and `live_restore` say."""
        self.stop()
        self.start()

    def docker(self, *args: str, check: bool = True, stdin: bytes | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """The CLI against the engine's socket; stdout and stderr as text."""
        command = [DOCKER, "-H", f"unix://{self.socket}", *args]
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout,
                              env=self._cli_env())
        result = subprocess.CompletedProcess(done.args, done.returncode,
                                             done.stdout.decode(errors="replace"),
                                             done.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}: {result.stderr.strip()}")
        return result

    def _cli_env(self) -> dict[str, str]:
        """No DOCKER_HOST or DOCKER_CONTEXT of the caller's; the CLI's config in the root."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.root / "cli")
        return env

    def _import_image(self) -> None:
        """IMAGE: /bin/busybox and a link per applet (sh, nc, httpd, ping...), nothing else."""
        applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True,
                                 text=True).stdout.split()
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            tar.add(BUSYBOX, "bin/busybox")
            for applet in applets:
                if applet != "busybox":
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
        self.docker("import", "-", IMAGE, stdin=layer.getvalue())

    def network_create(self, name: str, subnet: str, gateway: str | None = None,
                       internal: bool = False) -> str:
        """A user-defined bridge network; its id."""
        args = ["network", "create", "--driver", "bridge", "--subnet", subnet]
        args += ["--gateway", gateway] if gateway else []
        args += ["--internal"] if internal else []
        return self.docker(*args, name).stdout.strip()

    def network_rm(self, name: str) -> None:
        self.docker("network", "rm", name)

    def bridge_of(self, network: str) -> str:
        """The network's bridge in the engine's namespace (br-<first 12 of its id>)."""
        return "br-" + self.docker("network", "inspect", "-f", "{{.Id}}", network).stdout.strip()[:12]

    def run(self, name: str, network: str, ip: str | None = None,
            command: tuple[str, ...] = HTTPD, restart: str | None = None) -> str:
        """A detached container on `network` (at `ip`); its id. Under docker-init (--init),
        so that SIGTERM stops it at once: busybox as PID 1 would ignore it for 10 s."""
        args = ["run", "--detach", "--init", "--name", name, "--network", network]
        args += ["--ip", ip] if ip else []
        args += ["--restart", restart] if restart else []
        return self.docker(*args, IMAGE, *command).stdout.strip()

    def rm(self, name: str) -> None:
        self.docker("rm", "--force", name)

    def exec(self, name: str, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`command` inside the container; not checked: its exit code is the result."""
        return self.docker("exec", name, *command, check=False, timeout=timeout)

    def inspect(self, name: str, template: str) -> str:
        return self.docker("inspect", "-f", template, name).stdout.strip()

    def sandbox(self, name: str) -> str:
        """The container's network namespace, as a path nsenter takes."""
        return self.inspect(name, "{{.NetworkSettings.SandboxKey}}")

    def in_netns_of(self, name: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`command` from this machine's files, in the container's network namespace:
        the same packets as from inside it, with tools busybox lacks (UDP, our probe)."""
        return subprocess.run(["nsenter", f"--net={self.sandbox(name)}", *command], check=check,
                              capture_output=True, text=True)

    def veth_of(self, name: str) -> str:
        """The engine-side end of the container's eth0 (found by the peer's ifindex)."""
        inside = json.loads(self.in_netns_of(name, "ip", "-j", "link", "show", "eth0").stdout)
        peer = inside[0]["link_index"]
        links = json.loads(self.in_engine("ip", "-j", "link").stdout)
        return str(next(link["ifname"] for link in links if link["ifindex"] == peer))

    def in_engine(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`command` in the engine's network namespace."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.namespace}", *command], check=check,
                              capture_output=True, text=True)

    def iptables_save(self) -> str:
        """The engine namespace's IPv4 rules, without iptables-save's dated comment lines."""
        saved = self.in_engine("iptables-save").stdout
        return "".join(line for line in saved.splitlines(keepends=True) if not line.startswith("#"))

    def serve(self, name: str, tcp: tuple[int, ...] = (22,), udp: tuple[int, ...] = (53,)) -> None:
        """Probe servers (TCP greets, UDP echoes) in the container's network namespace,
        beside its httpd: busybox's nc speaks no UDP. They last until `close`."""
        args = [sys.executable, "-m", "isoebpf.lab.probe", "serve"]
        for port in tcp:
            args += ["--tcp", str(port)]
        for port in udp:
            args += ["--udp", str(port)]
        server = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", "nsenter",
                                   f"--net={self.sandbox(name)}", *args], stdout=subprocess.PIPE, text=True)
        self._servers.append(server)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"probe server in container {name} did not start")

    def probe(self, client: str, proto: str, address: str, port: int = 0,
              timeout: float = 2.0) -> dict[str, object]:
        """What container `client` sees when it tries address:port (proto tcp, udp or icmp):
        the testbed's probe, from the container's network namespace. Over TCP it waits
        for a probe server's greeting: try a port `serve` opened, not httpd's."""
        done = self.in_netns_of(client, sys.executable, "-m", "isoebpf.lab.probe", "connect", proto,
                                address, str(port), "--timeout", str(timeout))
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    def _log_tail(self, lines: int = 8) -> str:
        if self._root is None or not self.log.exists():
            return ""
        return "\n--- dockerd:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        atexit.unregister(self.close)
        if self._process is not None and self._process.poll() is None:
            self._remove_objects()
            self.stop()
        self._process = None
        stop_servers(self._servers)
        if self._root is not None:
            self._sweep()
            shutil.rmtree(self._root)
            self._root = None
        for path in reversed(self._made_plugins):
            with contextlib.suppress(OSError):  # not empty: someone else's engine uses it
                path.rmdir()
        self._made_plugins = []
        if self._made_netns and self.netns is not None:
            subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)
            self.netns, self._made_netns = None, False

    def _remove_objects(self) -> None:
        """Containers and user-defined networks, by dockerd: it removes their veths,
        bridges and iptables rules. The default bridge (docker0) and Docker's chains stay
        in the namespace, as a stopped dockerd leaves them; they go with the namespace."""
        containers = self.docker("ps", "--all", "--quiet", check=False).stdout.split()
        if containers:
            self.docker("rm", "--force", *containers, check=False)
        networks = self.docker("network", "ls", "--quiet", "--filter", "type=custom", check=False).stdout.split()
        if networks:
            self.docker("network", "rm", *networks, check=False)

    def _sweep(self) -> None:
        """What a crash (of dockerd or of the tests) leaves: processes that name the root
        (dockerd, containerd, shims), the containers' processes (in the lab's cgroups),
        mounts under the root (its data root's bind mount, the containers' namespace files)
        and the cgroups."""
        root = str(self.root)
        groups = _cgroups(self._cgroup_parent)
        deadline = time.monotonic() + 10
        while pids := _processes_naming(root) | _processes_in(groups):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the Docker lab survive SIGKILL: {sorted(pids)}")
            time.sleep(0.05)
        for mount in sorted(_mounts_under(root), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
        for group in sorted(_cgroups(self._cgroup_parent), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                group.rmdir()


def _processes_naming(text: str) -> set[int]:
    """Live processes whose command line mentions `text` (zombies are gone already)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace") and not _zombie(entry):
                found.add(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def _zombie(entry: Path) -> bool:
    # The state follows the command name, which is in parentheses and may hold spaces.
    return (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"


def _cgroups(name: str) -> list[Path]:
    """Every cgroup directory named `name` (one per hierarchy) and those below it."""
    found: list[Path] = []
    for top, dirs, _ in os.walk(CGROUPS):
        if Path(top).name == name:
            found += [Path(top), *(Path(top) / d for d in dirs)]
            dirs.clear()
    return found


def _processes_in(groups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for group in groups:
        with contextlib.suppress(FileNotFoundError):
            pids |= {int(pid) for pid in (group / "cgroup.procs").read_text().split()}
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            if not _zombie(Path(f"/proc/{pid}")):
                alive.add(pid)
    return alive


def _mounts_under(root: str) -> list[str]:
    """Mount points at or below `root`, from this process's mount table."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == root or point.startswith(root + "/"):
            points.append(point)
    return points
