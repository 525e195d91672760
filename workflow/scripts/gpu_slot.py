#!/usr/bin/env python3
"""Run a command on N GPUs of its own: gpu_slot.py [options] N -- COMMAND [ARG...]

The Snakemake workflow starts every GPU job through this script (docs/distributed.md,
"Snakemake"). Snakemake's `--resources gpu=4` limits how many cards the running jobs ask
for in total, but gives no job a card id, so four gpu=1 jobs would all use cuda:0. This
script claims N free cards, sets CUDA_VISIBLE_DEVICES to them and execs COMMAND.

- The cards: `--ids 0,1,2,3` (the workflow's `--config gpu_ids=...`), else the parent's
  CUDA_VISIBLE_DEVICES (as SLURM sets it for a job, or as a user restricts a machine),
  else the GPUs of `nvidia-smi -L` (its indices, with CUDA_DEVICE_ORDER=PCI_BUS_ID so that
  CUDA numbers them the same way). With none of these (a CPU machine, or an empty
  CUDA_VISIBLE_DEVICES) COMMAND runs as it is: no lock, no change, no output.
- A card is held by an exclusive flock(2) on <dir>/<card>.lock, taken on a file
  descriptor that COMMAND inherits: the lock lives exactly as long as COMMAND (and any
  child still holding the descriptor). Nothing has to release it; a job that exits,
  fails or is killed (SIGKILL included) frees its cards, and a lock file left behind
  is simply locked again by the next job.
- When fewer than N cards are free it waits (forever unless --timeout), saying once on
  stderr (the job's log) which processes hold the cards. Past --timeout it exits 75.
- <dir> is $AMOC_GPU_SLOTS_DIR or .snakemake/gpu-slots, one folder per host (a shared
  file system), and one per SLURM job when the cards come from SLURM's
  CUDA_VISIBLE_DEVICES (those ids belong to that job alone).

Standard library only, so any python3 runs it (a conda env, a venv, the system's).
"""

import errno
import fcntl
import os
import re
import socket
import subprocess
import sys
import time

USAGE = "usage: gpu_slot.py [--ids 0,1,..] [--dir DIR] [--timeout S] [--poll S] N -- COMMAND [ARG...]"
EX_TEMPFAIL = 75


def say(text):
    sys.stderr.write("gpu_slot: " + text + "\n")
    sys.stderr.flush()


def parse(argv):
    if "--" not in argv:
        raise SystemExit(USAGE)
    cut = argv.index("--")
    opts, command = argv[:cut], argv[cut + 1 :]
    values = {"--ids": None, "--dir": None, "--timeout": None, "--poll": "0.5"}
    positional = []
    i = 0
    while i < len(opts):
        if opts[i] in values and i + 1 < len(opts):
            values[opts[i]] = opts[i + 1]
            i += 2
        else:
            positional.append(opts[i])
            i += 1
    if len(positional) != 1 or not positional[0].isdigit() or not command:
        raise SystemExit(USAGE)
    timeout = None if values["--timeout"] is None else float(values["--timeout"])
    return int(positional[0]), values["--ids"], values["--dir"], timeout, float(values["--poll"]), command


def id_list(text):
    """Card ids of a comma-separated list (CUDA_VISIBLE_DEVICES syntax); CUDA ignores the
    ids after an invalid one (-1, say), and so does this."""
    ids = []
    for item in text.split(","):
        item = item.strip()
        if not item or item.startswith("-") or item == "NoDevFiles":
            break
        ids.append(item)
    return ids


def nvidia_smi_ids():
    """GPU indices of `nvidia-smi -L`; a GPU split into MIG instances gives their UUIDs."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60, check=True
        ).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return []
    ids = []
    for line in out.splitlines():
        gpu = re.match(r"^GPU (\d+):", line)
        mig = re.search(r"^\s+MIG .*\(UUID: (MIG-[^)\s]+)\)", line)
        if gpu:
            ids.append(gpu.group(1))
        elif mig and ids:
            if not ids[-1].startswith("MIG-"):
                ids.pop()  # the GPU itself is not usable as a whole: its instances are
            ids.append(mig.group(1))
    return ids


def cards(ids_option):
    """(ids, where they came from) of the cards this job may use."""
    if ids_option is not None:
        return id_list(ids_option), "ids"
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return id_list(os.environ["CUDA_VISIBLE_DEVICES"]), "env"
    return nvidia_smi_ids(), "nvidia-smi"


def slot_dir(dir_option, source):
    if dir_option:
        return dir_option
    base = os.environ.get("AMOC_GPU_SLOTS_DIR") or os.path.join(".snakemake", "gpu-slots")
    name = socket.gethostname() or "localhost"
    if source == "env" and os.environ.get("SLURM_JOB_ID"):
        name += "-slurm" + os.environ["SLURM_JOB_ID"]
    return os.path.join(base, re.sub(r"[^A-Za-z0-9._-]", "_", name))


def lock_path(folder, card):
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9._-]", "_", card) + ".lock")


def try_lock(path):
    """An open descriptor holding the exclusive lock of `path`, or None if it is held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was removed or replaced after we opened it: lock the new one


def holder(path):
    try:
        with open(path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def claim(n, ids, folder, command, timeout, poll):
    """{card: descriptor} of n cards, locked; None past the timeout."""
    os.makedirs(folder, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        # One claimant at a time, so that two jobs asking for 2 cards of 4 do not take
        # one each and both wait.
        with open(os.path.join(folder, ".claim"), "a") as mutex:
            fcntl.flock(mutex.fileno(), fcntl.LOCK_EX)
            held, busy = {}, []
            for card in ids:
                fd = try_lock(lock_path(folder, card))
                if fd is None:
                    busy.append(card)
                    continue
                held[card] = fd
                if len(held) == n:
                    break
            if len(held) == n:
                note = "pid %d on %s: %s\n" % (os.getpid(), socket.gethostname(), " ".join(command))
                for fd in held.values():
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, note.encode(), 0)
                return held
            for fd in held.values():
                os.close(fd)
        busy = ", ".join("%s held by %s" % (card, holder(lock_path(folder, card))) for card in busy)
        if deadline is not None and time.monotonic() >= deadline:
            say(
                "no free GPU for this job: it asks for %d of %s (%s); gave up after %gs"
                % (n, ",".join(ids), busy, timeout)
            )
            return None
        if not told:
            say("waiting for %d free GPU(s) of %s (%s)" % (n, ",".join(ids), busy))
            told = True
        time.sleep(poll)


def main(argv):
    n, ids_option, dir_option, timeout, poll, command = parse(argv)
    ids, source = cards(ids_option)
    if n > 0 and ids:
        if n > len(ids):
            say(
                "this job asks for %d GPUs but only %d are here (%s, from %s); lower --config gpus "
                "or run it where there are more" % (n, len(ids), ",".join(ids), source)
            )
            return 2
        folder = slot_dir(dir_option, source)
        try:
            held = claim(n, ids, folder, command, timeout, poll)
        except OSError as err:
            say("cannot lock GPU cards in %s: %s" % (folder, err))
            return 1
        if held is None:
            return EX_TEMPFAIL
        for fd in held.values():
            os.set_inheritable(fd, True)  # COMMAND keeps the locks for as long as it runs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)
        if source == "nvidia-smi":
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        say("CUDA_VISIBLE_DEVICES=%s (%s, locks in %s)" % (os.environ["CUDA_VISIBLE_DEVICES"], source, folder))
    try:
        os.execvp(command[0], command)
    except OSError as err:
        say("cannot run %s: %s" % (command[0], err))
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
