"""A local run listens on loopback only, and Ctrl-C stops it at once with one line.

One `tessera generate --nproc 2` in a subprocess: while its ranks denoise, every listening
TCP socket that the command or its ranks own must be on 127.0.0.1 (found through
/proc/net/tcp{,6} and the processes' socket inodes); then SIGINT must end the ranks within
2 s and the command with exit code 130 and one line on stderr.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "0A"
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/net"), reason="needs Linux /proc")


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found + [g for c in found for g in _children(c)]


def _socket_inodes(pids) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass  # gone meanwhile
    return inodes


def _listening(inodes) -> list[tuple[str, str]]:
    """(local address hex, port hex) of the LISTEN sockets among `inodes`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == LISTEN and fields[9] in inodes:
                    found.append(tuple(fields[1].split(":")))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ranks(parent: int) -> list[int]:
    """The rank processes under `parent`: spawned children, or the children of the fork
    server (launch/processes.py), which share its command line."""
    ranks = []
    for child in _children(parent):
        cmd = _cmdline(child)
        if b"forkserver" in cmd:
            ranks += _children(child)
        elif b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            ranks.append(child)
    return ranks


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _start_denoising(tmp_path):
    """A local 2-rank CLI run, returned once rank 0's progress bar shows the ranks denoising:
    (process, its stderr so far as a growing bytearray, the reader thread)."""
    cmd = [sys.executable, "-m", "launch.cli", "generate", "--model", "tiny-sd", "--nproc", "2", "--height", "128",
           "--width", "128", "--steps", "500", "--guidance", "1", "--out", str(tmp_path / "x.png")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(b) for b in iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    while not re.search(rb" \d+/500 ", bytes(err)):  # rank 0's progress bar: the ranks are denoising
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            reader.join(timeout=10)
            raise AssertionError(bytes(err).decode()[-2000:])
        time.sleep(0.2)
    return proc, err, reader


def test_ranks_of_a_killed_launcher_stop_with_one_line_each(tmp_path):
    proc, err, reader = _start_denoising(tmp_path)
    ranks = _ranks(proc.pid)
    proc.kill()  # SIGKILL: the launcher cannot clean up
    proc.wait(timeout=30)
    sent = time.monotonic()
    while not all(_gone(p) for p in ranks) and time.monotonic() - sent < 10:
        time.sleep(0.05)
    assert all(_gone(p) for p in ranks), "ranks outlived their launcher"
    time.sleep(1.0)  # what the ranks and the resource tracker still print
    reader.join(timeout=10)
    text = bytes(err).decode()
    assert text.count("stopping: the launcher's store is gone") == 2, text[-2000:]
    assert "frame #" not in text and "leaked semaphore" not in text and "Traceback" not in text, text[-3000:]


def test_local_run_listens_on_loopback_only_and_ctrl_c_stops_it(tmp_path):
    proc, err, reader = _start_denoising(tmp_path)
    try:
        pids = [proc.pid, *_children(proc.pid)]
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2
        listening = _listening(_socket_inodes(pids))
        assert listening, "no listening socket found (the store at least should listen)"
        assert all(addr in LOOPBACK for addr, _ in listening), listening

        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        while not all(_gone(p) for p in ranks) and time.monotonic() - sent < 10:
            time.sleep(0.05)
        ranks_gone_s = time.monotonic() - sent
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    assert ranks_gone_s < 2.0, ranks_gone_s
    text = bytes(err).decode()
    assert text.rstrip().endswith("tessera: interrupted"), text[-2000:]  # after the killed rank's progress bar
    assert text.count("tessera:") == 1 and "Traceback" not in text and "leaked" not in text, text[-2000:]
    assert not (tmp_path / "x.png").exists()
