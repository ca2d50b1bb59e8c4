"""Prometheus metrics of stores: ``dedupshm serve-metrics NAME --port P``.

A custom collector reads ``store.stats()`` afresh on every scrape (no
background polling, no stale values).  Every metric carries a ``store``
label.  Names follow Prometheus conventions: base units (bytes, seconds),
``_total`` for counters.  The HTTP server binds 127.0.0.1 unless told
otherwise.
"""
from __future__ import annotations

import signal
import socket
import socketserver
import sys
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Iterable, Iterator, Optional, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .record import store_file_bytes

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric

    from .store import Store

#: (stats key, metric name, help) of gauges.
GAUGES = [
    ("logical_bytes", "dedupshm_logical_bytes", "Sum of the sizes of the live stored objects."),
    ("physical_bytes", "dedupshm_physical_bytes",
     "Bytes really stored: pool pages in use plus packed small values."),
    ("dedup_ratio", "dedupshm_dedup_ratio", "Logical bytes over physical bytes."),
    ("metadata_bytes", "dedupshm_metadata_bytes", "Bookkeeping bytes in use."),
    ("capacity", "dedupshm_capacity_bytes", "Most physical bytes of object data the store may hold."),
    ("small_bytes", "dedupshm_small_values_bytes", "Bytes of packed small values."),
    ("objects", "dedupshm_objects", "Live sealed objects."),
    ("keys", "dedupshm_keys", "Objects bound to a key."),
    ("pages_used", "dedupshm_pages_used", "Distinct pool pages with references."),
    ("pages_shared", "dedupshm_pages_shared", "Pool pages with more than one reference."),
    ("pages_sharing", "dedupshm_pages_sharing", "Page references saved by sharing."),
    ("pages_zero", "dedupshm_pages_zero", "All-zero pages referenced (they cost nothing)."),
    ("pages_free_warm", "dedupshm_pages_free_warm", "Freed pages kept faulted in for reuse."),
    ("pages_merged", "dedupshm_pages_merged",
     "Mergeable pages of attached processes mapped onto pool pages."),
    ("pages_unshared", "dedupshm_pages_unshared", "Stable mergeable pages with no partner yet."),
    ("pages_volatile", "dedupshm_pages_volatile", "Mergeable pages that changed between looks."),
    ("clients", "dedupshm_clients", "Attached processes."),
    ("handles", "dedupshm_handles", "References held by processes or in flight."),
]
#: (stats key, metric name without _total, help) of counters.
COUNTERS = [
    ("full_scans", "dedupshm_full_scans", "Completed merger passes over a process's mergeable memory."),
    ("pages_scanned", "dedupshm_pages_scanned", "Pages looked at by the mergers."),
    ("merger_cpu_seconds", "dedupshm_merger_cpu_seconds", "CPU time spent by the mergers."),
    ("gc_runs", "dedupshm_gc_runs", "Garbage collections run."),
    ("reaped_clients", "dedupshm_reaped_clients", "Dead processes cleaned up."),
    ("recoveries", "dedupshm_recoveries", "Lock owners that died: metadata rebuilt."),
]


class StoreCollector:
    """Prometheus collector reading the stats of one or more open stores."""

    def __init__(self, stores: Iterable[Store]) -> None:
        self.stores = list(stores)

    def describe(self) -> list[Metric]:
        return []          # the metrics are only known by collecting (no eager call)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for _, name, doc in GAUGES:
            families[name] = GaugeMetricFamily(name, doc, labels=["store"])
        for _, name, doc in COUNTERS:
            families[name] = CounterMetricFamily(name, doc, labels=["store"])
        files = GaugeMetricFamily("dedupshm_store_file_bytes",
                                  "Bytes the file system allocated to the store's files "
                                  "(in tmpfs: the store's part of the kernel's Shmem).",
                                  labels=["store"])
        up = GaugeMetricFamily("dedupshm_up", "1 if the store's stats could be read.",
                               labels=["store"])
        for st in self.stores:
            try:
                s = st.stats()
            except Exception as e:  # noqa: BLE001 - one bad store must not break the scrape
                sys.stderr.write(f"dedupshm: stats of {st.name!r} failed: {e}\n")
                up.add_metric([st.name], 0)
                continue
            up.add_metric([st.name], 1)
            for key, name, _ in GAUGES + COUNTERS:
                if key in s:
                    families[name].add_metric([st.name], float(s[key]))
            fb = store_file_bytes(st.name, st.directory)
            if fb is not None:
                files.add_metric([st.name], fb)
        yield up
        yield from families.values()
        yield files


def make_registry(stores: Iterable[Store]) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(stores))
    return reg


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_server(registry: CollectorRegistry, host: str = "127.0.0.1",
                port: int = 9464) -> WSGIServer:
    """A threading HTTP server for the registry (not started)."""
    from prometheus_client import make_wsgi_app

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family = infos[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family
        allow_reuse_address = True

    httpd = Server(infos[0][4][:2], _QuietHandler)  # type: ignore[arg-type]  # (host, port)
    httpd.set_app(make_wsgi_app(registry))
    return httpd


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def serve(stores: list[Store], host: str = "127.0.0.1", port: int = 9464,
          out: Optional[IO[str]] = None) -> int:
    """Serve the stores' metrics until SIGINT/SIGTERM; returns 0."""
    out = out or sys.stdout
    httpd = make_server(make_registry(stores), host, port)
    bound_host, bound_port = cast("tuple[str, int]", httpd.server_address[:2])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    names = ", ".join(s.name for s in stores)
    out.write(f"serving metrics of {names} at http://{shown}:{bound_port}/metrics\n")
    out.flush()
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        httpd.server_close()
    return 0
