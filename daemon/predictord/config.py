"""The daemon's settings (config.toml) and an API's settings (NAME.toml), as typed, validated data.

Each option is defined once, with its default and help text; the same definition feeds validation, the error
messages, ``predictord options`` and the README's table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "PREDICTORD_CONFIG"
SYSTEM_CONFIG = Path("/etc/predictord/config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICES = ("any", "cpu", "gpu")


class ConfigError(Exception):
    """A settings file holds a value the daemon cannot use; the message says where, what and how to fix it."""

    def detail(self, path: Path | None) -> str:
        """The message without its leading ``path: `` (for an error that names its file apart)."""
        return str(self).removeprefix(f"{path}: ")


Check = Callable[[Any], str | None]  # returns what was expected when the value is wrong, else None


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A config option: its default, its one-line help and an optional extra check."""
    return field(default=default, metadata={"help": help, "check": check})


def _in_range(lo: float, hi: float | None = None) -> Check:
    def check(value: Any) -> str | None:
        if value < lo or (hi is not None and value > hi):
            return f"a number from {lo} to {hi}" if hi is not None else f"a number >= {lo}"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)

    return check


def _gpus(value: Any) -> str | None:
    if value in ("all", "none"):
        return None
    if isinstance(value, (list, tuple)) and all(type(i) is int and i >= 0 for i in value):
        return None
    return '"all", "none" or a list of GPU indices such as [0, 1]'


def _path_list(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(m, str) and m for m in value):
        return None
    return 'a list of paths or URLs such as ["/srv/wheels"]'


def _requirement_list(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(r, str) and r.strip() and "\n" not in r for r in value):
        return None
    return 'a list of requirements in pip\'s format, such as ["requests==2.32.3", "numpy>=2"]'


def _sample_list(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v and not v.startswith("/")
                                                and ".." not in Path(v).parts for v in value):
        return None
    return 'a list of files in the predictor\'s folder, such as ["samples/cat.json"]'


def _module_list(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(m, str) and m for m in value):
        return None
    return 'a list of module names such as ["torch", "numpy"]'


@dataclass(frozen=True)
class ServerConfig:
    """[server]: where and how HTTP is served."""

    host: str = opt("127.0.0.1", "Address to listen on. Loopback by default: the APIs run arbitrary code.")
    port: int = opt(8080, "TCP port to listen on (0 picks a free one and logs it).", _in_range(0, 65535))
    http_workers: int = opt(2, "HTTP worker processes (they parse and route; they hold no models).", _in_range(1, 32))
    max_body_bytes: int = opt(100 * 1024 * 1024, "Largest request body accepted; larger gets 413.", _in_range(1))
    graceful_timeout: float = opt(30.0, "Seconds in-flight requests get to finish on shutdown.", _in_range(0))
    drain_delay: float = opt(0.0, "Seconds from SIGTERM to closing the listener, while /readyz answers 503 and "
                             "requests are still served, so that a load balancer takes this host out of rotation "
                             "first (HAProxy: fall x inter + 1 s, e.g. 3). 0: close it at once.", _in_range(0, 60))
    log_level: str = opt("info", "Log level: " + ", ".join(LOG_LEVELS) + ".", _one_of(LOG_LEVELS))
    log_format: str = opt("text", "Log lines as text, or json (one object per line) for log shippers.",
                          _one_of(("text", "json")))
    access_log: bool = opt(False, "One log line per request (API, status, latency, request id, worker); "
                           "off by default: it costs a write per request.")
    admin_socket: str = opt("", "Unix socket of `predictord status` (never on the network); empty: "
                            "$RUNTIME_DIRECTORY/admin.sock, else /run/predictord/admin.sock as root, else in /tmp.")
    allow_remote: bool = opt(False, "Allow a host other than loopback (put an authenticating proxy in front).")
    max_header_bytes: int = opt(64 * 1024, "Largest request line plus headers accepted; larger gets 431 and the "
                                "connection is closed.", _in_range(1024))
    keepalive: int = opt(5, "Seconds an idle keep-alive connection stays open for the client's next request. Behind a "
                         "proxy that keeps connections to the daemon (nginx's upstream keepalive, a cloud load "
                         "balancer), set it above the proxy's idle timeout (nginx: keepalive_timeout, 60 s; AWS ALB: "
                         "60 s), or the proxy may send a request on a connection the daemon is closing, and answer "
                         "502.", _in_range(1, 3600))
    read_timeout: float = opt(60.0, "Seconds a client may take to send a request's head and body (from its first "
                              "byte); slower gets 408 and is disconnected, so slow clients cannot hold connections.",
                              _in_range(0.1))
    auth_token_file: str = opt("", "File holding the bearer token that POST /NAME requires (Authorization: Bearer "
                               "TOKEN); empty: no token. Relative to this file; it must not be readable by others.")
    admin_token_file: str = opt("", "File holding the bearer token for GET /, GET /NAME, /metrics and /openapi.json "
                                "over TCP; empty: no token. /healthz, /readyz and the admin socket stay open.")


