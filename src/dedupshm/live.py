"""``dedupshm top``: a live view of a store, built with rich.

On a terminal it redraws a full-screen frame every ``interval`` seconds
(rich.live on the alternate screen; resizes are followed) until ``q`` or
Ctrl-C.  When stdout is not a terminal it prints one plain ``key=value``
summary line per interval instead.  ``--once`` prints one frame (piped: one
line) and exits (its rates are measured over a short second look).

The viewer is an attached process like any other: it appears in its own
process list, marked "this view" (the plain line's ``processes=`` leaves
it out).  "dedup saved" is logical minus physical bytes (what storing
identical pages once saved); what the merger saved, pages merged away, is
"merge saved" in the merger panel.
"""
from __future__ import annotations

import heapq
import os
import select
import signal
import sys
import time
from datetime import datetime
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Optional, Union

from ._format import human_bytes
from .store import DEFAULT_DIRECTORY, store_paths

if TYPE_CHECKING:
    from .store import Key, Store

_Handler = Union[Any, int, None]   # what signal.signal returns

MiB = 1 << 20
PAGE = 4096


def _count(n: int) -> str:
    return f"{n:,}"


def _ratio(r: float) -> str:
    return "∞" if r == float("inf") else f"{r:.2f}x"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _proc_name(pid: int) -> Optional[str]:
    """A process's command line (argv[0] shortened to its base name), or
    its comm when the command line is empty; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        if argv:
            return " ".join([os.path.basename(argv[0])] + argv[1:])
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_rss_shmem(pid: int) -> Optional[int]:
    """Resident shared-memory bytes of a process (/proc/PID/status RssShmem)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Snapshot:
    """What one refresh shows: stats, rates against the previous snapshot,
    attached processes and the largest keyed objects."""

    #: listing keys holds the store's lock for the whole walk: with many keys,
    #: list them at most this share of the time (the figures above stay live)
    KEYS_DUTY = 0.02

    nkeys: int
    key_bytes: int
    largest: list[tuple[Key, int]]
    keys_at: float
    keys_cost: float
    top_n: int

    def __init__(self, store: Store, prev: Optional[Snapshot] = None, top_n: int = 10) -> None:
        self.mono = time.monotonic()
        self.wall = time.time()
        self.stats = store.stats()
        self.clients = store.clients()
        if (prev is not None and prev.top_n >= top_n
                and self.mono < prev.keys_at + prev.keys_cost / self.KEYS_DUTY):
            self.nkeys, self.key_bytes = prev.nkeys, prev.key_bytes
            self.largest, self.keys_at, self.keys_cost = prev.largest, prev.keys_at, prev.keys_cost
        else:
            t = time.monotonic()
            items = store.items_sizes()
            self.keys_at, self.keys_cost = t, time.monotonic() - t
            self.nkeys = len(items)
            self.key_bytes = sum(n for _, n in items)
            self.largest = heapq.nlargest(top_n, items, key=lambda kv: kv[1])
        self.top_n = top_n
        # unlinked (dedupshm rm) while we watch: the attachment still works
        self.removed = not os.path.exists(store_paths(store.name, store.directory)[0])
        self.scan_rate: Optional[float] = None
        self.cpu: Optional[float] = None
        if prev is not None:
            dt = self.mono - prev.mono
            if dt > 0:
                ds = self.stats["pages_scanned"] - prev.stats["pages_scanned"]
                dc = self.stats["merger_cpu_seconds"] - prev.stats["merger_cpu_seconds"]
                if ds >= 0:
                    self.scan_rate = ds / dt
                if dc >= 0:
                    self.cpu = dc / dt          # fraction of one core

    def scan_rate_text(self) -> str:
        r = self.scan_rate
        if r is None:
            return "—"
        if r < 100_000:
            return f"{r:,.0f}/s"
        return f"{r / 1e3:,.0f}k/s" if r < 10_000_000 else f"{r / 1e6:,.1f}M/s"

    def cpu_text(self) -> str:
        return "—" if self.cpu is None else f"{100 * self.cpu:.1f}%"


# ---------------------------------------------------------------- plain lines

