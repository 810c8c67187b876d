#!/usr/bin/env python
"""Try a multi-process run on one machine: start N copies of launch.py on 127.0.0.1 and watch them.

  python scripts/launch_local.py --num_processes=2 -- --config=experiments/gpt_char.py --workdir=runs/mp
  python scripts/launch_local.py --num_processes=2 --devices_per_process=2 -- --config.parallel.fsdp=2 ...

Everything after ``--`` is passed to every launch.py; this script adds ``--coordinator_address=127.0.0.1:PORT``
(a free port), ``--num_processes=N`` and ``--process_id=I``.  With ``--devices_per_process=K`` each process
simulates K CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K, JAX_PLATFORMS=cpu).  Process 0
prints the progress and writes TensorBoard/metrics/checkpoints; the others' output is prefixed ``[I]``.

If a process exits with an error the others cannot go on (their collectives would wait for it forever): they
are killed (SIGKILL: JAX catches SIGTERM) and this script exits with the failed process's code.  Ctrl-C is
passed to every process (launch.py checkpoints and exits 130).

On real hosts, run launch.py yourself on each host with the same --coordinator_address=HOST0:PORT and
--num_processes, and that host's --process_id (or --distributed on Cloud TPU pods / under SLURM).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = os.path.join(os.path.dirname(HERE), "launch.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()


def start(num_processes: int, launch_args: list[str], *, devices_per_process: int = 0, port: int | None = None,
          env: dict | None = None, prefix_output: bool = True) -> list[subprocess.Popen]:
    """Start the N processes (Popen objects, in process-id order)."""
    address = f"127.0.0.1:{port or free_port()}"
    env = dict(os.environ if env is None else env)
    if devices_per_process:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices_per_process}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, LAUNCH, *launch_args, f"--coordinator_address={address}",
               f"--num_processes={num_processes}", f"--process_id={i}"]
        pipe = subprocess.PIPE if prefix_output and i else None
        p = subprocess.Popen(cmd, env=env, stdout=pipe, stderr=subprocess.STDOUT if pipe else None, text=True)
        if pipe:
            threading.Thread(target=_pump, args=(p.stdout, sys.stdout, f"[{i}] "), daemon=True).start()
        procs.append(p)
    return procs


def watch(procs: list[subprocess.Popen], *, poll: float = 0.2) -> int:
    """Wait for all processes; if one fails, SIGKILL the rest.  Returns 0 or the first failure's exit code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            if any(p.poll() is None for p in procs):
                time.sleep(2.0)   # let a process that failed for the same reason print its own message
            killed = [j for j, p in enumerate(procs) if p.poll() is None]
            for j in killed:
                procs[j].kill()
                procs[j].wait()
            if killed:
                print(f"launch_local.py: process {i} exited with code {code}; killed the processes still "
                      f"running ({', '.join(map(str, killed))}): they cannot continue without it", file=sys.stderr)
            return code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(poll)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s --num_processes=N [--devices_per_process=K] -- LAUNCH_ARGS...")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=0,
                        help="simulate K CPU devices per process (0: the machine's own devices)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("launch_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    launch_args = args.launch_args[1:] if args.launch_args[:1] == ["--"] else args.launch_args
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    procs = start(args.num_processes, launch_args, devices_per_process=args.devices_per_process, port=args.port)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    return watch(procs)


if __name__ == "__main__":
    sys.exit(main())
