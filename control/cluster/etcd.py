"""Cluster stage: the etcd client, over etcd's JSON gateway (`/v3/`) through etcd3gw.

Why etcd3gw (docs/cluster.md says more): it is maintained, pure Python, and
speaks the JSON gateway every etcd 3.4+ serves, so it needs no gRPC or
protobuf; python-etcd3 (the gRPC client) fails to import with protobuf 4 and
was last released in 2020. etcd3gw gives us the session (TLS, client
certificates), the API path and the error mapping; three things it lacks are
ours:
- failover: it talks to one endpoint; `Etcd` tries the next one when a call
  cannot reach its member.
- a watch that can be trusted: etcd3gw's drops progress notifications and
  compaction, never reconnects, and blocks forever on a dead stream. `watch`
  reads the stream with a read timeout, reopens it from the next revision
  after silence or a lost member, and reports a compacted start revision so
  the caller reads everything afresh.
- revisions: every read says the revision it was made at.
- users: etcd's gateway refuses a client certificate that has a common name once
  auth is on (etcd 3.4: "CommonName of client sending a request against gateway
  will be ignored"), so a node's etcd user logs in with a password (kept in a
  file) for a token its requests carry; the certificate, without a CN, only
  opens TLS. An expired token is renewed once per refused request.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw

from ..errors import IsoebpfError

# A watch reopened after a partition heals should not sit out a long connect first.
WATCH_CONNECT_TIMEOUT = 0.5


class EtcdError(IsoebpfError):
    """etcd refused a request (permission, a bad request)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str | None) -> str:
    return base64.b64decode(b64 or "").decode()


def range_end(prefix: str) -> str:
    """The end of the key range of every key starting with `prefix`."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class KV:
    value: str
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Range:
    revision: int  # the store's revision the read was made at
    kvs: dict[str, KV]


@dataclass(frozen=True)
class Event:
    key: str
    value: str | None  # None: deleted
    revision: int


@dataclass(frozen=True)
class WatchBatch:
    """What one watch response (or its failure) says."""

    events: list[Event] = field(default_factory=list)
    progress: int = 0  # a progress notification: every event up to this revision was sent
    compacted: int = 0  # the start revision is gone (compacted up to this): read afresh
    lost: str = ""  # the stream broke or no endpoint answered: why (it will be reopened)


@dataclass(frozen=True)
class Credentials:
    """How we reach the endpoints: the CA that signed them, our client certificate, and
    the etcd user we log in as (its password in a file only root can read)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None


