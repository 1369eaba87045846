"""A real two-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for the launch tests.

Follows shared/notes/cluster-on-one-machine.md: two slurmd daemons (node1, node2) on 127.0.0.1 with
MULTIPLE_SLURMD, munge authentication, everything under /var/tmp/slurm. ``start()`` installs the
packages when they are missing, ``stop()`` shuts the daemons down again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path("/var/tmp/slurm")
CONF = """ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/%n
TmpFS={root}/tmp/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldPort={ctld_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
{nodes}
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(Exception):
    """The machine cannot run the daemons (not root, no packages, no network for apt)."""


def _run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise ClusterUnavailable(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc


def install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("not root: cannot install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")


def start() -> None:
    """Install if needed, then start munged, slurmctld and two slurmd; wait until both nodes are idle."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("not root: slurmd needs root here")
    install()
    stop()
    for sub in ("ctld", "node1", "node2", "tmp/node1", "tmp/node2", "log"):
        (ROOT / sub).mkdir(parents=True, exist_ok=True)
    conf_dir = Path("/etc/slurm")
    conf_dir.mkdir(exist_ok=True)
    nodes = (
        "NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 "
        "RealMemory=10000 State=UNKNOWN"
    )
    (conf_dir / "slurm.conf").write_text(CONF.format(root=ROOT, ctld_port=6817, nodes=nodes))
    hosts = Path("/etc/hosts").read_text()
    if "node1" not in hosts.split():
        with open("/etc/hosts", "a") as f:
            f.write("127.0.0.1 node1 node2\n")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        _run("mungekey", "--create", check=False)
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force")
    _run("slurmctld", "-i")
    _run("slurmd", "-N", "node1")
    _run("slurmd", "-N", "node2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = _run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
        if states and all(s == "idle" for s in states) and len(states) >= 1:
            nodes = _run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            if sum("idle" in line for line in nodes) >= 2:
                return
        time.sleep(0.5)
    raise ClusterUnavailable(f"nodes never became idle: {_run('sinfo', check=False).stdout}")


def stop() -> None:
    """Shut the daemons down (nothing happens if none run)."""
    if shutil.which("scontrol"):
        subprocess.run(["scontrol", "shutdown"], capture_output=True, timeout=60)
    for pidfile in [
        ROOT / "slurmctld.pid",
        ROOT / "slurmd-node1.pid",
        ROOT / "slurmd-node2.pid",
        Path("/run/munge/munged.pid"),
    ]:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    for name in ("slurmctld", "slurmd", "munged"):
        subprocess.run(["pkill", "-x", name], capture_output=True)
    time.sleep(0.5)
