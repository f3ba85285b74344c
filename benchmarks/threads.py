"""
Where the CPU goes during one ``bench.py`` scenario: the broker's threads
(the reactor, the disk writer, the thread pool's fsyncs) and the load
generator, from /proc's per-thread counters (Linux only).  It tells whether
the broker or the generator sets the pace, which a rate alone does not::

    python benchmarks/threads.py "10,000 topics x 1 sub, 10,000 conns"
    python benchmarks/threads.py "1->1 --fsync never" --runs 3
    python benchmarks/threads.py --list

``PYTHONPATH=/other/checkout`` measures other code (as bench.py does).
It measures; it never fails on speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> Dict[str, float]:
    """
    CPU seconds (user + system) of each thread of process C{pid}: the main
    thread (the reactor) as "reactor", the others (the disk writer, the
    thread pool) by thread id.
    """
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (ended meanwhile)
        out["reactor" if int(tid) == pid else f"thread {tid}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def measure(scenario: bench.Scenario) -> str:
    server = bench.Zaichik(scenario.options)
    try:
        before = thread_cpu(server.pid)
        t0 = time.monotonic()
        row = bench.run_scenario(server, scenario)
        wall = time.monotonic() - t0
        after = thread_cpu(server.pid)
    finally:
        server.stop()
    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    threads = ", ".join(f"{t} {cpu:.2f}" for cpu, t in used if cpu >= 0.005)
    return (f"{scenario.name}: {row.rate:,.0f} msgs/s; wall {wall:.2f} s (setup included); broker threads "
            f"(CPU s) {threads or 'none'}; generator {row.gen_cpu:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", nargs="?", help="a bench.py scenario's name, exactly")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="bench.py --quick's sizes")
    parser.add_argument("--list", action="store_true", help="the scenarios' names")
    args = parser.parse_args()
    scenarios = {s.name: s for s in bench.scenarios(args.quick)}
    if args.list or not args.scenario:
        print("\n".join(scenarios))
        return
    if args.scenario not in scenarios:
        parser.error(f"no scenario {args.scenario!r} (--list shows them)")
    for _ in range(args.runs):
        print(measure(scenarios[args.scenario]), flush=True)


if __name__ == "__main__":
    main()