class Etcd:
    """A client of one etcd cluster, given all its client URLs."""

    def __init__(self, endpoints: Sequence[str], credentials: Credentials = Credentials(),
                 timeout: float = 5.0) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint given")
        self.timeout = timeout
        self.credentials = credentials
        # One session for every endpoint: its TLS settings and the login's token.
        self.session = requests.Session()
        self.session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, overrides our CA
        if credentials.ca:
            self.session.verify = credentials.ca
        if credentials.cert and credentials.key:
            self.session.cert = (credentials.cert, credentials.key)
        self._clients = [_client(url, credentials, timeout, self.session) for url in endpoints]
        self._current = 0
        self._lock = threading.Lock()
        self._token = ""

    @property
    def endpoint(self) -> str:
        return self._clients[self._current].base_url

    # -- unary calls -----------------------------------------------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one gateway request, moving to the next endpoint when one cannot be reached."""
        if self.credentials.user and not self._token:
            self._login()
        try:
            return self._post(path, body)
        except EtcdError as err:
            if not (self.credentials.user and "invalid auth token" in str(err)):
                raise
            self._login()  # the token expired (etcd's --auth-token-ttl)
            return self._post(path, body)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Every endpoint in turn until one answers, again and again (a leader election
        takes about a second) until the timeout has passed."""
        deadline = time.monotonic() + self.timeout
        pause = 0.05
        while True:
            try:
                return self._post_once(path, body)
            except EtcdUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _post_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        failures: list[str] = []
        for _ in range(len(self._clients)):
            with self._lock:
                client = self._clients[self._current]
            try:
                answer: dict[str, Any] = client.post(client.get_url(path), json=body)
                return answer
            except (gw.ConnectionFailedError, gw.ConnectionTimeoutError) as err:
                failures.append(f"{client.base_url}: {_detail(err)}")
                with self._lock:
                    if self._clients[self._current] is client:
                        self._current = (self._current + 1) % len(self._clients)
            except gw.Etcd3Exception as err:
                raise EtcdError(f"etcd refused {path}: {_detail(err)}") from err
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(failures))

    def _login(self) -> None:
        assert self.credentials.user and self.credentials.password_file
        try:
            with open(self.credentials.password_file, encoding="utf-8") as said:
                password = said.read().strip()
        except OSError as err:
            raise EtcdError(f"cannot read the etcd password: {err}") from err
        self.session.headers.pop("Authorization", None)
        answer = self._post("/auth/authenticate", {"name": self.credentials.user, "password": password})
        self._token = str(answer["token"])
        self.session.headers["Authorization"] = self._token

    def range(self, prefix: str, revision: int = 0) -> Range:
        """Every key under `prefix`, at `revision` (0: the latest)."""
        body: dict[str, Any] = {"key": b64(prefix), "range_end": b64(range_end(prefix))}
        if revision:
            body["revision"] = revision
        answer = self.call("/kv/range", body)
        kvs = {_text(kv["key"]): KV(_text(kv.get("value")), int(kv["mod_revision"]), int(kv.get("lease", 0)))
               for kv in answer.get("kvs", ())}
        return Range(int(answer["header"]["revision"]), kvs)

    def get(self, key: str) -> KV | None:
        answer = self.call("/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return KV(_text(kv.get("value")), int(kv["mod_revision"]), int(kv.get("lease", 0)))

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> tuple[bool, int]:
        """Run `success` if every `compare` holds: (whether it ran, the revision after)."""
        answer = self.call("/kv/txn", {"compare": compare, "success": success})
        return bool(answer.get("succeeded")), int(answer["header"]["revision"])

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        return int(self.call("/kv/put", body)["header"]["revision"])

    def delete_prefix(self, prefix: str) -> None:
        self.call("/kv/deleterange", {"key": b64(prefix), "range_end": b64(range_end(prefix))})

    def grant(self, ttl: int) -> int:
        return int(self.call("/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh `lease`: its TTL left (0 or less: it had expired)."""
        answer = self.call("/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("/lease/revoke", {"ID": lease})

    def compact(self, revision: int) -> None:
        self.call("/kv/compaction", {"revision": revision, "physical": True})

    # -- the watch -------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, stop: threading.Event,
              quiet: float = 2.0, backoff: tuple[float, float] = (0.05, 0.25)) -> Iterator[WatchBatch]:
        """Every change under `prefix` from `start_revision` on, in order, until `stop`.

        A stream silent for `quiet` seconds is reopened from the next revision (a
        dead member's stream says nothing: it would block forever); a broken one is
        reported (`lost`) and reopened on the next endpoint, waiting longer after
        each failure in a row. A compacted start revision ends the watch: the caller
        reads everything afresh and watches again from there."""
        next_revision = start_revision
        delay = backoff[0]
        while not stop.is_set():
            try:
                if self.credentials.user and not self._token:
                    self._login()
                for batch in self._stream(prefix, next_revision, quiet, stop):
                    if batch.compacted:
                        yield batch
                        return
                    if batch.events:
                        next_revision = batch.events[-1].revision + 1
                    elif batch.progress:
                        next_revision = max(next_revision, batch.progress + 1)
                    delay = backoff[0]
                    yield batch
            except _Quiet:
                continue
            except (requests.RequestException, EtcdError, ValueError) as err:
                with self._lock:
                    self._current = (self._current + 1) % len(self._clients)
                yield WatchBatch(lost=f"{type(err).__name__}: {err}")
                stop.wait(delay)
                delay = min(delay * 2, backoff[1])

    def _stream(self, prefix: str, start_revision: int, quiet: float,
                stop: threading.Event) -> Iterator[WatchBatch]:
        client = self._clients[self._current]
        create: dict[str, Any] = {"key": b64(prefix), "range_end": b64(range_end(prefix)),
                  "start_revision": start_revision, "progress_notify": True}
        try:
            response = self.session.post(client.get_url("/watch"), json={"create_request": create},
                                         stream=True, timeout=(min(self.timeout, WATCH_CONNECT_TIMEOUT), quiet))
        except requests.Timeout as err:
            raise EtcdUnavailable(f"{client.base_url}: {err}") from err
        with response:
            if response.status_code != 200:
                if response.status_code == 401 and self.credentials.user:
                    self._token = ""  # expired: the next call logs in again
                raise EtcdError(f"etcd refused the watch: {response.status_code} {response.text[:200]}")
            try:
                for message in _messages(response.iter_content(chunk_size=None)):
                    batch = _batch(message)
                    if batch is not None:
                        yield batch
                    if stop.is_set():
                        return
            except requests.exceptions.ConnectionError as err:
                if "timed out" in str(err):
                    raise _Quiet() from err
                raise


def _messages(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON messages of a stream however its chunks cut them."""
    decoder = json.JSONDecoder()
    pending = ""
    for chunk in chunks:
        pending = (pending + chunk.decode()).lstrip()
        while pending:
            try:
                message, end = decoder.raw_decode(pending)
            except json.JSONDecodeError:
                break  # the rest of it is still on its way
            pending = pending[end:].lstrip()
            yield message


class _Quiet(Exception):
    """The stream said nothing for the quiet time."""


def _batch(message: dict[str, Any]) -> WatchBatch | None:
    if "error" in message:
        raise EtcdError(f"the watch failed: {message['error'].get('message', message['error'])}")
    result = message.get("result", {})
    if int(result.get("compact_revision", 0) or 0):
        return WatchBatch(compacted=int(result["compact_revision"]))
    if result.get("canceled"):
        raise EtcdError(f"etcd canceled the watch: {result.get('cancel_reason', 'no reason given')}")
    if result.get("created"):
        return None
    events = [Event(_text(e["kv"]["key"]),
                    None if e.get("type") == "DELETE" else _text(e["kv"].get("value")),
                    int(e["kv"]["mod_revision"]))
              for e in result.get("events", ())]
    if events:
        return WatchBatch(events=events)
    return WatchBatch(progress=int(result["header"]["revision"]))


def _client(url: str, credentials: Credentials, timeout: float,
            session: requests.Session) -> etcd3gw.Etcd3Client:
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EtcdError(f"not an etcd client URL: {url!r} (give http(s)://HOST:PORT)")
    if parts.scheme == "https" and not credentials.ca:
        raise EtcdError(f"{url}: https needs the CA that signed the endpoints (--etcd-ca)")
    return etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                               timeout=timeout, api_path="/v3/", session=session)


def _detail(err: gw.Etcd3Exception) -> str:
    return (err.detail_text or str(err) or type(err).__name__).strip()[:300]