@dataclass(frozen=True)
class PredictorsConfig:
    """[predictors]: the watched directory and how predictors are loaded."""

    dir: str = opt("predictors", "Directory of predictors (NAME.py or NAME/predictor.py); relative to this file. A "
                    "link is followed to what it points to now: a release deployed by swapping it is served.")
    load_timeout: float = opt(120.0, "Seconds a predictor's load (its import, __init__ and warm-up) may take before "
                              "it is killed.", _in_range(0.1))
    check_permissions: bool = opt(True, "Refuse predictor files others can write (as sshd does); off for development.")
    watch: bool = opt(True, "Reload an API when its files change (else only on SIGHUP).")
    debounce: float = opt(1.0, "Seconds of quiet, with sizes and mtimes stable, before a change is loaded.",
                          _in_range(0.05, 60))
    max_probes: int = opt(0, "Probes (throwaway processes that check a new version) that run at once; more wait "
                          "their turn; 0: the cores, at most one per 512 MiB of memory.", _in_range(0, 256))
    max_apis: int = opt(1024, "APIs the daemon serves at once; beyond it an API is shown failed with the reason, "
                        "and loads once another is removed.", _in_range(1, 65535))
    envs_dir: str = opt("", "Where the environments of predictors that declare requirements are built; empty: "
                        "$STATE_DIRECTORY/envs under systemd (/var/lib/predictord/envs), else the runtime directory "
                        "(rebuilt at each start). Relative to this file.")
    installer: str = opt("pip", "What installs a predictor's requirements: pip (sees the daemon's own packages, so "
                         "torch is shared) or uv (faster; installs every requirement into the environment).",
                         _one_of(("pip", "uv")))
    index_url: str = opt("", "Package index for requirements (pip's --index-url); empty: the installer's own "
                         "configuration (pip.conf, PIP_INDEX_URL).")
    find_links: tuple[str, ...] = opt((), "Local folders or pages of wheels for requirements (pip's --find-links), "
                                      "relative to this file.", _path_list)
    no_index: bool = opt(False, "Install requirements from find_links only, never from an index (air-gapped hosts).")
    install_timeout: float = opt(600.0, "Seconds an environment may take to build before the install is killed and "
                                 "the version fails.", _in_range(1))
    max_installs: int = opt(2, "Environments built at once; more wait their turn.", _in_range(1, 64))
    env_grace: float = opt(3600.0, "Seconds an environment no version needs any more is kept (a revert reuses it) "
                           "before it is removed.", _in_range(0))


@dataclass(frozen=True)
class WorkersConfig:
    """[workers]: the model worker processes."""

    cpu: int = opt(1, "CPU model workers (in addition to one per GPU); the rebalancer never goes below this.",
                   _in_range(0, 64))
    cpu_max: int = opt(0, "Most CPU model workers the rebalancer may run when CPU APIs queue; 0: same as cpu.",
                       _in_range(0, 64))
    gpu_max: int = opt(2, "Most model workers the rebalancer may run on one GPU (it starts with one each).",
                       _in_range(1, 16))
    gpus: Any = opt("all", 'GPUs to use: "all", "none" or a list of indices; one model worker each.', _gpus)
    preload: tuple[str, ...] = opt(
        ("torch",), "Modules imported once in the master and shared copy-on-write by all workers.", _module_list
    )
    torch_threads: int = opt(0, "torch threads per model worker; 0: the cores divided by all worker processes.",
                             _in_range(0, 1024))
    heartbeat_timeout: float = opt(30.0, "Seconds a model worker may stay silent before it is replaced.", _in_range(1))
    max_rss_mib: int = opt(0, "Resident memory (MiB, shared pages included, its large answers' files in /dev/shm "
                           "not) past which a model worker is killed and replaced; 0: no limit.", _in_range(0))
    recycle_mib: int = opt(1024, "A model worker whose memory, after an unload, reload or failed load, exceeds what "
                           "it started with plus what its APIs' loads measured by this many MiB (a leak across "
                           "reloads) is replaced, make before break; 0: never.", _in_range(0))
    crash_limit: int = opt(3, "An API whose code ends its model worker (os._exit, a segfault, a hang) this many times "
                           "within crash_window is quarantined until its files change; 0: never.", _in_range(0, 1000))
    crash_window: float = opt(60.0, "Seconds over which crash_limit counts an API's crashes.", _in_range(1))