def plain_line(snap: Snapshot) -> str:
    s = snap.stats
    rate = "-" if snap.scan_rate is None else f"{snap.scan_rate:.0f}"
    cpu = "-" if snap.cpu is None else f"{100 * snap.cpu:.1f}%"
    ratio = "inf" if s["dedup_ratio"] == float("inf") else f"{s['dedup_ratio']:.2f}"
    return (f"{datetime.fromtimestamp(snap.wall):%H:%M:%S} "
            f"logical={s['logical_bytes']} physical={s['physical_bytes']} ratio={ratio} "
            f"objects={s['objects']} keys={s['keys']} "
            f"shared={s['pages_shared']} sharing={s['pages_sharing']} "
            f"unshared={s['pages_unshared']} volatile={s['pages_volatile']} "
            f"merged={s['pages_merged']} scan/s={rate} merger_cpu={cpu} "
            f"processes={sum(1 for c in snap.clients if c['pid'] != os.getpid())}"
            + (" removed=1" if snap.removed else ""))


# ---------------------------------------------------------------- rich frame

def _kv_table(rows: list[tuple[str, Any]]) -> Any:
    from rich.table import Table
    t = Table.grid(padding=(0, 1), expand=True)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(justify="right", no_wrap=True)
    for label, value in rows:
        t.add_row(label, value)
    return t


