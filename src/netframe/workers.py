"""``--workers N``: a supervisor and N server processes that share the listeners.

The blocking :func:`run` (``netframe.run``, and so ``netframe serve``) serves in its own
process when ``workers`` is 1, the default. With more, the process becomes a supervisor:

- It binds every listener once per worker, all to one address with ``SO_REUSEPORT``, so
  that the kernel spreads connections (and UDP flows) over the workers' sockets, each
  with an accept queue of its own. The first socket of each address is bound *without*
  the option, and only then given it: that bind fails, as a single server's does, if
  anything at all holds the port, a group of ``SO_REUSEPORT`` sockets included, so a
  second netframe never joins a running one. Port 0 is resolved by that first bind, and
  the rest of the group binds the real port.
- It starts the workers with :mod:`multiprocessing`'s ``spawn`` method: fresh
  interpreters, each handed its sockets, the settings and one end of a pipe. A worker
  runs the ordinary :class:`~netframe.Server` on its sockets, logs with a ``worker``
  field, tells the supervisor when it serves, and stops when told to (or when the pipe
  breaks: a supervisor killed outright does not leave its workers serving on their own).
- It keeps its own copy of every socket, so a worker that dies loses only the
  connections it had accepted: those queued on its socket wait for the replacement. A
  worker that dies is replaced at once; one that dies before it serves, or soon after,
  is replaced after a delay that doubles each time, and after
  :data:`~netframe._supervisor.MAX_QUICK_DEATHS` such
  deaths in a row the supervisor gives up.
- A Unix socket (``--unix``) has no ``SO_REUSEPORT``: it is bound once and that one
  socket goes to every worker, which then share its accept queue; the supervisor removes
  its file at the stop. Under systemd the supervisor takes the sockets a socket unit
  hands over and gives every worker each of them in the same way, and it is the one
  that sends ``READY=1``, ``STOPPING=1`` and the watchdog's ``WATCHDOG=1``.
- A first SIGINT or SIGTERM closes the supervisor's sockets and tells every worker to
  stop gracefully; a second tells them to abort. Workers ignore SIGINT, which a
  terminal sends to every process of the group: the supervisor acts on it for them.

The supervisor's loop is a plain ``select`` over the signal wake-up descriptor, each
worker's process sentinel and each worker's pipe, with no event loop: nothing in it
runs user code, and nothing in it is inherited by a worker.
"""

from __future__ import annotations

import os
from typing import Any

from netframe._supervisor import Supervisor
from netframe.config import Config
from netframe.server import ensure_no_running_loop, run_in_process

__all__ = ["run", "worker_count"]


def run(config: Config | None = None, **settings: Any) -> int:
    """Run a server in the foreground until SIGINT or SIGTERM; return the exit status.

    The blocking form of :class:`~netframe.Server`, with the same arguments. It
    configures structlog from ``config`` (``log_format``, ``log_level``) and runs on the
    event loop ``config.loop`` names. The first signal starts a graceful shutdown; a
    second one aborts every connection and exits at once with status 1.

    Under systemd (see :mod:`netframe.systemd`) it serves the sockets a socket unit hands
    over (in place of the listeners ``config`` names), reports ``READY=1`` once every
    listener is bound and ``on_start`` has run, ``STOPPING=1`` when the stop begins, and
    feeds the watchdog when the unit has one.

    With ``workers`` above 1 (``None``: one per usable core), this process supervises
    that many worker processes, each serving the listeners through a socket of its own
    (see ``docs/operations.md``, "Workers"). Each worker imports the main module again,
    as :mod:`multiprocessing` does, so a script must call this under
    ``if __name__ == "__main__":``, and the handler must be importable there (a name,
    ``module:attribute``, or a class or function defined at module level). A Unix
    socket, and each socket systemd hands over, is one socket shared by every worker;
    the supervisor is then the process that notifies systemd.

    Returns:
        0 after a graceful stop; 1 when a second signal forced the stop, a worker did
        not stop cleanly, or a worker kept dying as it started.

    Raises:
        ConfigError, HandlerError, LoopUnavailable, ListenError, StartError: before
            serving starts (with workers: :class:`StartError` also when a worker dies
            before it serves, and the error a worker met when it raised one).
        RunInLoopError: called inside a running event loop (use :class:`Server`).
    """
    if config is None:
        config = Config(**settings)
    elif settings:
        config = config.replace(**settings)
    count = worker_count(config.workers)
    if count == 1:
        return run_in_process(config)
    ensure_no_running_loop()
    return Supervisor(config, count).run()


def worker_count(workers: int | None) -> int:
    """The number of processes the ``workers`` setting stands for: itself, or for
    ``None`` (``auto``) the cores this process may run on."""
    if workers is not None:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
