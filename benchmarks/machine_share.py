"""How the whole machine's CPU time went while a benchmark's contender ran (Linux, /proc/stat).

On a shared VM a contender's own CPU time does not say whether it had the machine: the hypervisor
may run something else while this VM's CPUs have work (steal; on a VM, the disk's work can show up
here), and a contender can leave cores idle. Both benchmarks that race a baseline on throughput
(`fetch.py`, `preprocess.py`) report these shares of each timed interval beside images/s.
"""

from __future__ import annotations

CpuTimes = tuple[int, int, int]
"""Clock ticks since boot, all cores: stolen, idle (with I/O wait), total."""


def cpu_times() -> CpuTimes | None:
    """The machine's CPU time so far; None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return fields[7], fields[3] + fields[4], sum(fields)


def shares(before: CpuTimes | None, after: CpuTimes | None) -> dict[str, float]:
    """`machine_steal_share` and `machine_idle_share` of the interval (empty without /proc/stat)."""
    if before is None or after is None:
        return {}
    steal, idle, total = (a - b for a, b in zip(after, before, strict=True))
    return {"machine_steal_share": steal / max(total, 1), "machine_idle_share": idle / max(total, 1)}
