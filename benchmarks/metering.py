"""What the benchmarks measure with: CPU and peak memory from /proc, the load of other processes,
wall and CPU timers, and timing two contenders alternately.

Machine-wide figures need Linux's /proc and read None elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

QUIET_CORES = 0.1  # the machine counts as quiet when others use less than this
OTHER_CPU_WARN = 0.25  # of one core, over a run: the machine was not quiet
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- clocks and memory


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def pid_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a live process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def own_cpu_s(children: bool = False) -> float:
    """CPU seconds of this process, and with ``children`` of its reaped child processes too."""
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    usages = [resource.getrusage(w) for w in who]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def own_peak_rss_mib() -> float:
    """Peak resident set of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- other processes


class OtherLoad:
    """CPU seconds that processes outside the benchmark use while it measures.

    The machine's busy time minus this process, its reaped children and ``pids`` (helpers the
    benchmark started, such as a server). On 2 cores a busy neighbour skews a run badly; this
    makes it visible.
    """

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids

    def read(self) -> tuple[float | None, float]:
        """(machine busy, ours) in CPU seconds; subtract two reads with ``between``."""
        ours = own_cpu_s(children=True) + sum(pid_cpu_s(p) or 0.0 for p in self.pids)
        return machine_busy_s(), ours

    @staticmethod
    def between(before: tuple[float | None, float], after: tuple[float | None, float]):
        """CPU seconds others used from one read to the next (None without /proc)."""
        if before[0] is None or after[0] is None:
            return None
        return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))

    def wait_quiet(self, max_wait_s: float, window_s: float = 5.0) -> float:
        """Wait until others use < QUIET_CORES over a window, at most max_wait_s; returns waited."""
        started = time.monotonic()
        while time.monotonic() - started < max_wait_s:
            before = self.read()
            time.sleep(window_s)
            other = self.between(before, self.read())
            if other is None or other < QUIET_CORES * window_s:
                break
        return time.monotonic() - started


def wait_for_absent(pattern: str | None, poll_s: float = 30.0) -> float:
    """Wait (no limit) while a process whose command line matches ``pattern`` runs."""
    import psutil

    started = time.monotonic()
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}  # their args may match
    while pattern:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        if not [p for p in found.stdout.split() if int(p) not in ours]:
            break
        time.sleep(poll_s)
    return time.monotonic() - started


# --------------------------------------------------------------------------- timers


class Timers:
    """Wall and CPU seconds (this process, all threads) summed per named part."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


def time_alternately(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately after one warm-up call each,
    so that load from other processes hits both alike."""
    first(), second()  # warm-up: caches, the allocator
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


# --------------------------------------------------------------------------- a process tree


@dataclass
class Snapshot:
    t: float  # time.time()
    busy: float | None  # whole machine, CPU seconds
    tree: float  # the watched process tree, CPU seconds since the watch began
    ranks: float  # rank processes and their loader processes, CPU seconds
    loaders: float  # the loader processes alone
    own: float  # this process


