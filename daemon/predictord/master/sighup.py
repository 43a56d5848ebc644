"""SIGHUP (``systemctl reload``): config.toml read again and what changed applied, without dropping a request.

New [workers] slots start and retired ones drain (the balancer); changed [server] settings, or a token file
rewritten in place, make the HTTP front again and replace the HTTP workers, new ones first (``refresh_front``); a
new log level reaches the running model workers; the settings that are read once at start (RESTART_ONLY, the listen
address, the preload list) are named in a warning and keep their running values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gunicorn.arbiter import Arbiter

from ..config import Config, ConfigError
from ..protocol import LogLevel

if TYPE_CHECKING:
    from .arbiter import Master

log = logging.getLogger("predictord.master")

# Settings read once at start, which a SIGHUP does not apply (it says so). The listen address and the preload list
# have messages of their own.
RESTART_ONLY: dict[str, Callable[[Config], object]] = {
    "[server] log_format": lambda c: c.server.log_format,
    "[server] admin_socket": lambda c: c.server.admin_socket,
    "[workers] torch_threads": lambda c: c.workers.torch_threads,
    "[predictors] envs_dir": lambda c: c.predictors.envs_dir,
}


def reload(master: Master) -> None:
    master.notifier.reloading()
    log.info("SIGHUP: reloading %s and rescanning the predictors", master.pconfig.path or "(defaults)")
    try:
        new = master.app.reload_config()
    except ConfigError as e:
        log.error("SIGHUP: %s; keeping the running configuration", e)
        new = master.pconfig
    if new != master.pconfig:
        apply_config(master, new)
    refresh_front(master)
    master.reader.request(None)


def refresh_front(master: Master) -> None:
    """When what the HTTP workers were made from has changed ([server] settings, a token file's contents), make the
    front again and replace them, new ones first: the old ones get SIGTERM once the new are forked, and drain
    (http/worker.py); a connection waits in the listener's queue meanwhile, never refused."""
    try:
        made = master.app.front_settings()
    except ConfigError as e:
        log.error("SIGHUP: %s; the HTTP workers keep the running settings", e)
        return
    if made == master.front_made:
        log.info("SIGHUP: the [server] settings are unchanged: the HTTP workers keep running")
        return
    master.front_made = made
    master.app.load_config()  # gunicorn's settings (keep-alive, graceful timeout, log level)
    master.app.callable = None
    master.app.wsgi()  # the front, made from the new settings, that the workers forked from now on run
    master.roll_pending = True
    roll_http(master)


def roll_http(master: Master) -> None:
    """Start a new front's HTTP workers, and SIGTERM the old (gunicorn stops the oldest beyond num_workers), once
    the last roll's old workers are gone: at most twice num_workers at once, the scoreboard's HTTP rows
    (``Scoreboard.http_slots``). Called by the master's tick too, for a roll that had to wait."""
    if not master.roll_pending or len(master.WORKERS) > master.num_workers:
        return
    master.roll_pending = False
    log.info("SIGHUP: the [server] settings changed: starting %d new HTTP workers, then stopping the old ones",
             master.num_workers)
    for _ in range(master.num_workers):
        master.spawn_worker()
    Arbiter.manage_workers(master)


def apply_config(master: Master, new: Config) -> None:
    old, master.pconfig = master.pconfig, new
    master.app.pconfig = new
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        log.warning("SIGHUP: a new listen address takes a restart; still listening on %s:%d",
                    old.server.host, old.server.port)
    if old.workers.preload != new.workers.preload:
        log.warning("SIGHUP: a new preload list takes a restart")
    kept = [name for name, value in RESTART_ONLY.items() if value(old) != value(new)]
    if kept:
        log.warning("SIGHUP: %s %s a restart; the running %s", ", ".join(kept),
                    "takes" if len(kept) == 1 else "take", "value stays" if len(kept) == 1 else "values stay")
    master.catalog.max_probes = new.max_probes
    master.catalog.envs.config = new  # installer, index, installs at once, install timeout: for the next builds
    master.fleet.graceful = new.server.graceful_timeout
    logging.getLogger().setLevel(new.server.log_level.upper())  # the HTTP workers: through refresh_front
    if old.server.log_level != new.server.log_level:
        for handle in master.fleet:
            handle.send(LogLevel(new.server.log_level))
    master.num_workers = new.server.http_workers
    master.catalog.config = new
    running = {h.slot: h.device for h in master.fleet}
    master.balancer.configure(new, master.app.roll_devices({**running, **master.balancer.devices}, new))
    if old.predictors != new.predictors or old.predictors_dir != new.predictors_dir:
        master.reader.stop()
        master.reader = master.new_reader()
        master.start_reader()