@dataclass(frozen=True)
class RebalanceConfig:
    """[rebalance]: the sampler (NVML, psutil, queues) and the policy that adds, removes and moves replicas."""

    enabled: bool = opt(True, "Sample devices and queues, and add, remove and move replicas from what is seen.")
    interval: float = opt(2.0, "Seconds between samples.", _in_range(0.1, 3600))
    window: int = opt(5, "Samples a condition must hold in before the policy acts on it (hysteresis).",
                      _in_range(1, 1000))
    cooldown: float = opt(30.0, "Seconds after a change to an API before the next change to it.", _in_range(0))
    idle_after: float = opt(120.0, "Seconds without requests before an API's added replicas are taken away.",
                            _in_range(0))
    queue_high: float = opt(2.0, "Requests waiting per replica, in every sample of the window, that add a replica.",
                            _in_range(0.1))
    gpu_spare: float = opt(70.0, "A GPU busier than this (utilization %) gets no new replica.", _in_range(0, 100))
    foreign_util: float = opt(50.0, "Utilization % taken by processes that are not ours that makes a GPU "
                              "saturated by someone else: its replicas move to a GPU with headroom.", _in_range(0, 100))
    foreign_memory: float = opt(0.5, "Share of a GPU's memory held by processes that are not ours that has the same "
                                "effect.", _in_range(0, 1))
    headroom_mib: int = opt(1024, "Memory (MiB) to keep free beyond a replica's measured footprint before placing it.",
                            _in_range(0))
    cpu_busy: float = opt(85.0, "Host CPU utilization % above which no CPU worker is added.", _in_range(0, 100))
    gpu_trace: str = opt("", "Replay GPU samples from this JSON-lines file instead of NVML (tests and what-ifs).")


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    predictors: PredictorsConfig = field(default_factory=PredictorsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    path: str = ""  # the file it came from ("" for the defaults)

    @property
    def admin_socket(self) -> Path:
        """Where the admin socket is: the configured path, or the default for how the daemon runs."""
        if self.server.admin_socket:
            return Path(self.server.admin_socket)
        if os.environ.get("RUNTIME_DIRECTORY"):
            return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "admin.sock"
        if os.geteuid() == 0:
            return Path("/run/predictord/admin.sock")
        return Path(f"/tmp/predictord-{os.geteuid()}/admin.sock")

    def token(self, which: str) -> bytes | None:
        """The bearer token in [server] auth_token_file or admin_token_file; None when unset; ConfigError naming the
        file and the fix when it cannot be used."""
        name: str = getattr(self.server, which)
        if not name:
            return None
        path = (Path(self.path).parent if self.path else Path.cwd()) / name
        where = f"{self.path or 'config'}: [server]: {which}: {path}"
        try:
            mode = path.stat().st_mode
            token = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read it: {e.strerror}") from e
        if mode & 0o004:
            raise ConfigError(f"{where}: mode {mode & 0o777:04o} lets anyone read the token. Fix: chmod o-r {path}")
        if not token or any(c <= 32 or c > 126 for c in token):
            raise ConfigError(f"{where}: expected one line of printable ASCII without spaces, found "
                              f"{'nothing' if not token else 'other characters'}")
        return token

    @property
    def max_probes(self) -> int:
        """[predictors] max_probes, or from the machine: the cores, at most one per 512 MiB of memory."""
        if self.predictors.max_probes:
            return int(self.predictors.max_probes)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(1, min(len(os.sched_getaffinity(0)), memory // (512 << 20)))

    @property
    def predictors_dir(self) -> Path:
        """[predictors] dir made absolute, its links not followed: the reader follows them to what they point to
        at each look (a release deployed by swapping a link is served)."""
        base = Path(self.path).parent if self.path else Path.cwd()
        return Path(os.path.normpath(base / self.predictors.dir))

    def envs_dir(self, runtime: Path) -> Path:
        """Where environments are built: [predictors] envs_dir, $STATE_DIRECTORY/envs, else ``runtime``/envs."""
        if self.predictors.envs_dir:
            return ((Path(self.path).parent if self.path else Path.cwd()) / self.predictors.envs_dir).resolve()
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "envs"
        return runtime / "envs"

    @property
    def find_links(self) -> tuple[str, ...]:
        """[predictors] find_links, paths made absolute (relative to this file); URLs as they are."""
        base = Path(self.path).parent if self.path else Path.cwd()
        return tuple(link if "://" in link else str((base / link).resolve()) for link in self.predictors.find_links)

    @property
    def gpu_trace(self) -> Path | None:
        """The GPU trace to replay instead of NVML, relative to this file; None: read NVML."""
        if not self.rebalance.gpu_trace:
            return None
        return ((Path(self.path).parent if self.path else Path.cwd()) / self.rebalance.gpu_trace).resolve()


@dataclass(frozen=True)
class ServingConfig:
    """[serving] of an API's settings file: how the API is served."""

    device: str = opt("any", "Where it runs: gpu, cpu or any (a GPU when there is one).", _one_of(DEVICES))
    replicas: int = opt(1, "Model workers that load this API (the rebalancer never goes below this).",
                        _in_range(1, 64))
    max_replicas: int = opt(0, "Most replicas the rebalancer may give it when requests queue; 0: as many as the "
                            "workers of its device allow.", _in_range(0, 64))
    timeout: float = opt(60.0, "Seconds a request may take, queueing included, before it gets 504; a streamed "
                         "answer's parts each get as long, and a client that reads none of it that long is cut.",
                         _in_range(0.001))
    queue_limit: int = opt(128, "Requests that may wait for a replica; more get 503 with Retry-After.", _in_range(0))
    threads: int = opt(1, "predict() calls at once per replica (for predictors that release the GIL or wait on I/O).",
                       _in_range(1, 256))
    max_batch_size: int = opt(1, "Requests per predict() call; above 1, predict() gets lists and returns a list.",
                              _in_range(1, 4096))
    batch_wait_ms: float = opt(5.0, "At most this many milliseconds a batch waits for more requests, and only while "
                               "some are on their way to its worker (a light load never waits).", _in_range(0, 10000))
    isolation: str = opt("shared", "shared: its replicas share model workers with other APIs; process: model workers "
                         "of its own, for code that must not share fate or global state.",
                         _one_of(("shared", "process")))
    health_interval: float = opt(10.0, "Seconds between calls of the predictor's health(), if it has one; 0: never.",
                                 _in_range(0, 86400))
    health_failures: int = opt(3, "health() failures in a row (a raise, False, or no answer within health_interval) "
                               "after which the replica is loaded again.", _in_range(1, 1000))
    warmup: tuple[str, ...] = opt((), "Sample requests run through predict() before a replica counts as ready: files "
                                  "in the predictor's folder (.json parsed, .txt text, others bytes); one that fails "
                                  "fails the load. With batching, each runs as a batch of one, then batches of 2, 4, "
                                  "... and max_batch_size.", _sample_list)


@dataclass(frozen=True)
class DependenciesConfig:
    """[dependencies] of an API's settings file: what its code needs beyond the daemon's own packages."""

    pip: tuple[str, ...] = opt((), "Requirements in pip's format, installed into an environment of the API's own "
                               "(a folder predictor may use requirements.txt instead).", _requirement_list)


@dataclass(frozen=True)
class ApiSettings:
    """An API's settings file: [config] for __init__, [serving] for the daemon, [dependencies] for its packages."""

    config: dict[str, Any] = field(default_factory=dict)
    serving: ServingConfig = field(default_factory=ServingConfig)
    dependencies: DependenciesConfig = field(default_factory=DependenciesConfig)


def _expected_type(f: dataclasses.Field[Any]) -> type | tuple[type, ...] | None:
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return bool
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, int):
        return int
    if isinstance(default, str) and f.metadata.get("check") is not _gpus:
        return str
    return None


_TYPE_WORDS = {bool: "true or false", int: "an integer", str: "a string"}


def _build_table(cls: type, raw: Any, where: str) -> Any:
    """Validate one TOML table against its dataclass; raise ConfigError naming the file, key and fix."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, found {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(fields)}")
        expected = _expected_type(f)
        wrong_type = expected is not None and (not isinstance(value, expected) or isinstance(value, bool))
        if expected is bool:
            wrong_type = not isinstance(value, bool)
        if wrong_type:
            words = "a number" if expected == (int, float) else _TYPE_WORDS.get(expected, str(expected))  # type: ignore[arg-type]
            raise ConfigError(f"{where}: {key}: expected {words}, found {value!r}")
        check: Check | None = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{where}: {key}: expected {problem}, found {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        values[key] = float(value) if expected == (int, float) else value
    built = cls(**values)
    if isinstance(built, ServerConfig) and not built.allow_remote and not is_loopback(built.host):
        raise ConfigError(f"{where}: host: {built.host!r} is not a loopback address, and every API runs arbitrary "
                          "code; to serve other hosts set allow_remote = true in [server] (behind a proxy that "
                          "authenticates), or use host = \"127.0.0.1\"")
    return built


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
        # utf-8-sig: a byte-order mark (Windows editors write one) is dropped, not "Invalid statement at line 1"
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not valid TOML: line {line} is not UTF-8 (save the file as UTF-8)") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e


def find_config(explicit: str | None) -> Path | None:
    """The config file to use: --config, $PREDICTORD_CONFIG, /etc/predictord/config.toml, ./config.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    for candidate in (SYSTEM_CONFIG, Path("config.toml")):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None) -> Config:
    """Read and validate config.toml; with no file, the defaults."""
    if path is None:
        return Config()
    raw = _read_toml(path)
    tables = {"server": ServerConfig, "predictors": PredictorsConfig, "workers": WorkersConfig,
              "rebalance": RebalanceConfig}
    unknown = set(raw) - set(tables)
    if unknown:
        raise ConfigError(f"{path}: unknown table [{sorted(unknown)[0]}]; allowed: {', '.join(tables)}")
    built = {name: _build_table(cls, raw.get(name, {}), f"{path}: [{name}]") for name, cls in tables.items()}
    config = Config(**built, path=str(path.resolve()))
    for which in ("auth_token_file", "admin_token_file"):
        config.token(which)  # a token file that cannot be used stops the daemon here, with the fix
    return config


def load_api_settings(path: Path | None) -> ApiSettings:
    """Read and validate an API's settings file (NAME.toml or NAME/predictor.toml); None gives the defaults."""
    if path is None or not path.exists():
        return ApiSettings()
    raw = _read_toml(path)
    unknown = set(raw) - {"config", "serving", "dependencies"}
    if unknown:
        raise ConfigError(f"{path}: unknown table [{sorted(unknown)[0]}]; allowed: config, serving, dependencies")
    config = raw.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: [config]: expected a table, found {config!r}")
    return ApiSettings(config=config, serving=_build_table(ServingConfig, raw.get("serving", {}), f"{path}: [serving]"),
                       dependencies=_build_table(DependenciesConfig, raw.get("dependencies", {}),
                                                 f"{path}: [dependencies]"))


def override(config: Config, table: str, **values: Any) -> Config:
    """The config with some keys of one table replaced (from the command line), validated like the file."""
    current = getattr(config, table)
    merged = {**dataclasses.asdict(current), **{k: v for k, v in values.items() if v is not None}}
    rebuilt = _build_table(type(current), merged, f"command line: [{table}]")
    return dataclasses.replace(config, **{table: rebuilt})


def describe_options() -> str:
    """Every option with its default and help, as the README's table (Markdown)."""
    lines = ["| file | table | key | default | meaning |", "|---|---|---|---|---|"]
    for file, tables in (
        ("config.toml", {"server": ServerConfig, "predictors": PredictorsConfig, "workers": WorkersConfig,
                         "rebalance": RebalanceConfig}),
        ("NAME.toml", {"serving": ServingConfig, "dependencies": DependenciesConfig}),
    ):
        for table, cls in tables.items():
            for f in dataclasses.fields(cls):
                default = list(f.default) if isinstance(f.default, tuple) else f.default
                shown = json.dumps(default) if isinstance(default, (str, list, bool)) else repr(default)
                lines.append(f"| {file} | [{table}] | `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(lines)