class TreeWatch(threading.Thread):
    """Polls a process tree every ``poll_s``: peak RSS of its rank and loader processes, CPU use.

    Rank processes are those for which ``is_rank(proc, root_pid)`` holds (a psutil.Process); a
    loader is a child forked from a rank with the rank's command line (a DataLoader worker).
    VmHWM only grows, so polling misses at most the last interval. CPU: cumulative seconds of the
    tree and of the ranks (with loaders), as last seen per process, beside the machine's;
    ``window`` interpolates them over a measured window. ``steps_logged`` (optional) returns the
    steps logged so far; the time each first appears is kept in ``step_seen``.
    """

    def __init__(self, root_pid: int, is_rank, steps_logged=None, poll_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.is_rank, self.steps_logged = root_pid, is_rank, steps_logged
        self.poll_s = poll_s
        self.ranks: dict[int, float] = {}  # peak RSS MiB
        self.loaders: dict[int, float] = {}  # peak RSS MiB
        self.cpu: dict[int, float] = {}
        self.cpu_base: dict[int, float] = {}
        self.rank_or_loader: set[int] = set()
        self.lifetime: dict[int, list[float]] = {}  # rank and loader pids: first, last seen
        self.snapshots: list[Snapshot] = []
        self.step_seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        first = True
        while not self.stop.is_set():
            self._poll(root, psutil, first)
            first = False
            self.stop.wait(self.poll_s)

    def _poll(self, root, psutil, first: bool) -> None:
        now, busy = time.time(), machine_busy_s()
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        rank_pids = self._read_cpu(procs, psutil, first)
        for proc in procs:
            try:
                # A loader is forked from its rank (same command line); not a short-lived helper
                # a library runs (lscpu and the like).
                forked = proc.ppid() in rank_pids and proc.cmdline() == proc.parent().cmdline()
            except psutil.Error:
                continue
            bucket = self.ranks if proc.pid in rank_pids else self.loaders if forked else None
            if bucket is not None:
                self.rank_or_loader.add(proc.pid)
                self.lifetime.setdefault(proc.pid, [now, now])[1] = now
                peak = peak_rss_mib(proc.pid)
                if peak is not None:
                    bucket[proc.pid] = max(bucket.get(proc.pid, 0.0), peak)
        tree = sum(cpu - self.cpu_base.get(pid, 0.0) for pid, cpu in self.cpu.items())
        ranks = sum(self.cpu.get(pid, 0.0) for pid in self.rank_or_loader)
        loaders = sum(self.cpu.get(pid, 0.0) for pid in self.rank_or_loader if pid in self.loaders)
        self.snapshots.append(Snapshot(now, busy, tree, ranks, loaders, own_cpu_s()))
        if self.steps_logged is not None:
            for step in self.steps_logged():
                self.step_seen.setdefault(step, now)

    def _read_cpu(self, procs, psutil, first: bool) -> set[int]:
        """Record each process's CPU seconds; returns the rank pids."""
        rank_pids = set()
        for proc in procs:
            try:
                times = proc.cpu_times()
                cpu = times.user + times.system
                if proc.pid not in self.cpu and first:
                    self.cpu_base[proc.pid] = cpu  # already running when the watch began
                self.cpu[proc.pid] = cpu
                if self.is_rank(proc, self.root_pid):
                    rank_pids.add(proc.pid)
            except psutil.Error:
                continue
        return rank_pids

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)

    def peaks(self, bucket: dict[int, float], t0: float | None, t1: float | None) -> list[float]:
        """Peak RSS of the bucket's processes that lived during [t0, t1] (all if unknown):
        the loaders that fed the measured steps, not a short-lived fork at the end."""
        if t0 is None or t1 is None:
            return sorted(bucket.values())
        slack = self.poll_s
        return sorted(
            peak
            for pid, peak in bucket.items()
            if self.lifetime[pid][0] <= t1 + slack and self.lifetime[pid][1] >= t0 - slack
        )

    def _at(self, t: float, name: str) -> float | None:
        """A snapshot field at time t, interpolated linearly between polls."""
        points = [(s.t, getattr(s, name)) for s in self.snapshots]
        if not points or points[0][1] is None or t < points[0][0] or t > points[-1][0]:
            return None
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return points[-1][1]

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        """CPU seconds in [t0, t1]: the ranks' (with loaders), the loaders', other processes'."""
        values = {}
        for name in ("busy", "tree", "ranks", "loaders", "own"):
            a, b = self._at(t0, name), self._at(t1, name)
            values[name] = None if a is None or b is None else b - a
        other = None
        if None not in (values["busy"], values["tree"], values["own"]):
            other = max(0.0, values["busy"] - values["tree"] - values["own"])
        return {
            "rank_cpu_s": values["ranks"],
            "loader_cpu_s": values["loaders"],
            "other_cpu_s": other,
        }