def render_frame(snap: Snapshot, name: str, directory: Optional[str], interval: float,
                 height: Optional[int] = None, width: int = 80, self_pid: Optional[int] = None,
                 once: bool = False) -> Any:
    """The whole frame as one rich renderable."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    s = snap.stats
    merged = s["pages_merged"]
    cap = s["capacity"]
    memory = _kv_table([
        ("logical", human_bytes(s["logical_bytes"])),
        ("physical", human_bytes(s["physical_bytes"])),
        # what dedup of stored values saved; merging saves more, in "merger"
        ("dedup saved", human_bytes(max(0, s["logical_bytes"] - s["physical_bytes"]))),
        ("dedup ratio", _ratio(s["dedup_ratio"])),
        ("objects", _count(s["objects"])),
        ("metadata", human_bytes(s["metadata_bytes"])),
        ("capacity", human_bytes(cap)),
        ("capacity used", f"{100.0 * s['pages_used'] * PAGE / cap:.1f}%" if cap else "—"),
    ])
    pages = _kv_table([
        ("used", _count(s["pages_used"])),
        ("shared", _count(s["pages_shared"])),
        ("sharing", _count(s["pages_sharing"])),
        ("unshared", _count(s["pages_unshared"])),
        ("volatile", _count(s["pages_volatile"])),
        ("zero (free)", _count(s["pages_zero"])),
        ("warm free", _count(s["pages_free_warm"])),
    ])
    merger = _kv_table([
        ("scan rate", snap.scan_rate_text()),
        ("CPU (1 core)", snap.cpu_text()),
        ("pages merged", _count(merged)),
        ("merge saved", human_bytes(merged * PAGE)),       # pages merged away
        ("full scans", _count(s["full_scans"])),
        ("scanned", _count(s["pages_scanned"])),
        ("CPU total", f"{s['merger_cpu_seconds']:.2f} s"),
    ])
    panels = Table.grid(expand=True, padding=(0, 1))
    for _ in range(3):
        panels.add_column(ratio=1)
    pad = (0, 1) if width >= 90 else (0, 0)          # 80 columns: every figure still fits
    panels.add_row(*(Panel(body, title=title, title_align="left", padding=pad)
                     for body, title in ((memory, "memory"), (pages, "pages"), (merger, "merger"))))

    # rows left for the two lists (header 1, panels 10, titles, headers, gap, "more" rows 7)
    room = None if height is None else max(4, height - 18)
    nproc = len(snap.clients)
    nobj = len(snap.largest)
    if room is not None:
        proc_rows = min(nproc, max(2, room // 2))
        obj_rows = min(nobj, max(2, room - proc_rows))
    else:
        proc_rows, obj_rows = nproc, nobj

    procs = Table(expand=True, box=None, header_style="bold reverse", pad_edge=False,
                  title=f"attached processes ({nproc})", title_justify="left", title_style="bold")
    procs.add_column("PID", justify="right", no_wrap=True)
    procs.add_column("COMMAND", no_wrap=True, overflow="ellipsis", ratio=1)
    procs.add_column("HANDLES", justify="right", no_wrap=True)
    procs.add_column("MERGED PAGES", justify="right", no_wrap=True)
    procs.add_column("RSS SHMEM", justify="right", no_wrap=True)
    procs.add_column("ATTACHED", justify="right", no_wrap=True)
    clients = sorted(snap.clients, key=lambda c: (-c["handles"] - c["merged_pages"], c["pid"]))
    for c in clients[:proc_rows]:
        pid = c["pid"]
        comm = _proc_name(pid)
        if comm is None:
            comm, style = "(exited; gc reaps it)", "dim"
        else:
            style = None
        if pid == self_pid:
            comm, style = f"(this view) {comm}", "dim"
        rss = _proc_rss_shmem(pid)
        cm = c["merged_pages"]
        procs.add_row(str(pid), comm, _count(c["handles"]),
                      f"{_count(cm)} ({human_bytes(cm * PAGE)})" if cm else "0",
                      "—" if rss is None else human_bytes(rss),
                      _age(snap.wall - c["attach_time"]), style=style)
    if nproc > proc_rows:
        procs.add_row("", f"… {nproc - proc_rows} more", "", "", "", "", style="dim")

    objs = Table(expand=True, box=None, header_style="bold reverse", pad_edge=False,
                 title=f"largest objects ({_count(snap.nkeys)} keys, "
                       f"{human_bytes(snap.key_bytes)} logical)",
                 title_justify="left", title_style="bold")
    objs.add_column("SIZE", justify="right", no_wrap=True, width=11)
    objs.add_column("KEY", no_wrap=True, overflow="ellipsis", ratio=1)
    for k, n in snap.largest[:obj_rows]:
        objs.add_row(human_bytes(n), k if isinstance(k, str) else repr(k))
    if not snap.largest:
        objs.add_row("", Text("(no keys)", style="dim"))
    elif snap.nkeys > obj_rows:
        objs.add_row("", Text(f"… {snap.nkeys - obj_rows} more", style="dim"))

    header = Text.assemble(
        ("dedupshm top", "bold"), "  store ", (name, "bold cyan"),
        f" in {directory or DEFAULT_DIRECTORY}  ",
        ("(removed) " if snap.removed else "", "bold red"),
        f"{datetime.fromtimestamp(snap.wall):%Y-%m-%d %H:%M:%S}",
        "" if once else f"  every {interval:g} s  ", ("" if once else "q quits", "dim"))
    return Group(header, panels, procs, Text(""), objs)


# ---------------------------------------------------------------- the loop

class _Keys:
    """Single keystrokes from a terminal stdin (cbreak mode, restored on exit);
    also wakes up on SIGWINCH so a resize redraws at once."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.old: Optional[list[Any]] = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._old_winch: _Handler = None

    def __enter__(self) -> _Keys:
        self._own_fd: Optional[int] = None
        try:
            fd = _stdin_tty()
            if fd is None:
                # stdin is not the terminal (a script's background job reads
                # /dev/null): read keys from the controlling terminal, if we
                # are in its foreground
                fd = self._own_fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
                if os.tcgetpgrp(fd) != os.getpgrp():
                    raise OSError("not in the terminal's foreground")
            import termios
            import tty
            self.old = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self.fd = fd
            try:
                os.tcgetpgrp(fd)
            except OSError:
                # not our controlling terminal (started under setsid): its
                # Ctrl-C would signal another process group; read it as a key
                attrs = termios.tcgetattr(fd)
                attrs[3] &= ~termios.ISIG
                termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
        except (OSError, ValueError, AttributeError, ImportError):
            self.fd = None
            if self._own_fd is not None:
                os.close(self._own_fd)
                self._own_fd = None
        try:
            self._old_winch = signal.signal(signal.SIGWINCH, self._winch)
        except ValueError:                       # not the main thread
            self._old_winch = None
        return self

    def _winch(self, signum: int, frame: Optional[FrameType]) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        if self.old is not None and self.fd is not None:
            import termios
            termios.tcsetattr(self.fd if self._own_fd is None else self._own_fd,
                              termios.TCSADRAIN, self.old)
        if self._own_fd is not None:
            os.close(self._own_fd)
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wait(self, timeout: float) -> Optional[str]:
        """Wait up to timeout; return 'quit', 'redraw' or None (time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            fds = [self._wake_r] + ([self.fd] if self.fd is not None else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                return "redraw"
            if self.fd is not None and self.fd in ready:
                data = os.read(self.fd, 64)
                if not data:                     # stdin closed: stop listening
                    self.fd = None
                    continue
                if b"q" in data.lower() or b"\x03" in data:
                    return "quit"
                if b"\x0c" in data or b" " in data:   # Ctrl-L / space: redraw now
                    return "redraw"


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def _stdin_tty() -> Optional[int]:
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    return fd if os.isatty(fd) else None


def _interactive_sigint(out: IO[str]) -> _Handler:
    """Make Ctrl-C reach us if it was ignored but we run in the foreground
    of a terminal: a shell without job control (a script, ``sh -c``) starts
    background jobs with SIGINT ignored and stdin from /dev/null, and
    `top` drawing on that terminal must still quit on Ctrl-C.  The terminal
    is stdin's or else the output's.  Returns the handler to restore, or
    None."""
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            return None
        fd = _stdin_tty()
        if fd is None:
            fd = out.fileno()
            if not os.isatty(fd):
                return None
        if os.tcgetpgrp(fd) != os.getpgrp():
            return None
        return signal.signal(signal.SIGINT, signal.default_int_handler)
    except (OSError, ValueError, AttributeError):     # no terminal, not the main thread
        return None


def run_top(store: Store, name: str, directory: Optional[str], interval: float = 1.0,
            once: bool = False, top_n: Optional[int] = None, out: Optional[IO[str]] = None) -> int:
    """Run ``dedupshm top``; returns the exit status."""
    from rich.console import Console

    if not interval > 0:
        raise ValueError("--interval must be > 0")
    out = out or sys.stdout
    try:
        is_tty = out.isatty()
    except (AttributeError, ValueError):
        is_tty = False
    me = os.getpid()
    old_term = signal.signal(signal.SIGTERM, _terminate)
    old_int = _interactive_sigint(out)
    try:
        if once:
            first = Snapshot(store, top_n=top_n or 20)
            time.sleep(min(interval, 0.5))
            snap = Snapshot(store, first, top_n=top_n or 20)
            if not is_tty:                       # piped: the plain line, like the loop
                out.write(plain_line(snap) + "\n")
                out.flush()
                return 0
            console = Console(file=out, highlight=False)
            console.print(render_frame(snap, name, directory, interval, width=console.width,
                                       self_pid=me, once=True))
            return 0
        if not is_tty:
            return _plain_loop(store, interval, out)
        return _live_loop(store, name, directory, interval, top_n, out, me)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


def _plain_loop(store: Store, interval: float, out: IO[str]) -> int:
    prev = None
    t0 = time.monotonic()
    try:
        while True:
            snap = Snapshot(store, prev, top_n=0)
            out.write(plain_line(snap) + "\n")
            out.flush()
            prev = snap
            k = int((time.monotonic() - t0) / interval) + 1       # next slot still ahead
            time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `dedupshm top NAME | head`: the reader went away
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


def _live_loop(store: Store, name: str, directory: Optional[str], interval: float,
               top_n: Optional[int], out: IO[str], me: int) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out, highlight=False)
    prev = None
    try:
        with _Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                                   transient=True, redirect_stdout=False,
                                   redirect_stderr=False) as live:
            while True:
                height = console.size.height
                n = top_n or max(3, height)
                snap = Snapshot(store, prev, top_n=n)
                live.update(render_frame(snap, name, directory, interval, height=height,
                                         width=console.size.width, self_pid=me), refresh=True)
                prev = snap
                k = keys.wait(interval)
                while k == "redraw":           # resize: draw the same figures again
                    size = console.size
                    live.update(render_frame(snap, name, directory, interval, height=size.height,
                                             width=size.width, self_pid=me), refresh=True)
                    k = keys.wait(max(0.0, interval - (time.monotonic() - snap.mono)))
                if k == "quit":
                    return 0
    except KeyboardInterrupt:
        return 0
