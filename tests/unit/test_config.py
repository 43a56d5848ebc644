from __future__ import annotations

from pathlib import Path

import pytest

from predictord import cli
from predictord.config import ConfigError, describe_options, find_config, load_api_settings, load_config


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    c = load_config(None)
    assert (c.server.host, c.server.port, c.server.http_workers) == ("127.0.0.1", 8080, 2)
    assert c.workers.gpus == "all" and c.workers.preload == ("torch",)


def test_values_are_read_and_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, '[server]\nport = 9000\ngraceful_timeout = 5\n[predictors]\ndir = "apis"\n'
                        '[workers]\ncpu = 3\ngpus = [0, 2]\n')
    c = load_config(p)
    assert c.server.port == 9000 and c.server.graceful_timeout == 5.0
    assert c.workers.cpu == 3 and c.workers.gpus == (0, 2)
    assert c.predictors_dir == (tmp_path / "apis").resolve()


def test_the_predictors_dir_keeps_its_links_from_the_file_and_the_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A link to a release is followed by the reader at each look: resolving it here would pin the first release.
    (tmp_path / "releases" / "r1").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/r1")
    p = write(tmp_path, '[predictors]\ndir = "./current/"\n')
    assert load_config(p).predictors_dir == tmp_path / "current"
    monkeypatch.chdir(tmp_path)
    args = cli._parser().parse_args(cli.command_first(["--config", str(p), "--predictors", "current"]))
    assert cli._load(args).predictors_dir == tmp_path / "current"


@pytest.mark.parametrize("text,message", [
    ('[server]\nport = "x"\n', "[server]: port: expected an integer, found 'x'"),
    ("[server]\nport = 70000\n", "[server]: port: expected a number from 0 to 65535, found 70000"),
    ("[server]\nport = true\n", "[server]: port: expected an integer, found True"),
    ('[server]\nlog_level = "loud"\n', "[server]: log_level: expected one of 'debug', 'info'"),
    ("[server]\nprot = 1\n", "[server]: unknown key 'prot'; allowed: host, port"),
    ("[serve]\nport = 1\n", "unknown table [serve]; allowed: server, predictors, workers"),
    ('[workers]\ngpus = "some"\n', '[workers]: gpus: expected "all", "none" or a list of GPU indices'),
    ("[workers]\ncpu = -1\n", "[workers]: cpu: expected a number from 0 to 64, found -1"),
    ('[predictors]\nload_timeout = "long"\n', "[predictors]: load_timeout: expected a number, found 'long'"),
    ("[server\n", "not valid TOML"),
])
def test_bad_values_name_file_key_expected_and_found(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(p.resolve()) if "unknown table" in message else str(p))
    assert message in str(e.value)


def test_api_settings(tmp_path: Path) -> None:
    p = write(tmp_path, '[config]\nk = "v"\n[serving]\ndevice = "cpu"\nreplicas = 2\ntimeout = 5\n', "a.toml")
    s = load_api_settings(p)
    assert s.config == {"k": "v"}
    assert (s.serving.device, s.serving.replicas, s.serving.timeout, s.serving.queue_limit) == ("cpu", 2, 5.0, 128)
    assert load_api_settings(tmp_path / "missing.toml").serving.device == "any"
    with pytest.raises(ConfigError, match=r"\[serving\]: device: expected one of 'any', 'cpu', 'gpu', found 'tpu'"):
        load_api_settings(write(tmp_path, '[serving]\ndevice = "tpu"\n', "b.toml"))


def test_a_settings_file_with_a_byte_order_mark_is_read_and_one_not_in_utf8_is_named(tmp_path: Path) -> None:
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[config]\nk = 1\n")  # as Notepad saves UTF-8
    assert load_api_settings(bom).config == {"k": 1}
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[config]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as e:
        load_api_settings(latin)
    assert str(e.value) == f"{latin}: not valid TOML: line 2 is not UTF-8 (save the file as UTF-8)"
    with pytest.raises(ConfigError, match="line 2 is not UTF-8"):
        load_config(latin)


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREDICTORD_CONFIG", raising=False)
    assert find_config("x.toml") == Path("x.toml")
    monkeypatch.setenv("PREDICTORD_CONFIG", "/env.toml")
    assert find_config(None) == Path("/env.toml")
    monkeypatch.delenv("PREDICTORD_CONFIG")
    write(tmp_path, "")
    expected = Path("/etc/predictord/config.toml") if Path("/etc/predictord/config.toml").is_file() else Path(
        "config.toml")
    assert find_config(None) == expected


def test_every_option_is_documented() -> None:
    table = describe_options()
    for key in ("host", "port", "http_workers", "dir", "load_timeout", "cpu", "gpus", "preload", "device",
                "replicas", "timeout", "queue_limit"):
        assert f"`{key}`" in table


def test_non_loopback_bind_needs_an_explicit_setting(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ConfigError, match="is not a loopback address.*allow_remote = true"):
            load_config(write(tmp_path, f'[server]\nhost = "{host}"\n'))
    assert load_config(write(tmp_path, '[server]\nhost = "0.0.0.0"\nallow_remote = true\n')).server.host == "0.0.0.0"
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert load_config(write(tmp_path, f'[server]\nhost = "{host}"\n')).server.host == host
