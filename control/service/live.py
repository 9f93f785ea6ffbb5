"""Service stage: the agent's one HTTP server, on its metrics address.

- `/metrics`: the Prometheus exposition of the registry it is given;
- `/`: the live page (static/index.html, page.js, page.css, package data: the
  page loads nothing from elsewhere), which polls
- `/api/state`: what the node enforces, as one JSON document (`state_document`):
  the policy's overlays and the edges its rules draw between them, per-rule
  counters (the page turns them into rates), health, audit mode, and the
  recent denials of the flow log.

Reads the agent's `Stats`, the enforcer's status record and the flow recorder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import netaddr
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..errors import IsoebpfError
from . import flows
from .agent import Stats

# The files of the page, by the path they are served at, with their content type.
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
# Denials shown: those of the last five minutes (the recorder's buckets in memory).
RECENT_DENIED_FLOWS = 20
# How long one document serves every poll (each reads the maps): several open pages cost one.
STATE_REUSED_FOR = 0.5


def _endpoint_overlay(text: str, overlays: flows.Overlays) -> str | None:
    """The overlay a rule's `from` or `to` names: itself, or the one its CIDR lies in."""
    if text in overlays.names:
        return text
    try:
        return overlays.of(str(netaddr.IPNetwork(text).network))
    except (netaddr.AddrFormatError, ValueError):
        return None


def edges(rules: list[list[Any]], overlays: flows.Overlays) -> list[dict[str, Any]]:
    """The policy's allow rules and exceptions as edges between overlays: a rule's text is
    '<from> -> <to> <ports>' (exceptions: '<from> -> <to> unfiltered'), where an end is
    an overlay or a CIDR inside one (then part of the label)."""
    found = []
    for _, name, text in rules:
        kind = str(name).partition(":")[0]
        if kind not in ("allow", "exception"):
            continue
        src_text, _, rest = str(text).partition(" -> ")
        dst_text, _, ports = rest.partition(" ")
        src, dst = _endpoint_overlay(src_text, overlays), _endpoint_overlay(dst_text, overlays)
        if src is None or dst is None:
            continue
        ends = [t for t, o in ((src_text, src), (dst_text, dst)) if t != o]
        found.append({"rule": name, "kind": kind, "from": src, "to": dst, "text": text,
                      "label": " ".join([*ends, ports]).strip()})
    return found


def state_document(record: dict[str, Any] | None, stats: Stats, recorder: flows.Recorder | None,
                   now: float) -> dict[str, Any]:
    """What /api/state answers: everything the page draws, from the status record (None or
    without backend: nothing loaded), the agent's stats and the flow recorder."""
    record = record or {}
    overlays = flows.Overlays(record.get("overlays", {}))
    rule_names = {str(name) for _, name, _ in record.get("rules", [])}
    failure = record.get("failure")
    attachments = [{"ifname": a["ifname"], "mode": a["mode"], "state": a.get("state", "attached")}
                   for a in record.get("attachments", [])]
    problems = ([f"the last change failed: {failure['error']}"] if failure else []) + [
        f"{a['ifname']} ({a['mode']}) {a['state']}" for a in attachments if a["state"] != "attached"]
    document: dict[str, Any] = {
        "time": round(now, 3),
        "loaded": bool(record.get("backend")),
        "audit": bool(record.get("audit")),
        "policy": {key: record.get(key) for key in ("backend", "netns", "policy", "digest", "generation",
                                                     "loaded_at")},
        "cluster_version": stats.cluster_version if stats.etcd_connected is not None else None,
        "health": {"ok": stats.last_apply_ok and not problems, "last_apply_ok": stats.last_apply_ok,
                   "last_apply_time": stats.last_apply_time, "last_error": stats.last_error,
                   "problems": problems, "attachments": attachments},
        "overlays": [{"name": name, "networks": list(record["overlays"][name]),
                      "isolated": f"hairpin:{name}" not in rule_names} for name in overlays.names],
        "edges": edges(record.get("rules", []), overlays),
        "counters": [{key: c[key] for key in ("rule", "identity", "text", "packets", "bytes") if key in c}
                     for c in record.get("counters", [])],
        "flow_log": {"recording": recorder is not None,
                     "rate": recorder.per_second if recorder is not None else 0},
        "denials": [], "denied_flows": [],
    }
    if recorder is not None:
        seen = flows.merged(recorder.recent())
        document["denials"] = [d.as_json() for d in flows.denials(seen, overlays)]
        denied = sorted((f for f in seen if f.key.action != "allow"), key=lambda f: -f.last)
        document["denied_flows"] = [{**f.as_json(), "service": f.service,
                                     "src_overlay": overlays.of(f.key.src),
                                     "dst_overlay": overlays.of(f.key.dst)}
                                    for f in denied[:RECENT_DENIED_FLOWS]]
    return document


@dataclass
class Sources:
    """Where the server reads what it serves."""

    metrics: CollectorRegistry
    status: Callable[[], dict[str, Any] | None]
    stats: Stats
    recorder: flows.Recorder | None


class _CachedState:
    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self._lock = threading.Lock()
        self._made = 0.0
        self._body = b""

    def body(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._made >= STATE_REUSED_FOR:
                try:
                    record = self._sources.status()
                except IsoebpfError as err:  # the state cannot be read now: say so, and why
                    record = {"failure": {"error": str(err)}}
                document = state_document(record, self._sources.stats, self._sources.recorder, time.time())
                self._body = json.dumps(document, sort_keys=True, default=str).encode()
                self._made = time.monotonic()
            return self._body


def serve(host: str, port: int, sources: Sources) -> ThreadingHTTPServer:
    """Start serving in a thread of its own (it ends with the process); OSError where
    the address cannot be bound."""
    state = _CachedState(sources)
    page = resources.files(__package__) / "static"
    assets = {path: ((page / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, kind = choose_encoder(self.headers.get("Accept", ""))
                self._send(encoder(sources.metrics), kind)
            elif path == "/api/state":
                self._send(state.body(), "application/json")
            elif path in assets:
                self._send(*assets[path])
            else:
                self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the agent's log is its own JSON lines."""

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="isoebpf-http", daemon=True).start()
    return server
