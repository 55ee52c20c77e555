"""The job's watchdog: one daemon thread per rank that ends a broken job in bounded time, and says why.

A rank blocked in a collective cannot see why its peers are late. Three ways a job breaks without
any rank's collective failing at once, and what the thread does about each:

- **one rank's error** (a full disk under rank 0's ``ema.pt``, COCOeval failing, W&B's init): the
  failing rank ``publish``es its error and exit status to the job's key-value store (the
  ``TCPStore`` every launcher already starts for ``init_process_group``); every other rank's thread
  sees it within ``POLL_S``, logs it ("rank 0 on node1 failed: OSError ...") and ends its process
  with the same status, instead of waiting in a collective until ``train.collective_timeout_s``
  (NCCL) or dying of a bare "connection closed by peer" (gloo). The store lives in rank 0's process,
  so a failing rank 0 waits (at most ``ACK_WAIT_S``) until every rank has read its error.
- **a lost store** (rank 0's host gone, this host's link cut): unreachable for
  ``min(STORE_LOST_S, collective_timeout_s)``, the job is declared lost and this rank exits.
- **a straggler or a hang** (no progress for ``train.stall_report_s``): every stalled rank writes
  its threads' Python stacks to ``<run_dir>/stalls/`` and logs where its main thread is; rank 0
  names the ranks that are behind (progress marks, below). On CUDA, PyTorch's NCCL flight
  recorder is switched on (``TORCH_NCCL_TRACE_BUFFER_SIZE``) and dumps what each rank's NCCL
  collectives were doing when the timeout fires. A report, not an abort: a straggler may recover.

Progress is ``mark(phase)``: a counter and a name kept in Python attributes by the training loop (no
tensor is touched: no host-device sync). Every rank marks the same phases in the same order, so the
rank(s) with the lowest count are the ones the others wait for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from pipeline.errors import exit_status

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often each rank's thread looks at the store
ACK_WAIT_S = 5.0  # how long a failing rank 0 keeps the store up for the others (polling every POLL_S) to read its error
STORE_LOST_S = 60.0  # unreachable this long (or train.collective_timeout_s if shorter): the job is lost
EXIT_JOB_LOST = 1  # a retry may get past it (requeue, resume)
_PREFIX = "pipeline/watchdog/"


def enable_flight_recorder() -> None:
    """On CUDA, before the process group forms: keep NCCL's last collectives per rank and dump them when a
    collective times out (PyTorch's flight recorder; ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` names the files).
    A user's own settings win."""
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def _where(err: BaseException) -> str:
    """`` (at <path in this repository>:line in function)``: the innermost frame of this project that raised ``err``."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        for package in ("/pipeline/", "/models/"):
            if package in frame.filename:
                path = package[1:] + frame.filename.rsplit(package, 1)[1]
                return f" (at {path}:{frame.lineno} in {frame.name})"
    return ""


class JobWatch:
    """This rank's watchdog thread (``with JobWatch(...) as watch``; ``watch.mark(phase)`` from the loop)."""

    def __init__(self, rank: int, world: int, run_dir: Path, stall_report_s: float, collective_timeout_s: float,
                 cuda: bool = False):
        self.rank, self.world, self.run_dir, self.cuda = rank, world, Path(run_dir), cuda
        self.stall_report_s = stall_report_s
        self.lost_after_s = min(STORE_LOST_S, collective_timeout_s)
        self.host = socket.gethostname()
        self.count, self.phase, self._changed = 0, "start", time.monotonic()
        self._last_contact = time.monotonic()  # with the job's store
        self._stall_reported = -1  # the count at which this rank last reported a stall
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store = None
        self._address = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))

    # ---- the training loop's side: Python attributes only ----

    def mark(self, phase: str, iteration: int) -> None:
        self.count += 1
        self.phase = f"{phase}, iteration {iteration + 1}"  # formatted here: a mark per phase, a few per step
        self._changed = time.monotonic()

    # ---- start, stop ----

    def __enter__(self) -> "JobWatch":
        if self.world > 1 and all(self._address):
            self._thread = threading.Thread(target=self._run, name="pipeline-watchdog", daemon=True)
            self._thread.start()
        elif self.world > 1:
            log.warning("watchdog off: MASTER_ADDR/MASTER_PORT are not set, so the job's store cannot be reached")
        return self

    def __exit__(self, kind, err, tb) -> None:
        self._stop.set()
        if err is not None and not getattr(err, "agreed", False) and self.world > 1:
            self.publish(err)

    # ---- one rank's error, for every other rank ----

    def publish(self, err: BaseException) -> None:
        """Tell every rank this one failed, and how (the first error published wins); rank 0, whose
        process holds the store, then waits until they have read it."""
        record = json.dumps({"rank": self.rank, "host": self.host, "status": exit_status(err),
                             "error": f"{type(err).__name__}: {err}"[:4000] + _where(err)})
        store = self._connect()
        if store is None:
            return
        try:
            store.compare_set(_PREFIX + "error", "", record)
            store.set(f"{_PREFIX}seen/{self.rank}", "1")  # this rank knows
            if self.rank == 0:
                self._wait_until_read(store)
        except Exception as store_err:  # the store going away is no reason to hide this rank's own error
            log.warning("could not publish this rank's error to the other ranks: %s", store_err)

    def _wait_until_read(self, store) -> None:
        """Keep the store up until every rank has read the error, at most ``ACK_WAIT_S``; name the ranks that
        never did: they are gone (a host lost, a process killed) or cut off from this one."""
        keys = [f"{_PREFIX}seen/{r}" for r in range(self.world)]
        deadline = time.monotonic() + ACK_WAIT_S
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        silent = [r for r, key in enumerate(keys) if not store.check([key])]
        if silent:
            hosts = {r: json.loads(store.get(f"{_PREFIX}progress/{r}"))[2] for r in silent
                     if store.check([f"{_PREFIX}progress/{r}"])}
            log.error("rank(s) %s did not answer within %.0f s: gone (host lost, process killed) or cut off from "
                      "rank 0; their last hosts: %s", silent, ACK_WAIT_S,
                      ", ".join(f"rank {r} on {h}" for r, h in hosts.items()) or "never reported")

    # ---- the thread ----

    def _connect(self):
        if self._store is None:
            host, port = self._address
            try:
                self._store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                            timeout=timedelta(seconds=max(1.0, min(10.0, self.lost_after_s))))
            except Exception:  # noqa: BLE001 - unreachable: counted by the caller
                return None
        return self._store

    def _run(self) -> None:
        while True:  # at once, then every POLL_S: the host is on record from the start
            self._poll()
            if self._stop.wait(POLL_S):
                return

    def _poll(self) -> None:
        store = self._connect()
        try:
            if store is None:
                raise ConnectionError(f"cannot connect to {self._address[0]}:{self._address[1]}")
            store.set(f"{_PREFIX}progress/{self.rank}", json.dumps([self.count, self.phase, self.host]))
            peer = store.get(_PREFIX + "error").decode() if store.check([_PREFIX + "error"]) else ""
        except Exception as err:  # noqa: BLE001 - any failure to talk to the store
            self._store = None
            lost = time.monotonic() - self._last_contact
            if lost > self.lost_after_s:
                self._exit(EXIT_JOB_LOST, f"rank {self.rank} on {self.host} lost the job: its store at "
                           f"{self._address[0]}:{self._address[1]} (rank 0's process) has been unreachable for "
                           f"{lost:.0f} s ({err}); rank 0's host is gone or the network between them is cut. "
                           "Relaunch with train.resume=auto")
            return
        self._last_contact = time.monotonic()
        if peer and not self._stop.is_set():
            self._peer_failed(store, json.loads(peer))
        self._check_stall(store)

    def _peer_failed(self, store, peer: dict) -> None:
        if peer["rank"] == self.rank:
            return
        try:
            store.set(f"{_PREFIX}seen/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - rank 0 may be gone already; the message below stands
            pass
        self._exit(peer["status"], f"rank {peer['rank']} on {peer['host']} failed: {peer['error']}\n"
                                   f"rank {self.rank} on {self.host} stops too (exit status {peer['status']})")

    def _exit(self, status: int, message: str) -> None:
        """End this process from the watchdog thread: the main thread may be blocked in a collective."""
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(status)

    # ---- stalls ----

    def _check_stall(self, store) -> None:
        still = time.monotonic() - self._changed
        if not self.stall_report_s or still < self.stall_report_s or self._stall_reported == self.count:
            return
        self._stall_reported = self.count
        where = self._write_stacks(still)
        log.warning("rank %d on %s: no progress for %.0f s (mark %d, %s); its main thread is in\n%s\nevery thread's "
                    "stack: %s%s", self.rank, self.host, still, self.count, self.phase, where[0], where[1],
                    "; NCCL's flight recorder dumps at the collective timeout (TORCH_NCCL_DEBUG_INFO_TEMP_FILE)"
                    if self.cuda else "")
        if self.rank == 0:
            self._name_stragglers(store)

    def _write_stacks(self, still: float) -> tuple[str, Path]:
        frames = sys._current_frames()
        main = "".join(traceback.format_stack(frames[self._main])[-6:]) if self._main in frames else "(unknown)\n"
        path = self.run_dir / "stalls" / f"rank{self.rank}-mark{self.count}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            out.write(f"rank {self.rank} on {self.host}: no progress for {still:.0f} s at mark {self.count} "
                      f"({self.phase})\n")
            for ident, frame in frames.items():
                name = next((t.name for t in threading.enumerate() if t.ident == ident), str(ident))
                out.write(f"\n--- thread {name}\n" + "".join(traceback.format_stack(frame)))
        return main.rstrip(), path

    def _name_stragglers(self, store) -> None:
        keys = [f"{_PREFIX}progress/{r}" for r in range(self.world)]
        try:
            marks = [json.loads(v) if v else None for v in store.multi_get(keys)] if store.check(keys) else None
        except Exception:  # noqa: BLE001 - a report is best effort
            marks = None
        if not marks:
            return
        lowest = min(m[0] for m in marks)
        behind = [r for r, m in enumerate(marks) if m[0] == lowest]
        if len(behind) == self.world:
            log.warning("every rank is at the same mark (%d, %s): they wait in one collective together (a peer's "
                        "link or a hung collective); train.collective_timeout_s ends it", lowest, marks[0][1])
            return
        ahead = max(marks)  # [mark, phase, host] of a rank furthest on
        log.warning("rank(s) %s behind the others: %s; the rest are at mark %d (%s). Their stacks: %s",
                    behind, ", ".join(f"rank {r} on {marks[r][2]} at mark {marks[r][0]} ({marks[r][1]})"
                                      for r in behind), ahead[0], ahead[1], self.run_dir / "stalls")
