"""Service stage: Docker networks as overlays, through the Docker Engine API.

An overlay may name a Docker network (`docker_network: it`); its subnets are
the network's IPAM subnets, asked of the engine when the policy is read
(`Engine.subnets`, the pipeline's `networks`), and the agent reads the policy
again when networks come and go (`Engine.network_events`). The API is spoken
over the engine's Unix socket with the standard library: a few GETs need no SDK.

The engine is the one `--docker-host` or DOCKER_HOST names (unix://PATH), else
/var/run/docker.sock.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from ..errors import IsoebpfError

DEFAULT_HOST = "unix:///var/run/docker.sock"
API = "/v1.41"  # Docker 20.10's; newer engines serve it too


class DockerError(IsoebpfError):
    """The engine could not be reached, or refused a request."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Engine:
    """One Docker engine, by its API socket."""

    def __init__(self, host: str | None = None, timeout: float = 5.0) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        if not self.host.startswith("unix://"):
            raise DockerError(f"only a Unix socket reaches the Docker engine here (unix://PATH), not {self.host!r}")
        self.path = self.host.removeprefix("unix://")
        self.timeout = timeout

    def _get(self, path: str, timeout: float | None = None) -> tuple[int, Any]:
        connection = _UnixConnection(self.path, self.timeout if timeout is None else timeout)
        try:
            connection.request("GET", API + path)
            answer = connection.getresponse()
            body = answer.read()
        except OSError as err:
            raise DockerError(f"the Docker engine at {self.host} cannot be reached: {err}") from err
        finally:
            connection.close()
        try:
            return answer.status, json.loads(body or b"null")
        except ValueError as err:
            raise DockerError(f"the Docker engine at {self.host} answered no JSON: {body[:200]!r}") from err

    def subnets(self, network: str) -> list[str]:
        """The subnets of `network`, as its IPAM says; LookupError (what to say) when there is
        no such network or no engine to ask: the policy stage turns it into a located error."""
        try:
            status, said = self._get(f"/networks/{urllib.parse.quote(network, safe='')}")
        except DockerError as err:
            raise LookupError(str(err)) from err
        if status == 404:
            raise LookupError(f"no Docker network '{network}' at {self.host} ('docker network ls' lists them)")
        if status != 200:
            raise LookupError(f"the Docker engine at {self.host} refused network '{network}': "
                              f"{(said or {}).get('message', status)}")
        configs = ((said or {}).get("IPAM") or {}).get("Config") or []
        return [c["Subnet"] for c in configs if c.get("Subnet")]

    def network_events(self, stop: threading.Event) -> Iterator[str]:
        """"" once the stream is open (what happened before is not in it), then the names of
        networks as they are created, removed, connected to or from, until `stop`;
        DockerError when the stream cannot be opened or breaks."""
        filters = urllib.parse.quote(json.dumps({"type": ["network"]}))
        connection = _UnixConnection(self.path, None)
        try:
            connection.request("GET", f"{API}/events?filters={filters}")
            answer = connection.getresponse()
            if answer.status != 200:
                raise DockerError(f"the Docker engine at {self.host} refused its events: {answer.status}")
            yield ""
            while not stop.is_set():
                line = answer.readline()
                if not line:
                    raise DockerError(f"the Docker engine at {self.host} closed its event stream")
                event = json.loads(line)
                name = (event.get("Actor") or {}).get("Attributes", {}).get("name")
                if name:
                    yield str(name)
        except OSError as err:
            raise DockerError(f"the Docker engine at {self.host} cannot be reached: {err}") from err
        finally:
            connection.close()
