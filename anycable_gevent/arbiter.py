"""The master of ``--workers N``: forks, watches and replaces workers; never imports gevent.

The CLI has validated the configuration and bound every listening socket (so a busy
port fails before any fork). The master forks N workers that inherit those sockets
(:mod:`anycable_gevent.worker` patches and serves them) and then only supervises:

* **Signals** are queued by their handlers (no logging, no reaping there) and a byte on a
  self-pipe wakes the main loop, which handles them one by one.
* **Reaping**: a worker that exits or is killed is replaced within a second. One that
  dies again soon after its start is replaced after a growing delay (crash loops back
  off). A worker that fails while booting (exit code 3) stops the master with that exit
  code when no worker is serving (a broken configuration or environment: no respawn
  loop); during a rolling restart it only stops the roll.
* **Heartbeats**: each worker stamps an unlinked file every second from its event loop;
  one whose stamp is older than ``--worker_timeout`` is killed and replaced. A worker
  that is only busy (a long fan-out) yields between batches and keeps stamping.
* **TERM/INT**: graceful stop: every worker drains (clients get ``server_restart``, or
  only a close frame with ``--restorable_shutdown``; pending Disconnect calls are sent)
  and the master exits 0 once all are gone, at most ``--shutdown_timeout`` (+5 s) later.
  A second TERM/INT, or QUIT, stops fast.
* **HUP**: rolling restart with the configuration re-read (same command line and config
  file): for each old worker in turn a new one is started, and only once it serves is
  the old one told to drain (SIGUSR2: close frames only, so its clients restore their
  sessions on the other workers without any RPC call). A configuration that does not
  load, or a new worker that does not boot, leaves the old workers serving, and the
  log says why. Listening addresses cannot change this way (restart for that).
* **TTIN/TTOU**: one worker more / one less (the oldest drains).

Stdlib only, plus the stdlib-only parts of this package.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from anycable_gevent import banner, listeners
from anycable_gevent.config import Config
from anycable_gevent.errors import EXIT_BOOT, ConfigError
from anycable_gevent.heartbeat import Heartbeat
from anycable_gevent.listeners import Listen
from anycable_gevent.metrics import DIR_ENV as METRICS_DIR_ENV
from anycable_gevent.metrics import clear_directory

log = logging.getLogger("anycable_gevent.master")

#: A worker that dies within this many seconds of booting counts as a quick crash.
QUICK_CRASH = 10.0
#: Longest delay before replacing a worker that keeps crashing.
MAX_RESPAWN_DELAY = 30.0
#: Seconds a worker may take to boot before it is killed as failed.
BOOT_TIMEOUT = 30.0
#: Seconds after the shutdown timeout before stragglers are killed.
KILL_GRACE = 5.0

SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


@dataclass
class WorkerProc:
    pid: int
    heartbeat: Heartbeat
    generation: int
    index: int
    started: float = field(default_factory=time.monotonic)
    booted_at: float = 0.0
    #: told to drain or stop (it is leaving)
    retiring: bool = False

    @property
    def booted(self) -> bool:
        if not self.booted_at and self.heartbeat.last() > 0:
            self.booted_at = time.monotonic()
        return bool(self.booted_at)


class Arbiter:
    def __init__(
        self,
        cfg: Config,
        sockets: dict[int, socket.socket],
        ports: dict[int, Listen],
        reload: Callable[[], Config],
    ) -> None:
        self.cfg = cfg
        self.sockets = sockets
        self.ports = ports
        self.reload = reload
        self.workers: dict[int, WorkerProc] = {}
        self.target = cfg.workers
        self.generation = 0
        self.stopping = False
        self.fast = False
        self.exit_code = 0
        self._queue: list[int] = []
        self._pipe_r, self._pipe_w = os.pipe()
        for fd in (self._pipe_r, self._pipe_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._respawn_delay = 0.0
        self._respawn_at = 0.0
        self._stop_deadline = 0.0
        #: a rolling restart: the old workers still to replace, the one being replaced
        self._roll: list[WorkerProc] = []
        self._roll_new: WorkerProc | None = None
        self._roll_old_cfg: Config | None = None
        self._indexes = 0
        self.private = tempfile.mkdtemp(prefix="anycable-gevent-")
        self.metrics_dir = os.path.join(self.private, "metrics")
        os.makedirs(self.metrics_dir)

    # ------------------------------------------------------------------ signals
    def _signal(self, signum: int, frame: object) -> None:
        # NO LOGGING here: queue and wake the loop
        self._queue.append(signum)
        try:
            os.write(self._pipe_w, b"!")
        except OSError:
            pass

    def _wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._pipe_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._pipe_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        os.environ[METRICS_DIR_ENV] = self.metrics_dir
        clear_directory(self.metrics_dir)
        for sig in SIGNALS:
            signal.signal(sig, self._signal)
        banner.print_process(self.cfg, self.ports, "master")
        log.info("master booting %d workers", self.target)
        try:
            while True:
                self._manage()
                self._wait(0.5)
                while self._queue:
                    self._dispatch(self._queue.pop(0))
                self._reap()
                self._murder()
                self._advance_roll()
                if self.stopping and not self.workers:
                    break
                if self.stopping and time.monotonic() > self._stop_deadline:
                    self._kill_all(signal.SIGKILL)
        finally:
            shutil.rmtree(self.private, ignore_errors=True)
        log.info("master exiting code=%d", self.exit_code)
        return self.exit_code

    def _dispatch(self, signum: int) -> None:
        name = signal.Signals(signum).name
        handler = getattr(self, f"handle_{name[3:].lower()}", None)
        if handler is not None:
            handler()

    def handle_chld(self) -> None:
        pass  # reaped by the loop right after

    def handle_term(self) -> None:
        if self.stopping:
            self.handle_quit()
            return
        log.info("graceful stop of %d workers", len(self.workers))
        self._stop(signal.SIGTERM, self.cfg.shutdown_timeout + KILL_GRACE)

    handle_int = handle_term

    def handle_quit(self) -> None:
        log.info("fast stop of %d workers", len(self.workers))
        self.fast = True
        self._stop(signal.SIGQUIT, 2.0)

    def handle_hup(self) -> None:
        if self.stopping:
            return
        if self._roll or self._roll_new is not None:
            log.warning("rolling restart already in progress: HUP ignored")
            return
        try:
            cfg = self.reload()
        except ConfigError as exc:
            log.error("reload refused, the workers keep serving with the current configuration: %s", exc)
            return
        ports = listeners.plan(cfg)
        if {p: x.host for p, x in ports.items()} != {p: x.host for p, x in self.ports.items()}:
            log.error("reload refused: the listening addresses changed (a restart is needed for that)")
            return
        log.info("rolling restart of %d workers with the re-read configuration", len(self.workers))
        self._roll_old_cfg = self.cfg
        self.cfg = cfg
        self.ports = ports
        self.target = cfg.workers
        self.generation += 1
        self._roll = sorted((w for w in self.workers.values() if not w.retiring), key=lambda w: w.started)

    def handle_ttin(self) -> None:
        if not self.stopping:
            self.target += 1
            log.info("one more worker: %d", self.target)

    def handle_ttou(self) -> None:
        if self.stopping or self.target <= 1:
            return
        self.target -= 1
        log.info("one worker less: %d", self.target)

    # ------------------------------------------------------------------ workers
    def _serving(self) -> list[WorkerProc]:
        return [w for w in self.workers.values() if not w.retiring]

    def _manage(self) -> None:
        if self.stopping:
            return
        serving = self._serving()
        rolling = self._roll_new is not None or bool(self._roll)
        # one worker less: the oldest drains
        while len(serving) > self.target and not rolling:
            oldest = min(serving, key=lambda w: w.started)
            self._retire(oldest, signal.SIGUSR2)
            serving.remove(oldest)
        if rolling:
            return
        missing = self.target - len(serving)
        if missing > 0 and time.monotonic() >= self._respawn_at:
            for _ in range(missing):
                self._spawn()

    def _spawn(self) -> WorkerProc | None:
        heartbeat = Heartbeat(self.private)
        index = self._indexes
        self._indexes += 1
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot fork a worker: %s", exc)
            heartbeat.close()
            return None
        if pid == 0:  # the worker
            code = EXIT_BOOT
            try:
                for sig in SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                for fd in (self._pipe_r, self._pipe_w):
                    os.close(fd)
                for other in self.workers.values():
                    other.heartbeat.close()
                from anycable_gevent import worker

                code = worker.main(
                    self.cfg,
                    self.sockets,
                    self.ports,
                    forked=True,
                    heartbeat=heartbeat,
                    index=index,
                    ppid=os.getppid(),
                )
            except BaseException:
                log.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        proc = WorkerProc(pid, heartbeat, self.generation, index)
        self.workers[pid] = proc
        log.info("worker started pid=%d", pid)
        return proc

    def _retire(self, proc: WorkerProc, sig: int) -> None:
        proc.retiring = True
        self._send(proc.pid, sig)

    def _send(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.workers):
            self._send(pid, sig)

    def _stop(self, sig: int, grace: float) -> None:
        self.stopping = True
        self._roll = []
        self._roll_new = None
        self._stop_deadline = time.monotonic() + grace
        for proc in self.workers.values():
            proc.retiring = True
        self._kill_all(sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            proc = self.workers.pop(pid, None)
            if proc is None:
                continue
            proc.heartbeat.close()
            self._reaped(proc, status)

    def _reaped(self, proc: WorkerProc, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        booted = proc.booted_at > 0
        if code < 0:
            how = f"killed by {signal.Signals(-code).name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        if proc.retiring:
            log.info("worker stopped pid=%d %s", proc.pid, how)
            return
        if proc is self._roll_new:
            self._abort_roll(f"the new worker {how} while booting")
            return
        if code == EXIT_BOOT and not booted:
            if not any(w.booted for w in self._serving()):
                log.error("worker failed to boot (%s): stopping (see the worker's error above)", how)
                self.exit_code = EXIT_BOOT
                self._stop(signal.SIGTERM, self.cfg.shutdown_timeout + KILL_GRACE)
                return
        log.warning("worker died pid=%d %s; replacing it", proc.pid, how)
        quick = not booted or time.monotonic() - proc.booted_at < QUICK_CRASH
        self._respawn_delay = min(max(self._respawn_delay * 2, 0.5), MAX_RESPAWN_DELAY) if quick else 0.0
        self._respawn_at = time.monotonic() + self._respawn_delay
        if self._respawn_delay:
            log.warning("workers crash soon after starting: next one in %.1fs", self._respawn_delay)

    def _murder(self) -> None:
        now = time.monotonic()
        for proc in list(self.workers.values()):
            if proc.booted:
                stale = now - proc.heartbeat.last() > self.cfg.worker_timeout
                what = f"no heartbeat for {self.cfg.worker_timeout:g}s"
            else:
                stale = now - proc.started > BOOT_TIMEOUT
                what = f"not booted after {BOOT_TIMEOUT:g}s"
            if stale and not (proc.retiring and self.stopping):
                log.error("worker hangs (%s): killing pid=%d", what, proc.pid)
                self._send(proc.pid, signal.SIGKILL)
                proc.heartbeat.notify()  # killed once, not every loop

    # ------------------------------------------------------------------ rolling restart
    def _advance_roll(self) -> None:
        if self.stopping:
            return
        new = self._roll_new
        if new is not None:
            if not new.booted:
                return
            # the new worker serves: the old one it replaces drains
            old = self._roll.pop(0)
            if old.pid in self.workers:
                log.info("rolling restart: worker pid=%d serves, draining pid=%d", new.pid, old.pid)
                self._retire(old, signal.SIGUSR2)
            self._roll_new = None
        if self._roll:
            if self._roll[0].pid not in self.workers:
                self._roll.pop(0)  # died meanwhile: replaced by the new generation anyway
                return
            self._roll_new = self._spawn()
            if self._roll_new is None:
                self._abort_roll("could not fork")
        elif self._roll_old_cfg is not None:
            self._roll_old_cfg = None
            log.info("rolling restart done: %d workers", len(self._serving()))

    def _abort_roll(self, why: str) -> None:
        log.error("rolling restart stopped, the old workers keep serving: %s", why)
        self._roll = []
        self._roll_new = None
        if self._roll_old_cfg is not None:
            self.cfg = self._roll_old_cfg
            self.target = self.cfg.workers
            self._roll_old_cfg = None


def run(cfg: Config, sockets: dict[int, socket.socket], ports: dict[int, Listen], reload: Callable[[], Config]) -> int:
    try:
        return Arbiter(cfg, sockets, ports, reload).run()
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return 0
        print(f"anycable-gevent: master failed: {exc}", file=sys.stderr)
        return 1
