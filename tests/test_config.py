"""The settings object: defaults, address parsing and validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliServer, assert_one_line_error, run_netframe

from netframe import Address, Config, ConfigError, parse_address
from netframe.config import parse_unix_path, settings


def test_defaults_listen_on_tcp_and_udp_9999_like_the_seeds() -> None:
    config = Config()
    assert config.tcp_addresses == (Address("127.0.0.1", 9999),)
    assert config.udp_addresses == (Address("127.0.0.1", 9999),)


def test_giving_one_transport_replaces_the_default_set() -> None:
    config = Config(tcp=["[::1]:0", "127.0.0.1:7000"])
    assert config.tcp_addresses == (Address("::1", 0), Address("127.0.0.1", 7000))
    assert config.udp_addresses == ()
    assert Config(udp="127.0.0.1:5").tcp_addresses == ()


def test_a_unix_socket_alone_replaces_the_default_set() -> None:
    config = Config(unix="/run/app.sock")
    assert config.unix == ("/run/app.sock",)
    assert config.tcp_addresses == config.udp_addresses == ()
    assert config.listeners_given
    assert not Config().listeners_given
    assert Config(unix=[]).tcp_addresses == (Address("127.0.0.1", 9999),)


@pytest.mark.parametrize(
    ("text", "mode"), [("660", 0o660), ("0600", 0o600), ("0o666", 0o666), ("0", 0)]
)
def test_unix_mode_is_octal(text: str, mode: int) -> None:
    assert settings()["unix_mode"].parse(text) == mode


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must be a non-empty string"),
        ("@name", "abstract-namespace sockets (@name) are not served"),
        ("/tmp/a\0b", "holds a NUL byte"),
        ("/" + "x" * 107, "is 108 bytes; a socket address holds at most 107"),
    ],
)
def test_bad_unix_paths_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_unix_path(text)
    assert parse_unix_path("/" + "x" * 106) == "/" + "x" * 106


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9999", Address("127.0.0.1", 9999)),
        ("[::1]:0", Address("::1", 0)),
        ("localhost:80", Address("localhost", 80)),
        (":9999", Address("127.0.0.1", 9999)),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text",
    [
        "9999",
        "127.0.0.1",
        "127.0.0.1:x",
        "127.0.0.1:70000",
        "::1:9999",
        "[::1]9999",
        "[nothost]:1",
        "999.1.1.1:5",
        "bad_host!:5",
        "127.0.0.1:-1",
    ],
)
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="malformed address"):
        parse_address(text)


def test_address_str_round_trips() -> None:
    for text in ["127.0.0.1:9999", "[::1]:80"]:
        assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"framing": "lines"}, "framing must be one of"),
        ({"loop": "trio"}, "loop must be one of"),
        ({"encoding": "klingon"}, "unknown encoding"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"max_line_bytes": 0}, "max_line_bytes must be at least 1"),
        ({"max_line_bytes": 1.5}, "max_line_bytes must be a whole number"),
        ({"idle_timeout_s": -1}, "idle_timeout_s must be 0 \\(off\\) or more"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"idle_timeout_s": 1e308}, "idle_timeout_s must be at most a year"),
        ({"udp_allow_ports": [0]}, "udp_allow_ports must hold ports"),
        ({"write_buffer_low_bytes": 10**9}, "write_buffer_low_bytes"),
        ({"tcp": [], "udp": []}, "no listeners"),
        ({"handler": 5}, "handler must be"),
        ({"shutdown_timeout_s": float("nan")}, "shutdown_timeout_s must be more than 0"),
        ({"bare_message_delay_s": float("inf")}, "must be more than 0 seconds"),
        ({"backlog": 10**9}, "at most 65535"),
        ({"unix": ["@x"]}, "unix: Unix socket path '@x'"),
        ({"unix_mode": 0o1000}, "unix_mode must be a file mode from 0o000 to 0o777, not 0o1000"),
        ({"unix_mode": "660"}, "unix_mode must be a file mode"),
        ({"proxy_protocol": "v3"}, "proxy_protocol must be one of off, v1, v2, any"),
        ({"proxy_protocol": "v2"}, "proxy_protocol \\(--proxy-protocol\\) needs proxy_allow"),
        ({"proxy_allow": ["lb.example"]}, "'lb.example' is not an IP address or network"),
        ({"proxy_allow": ["10.0.0.1/8"]}, "has host bits set: write 10.0.0.0/8"),
        ({"proxy_allow": [5]}, "proxy_allow must hold IP addresses or networks"),
        ({"proxy_timeout_s": 0}, "proxy_timeout_s must be more than 0"),
    ],
)
def test_invalid_settings_name_the_setting(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**changes)  # type: ignore[arg-type]


def test_config_is_immutable_and_replace_revalidates() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.framing = "raw"  # type: ignore[misc]
    assert config.replace(framing="raw").framing == "raw"
    with pytest.raises(ConfigError):
        config.replace(framing="nope")


# -- settings from a file and the environment ---------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netframe.toml"
    path.write_text(text)
    return path


def test_file_environment_and_code_merge_in_that_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'tcp = ["127.0.0.1:7000"]\nudp = []\nidle_timeout_s = 60\n'
        'max_per_ip = 5\nframing = "LINE"\nmax_connections = "auto"\n',
    )
    environ = {"NETFRAME_IDLE_TIMEOUT_S": "90", "NETFRAME_MAX_PER_IP": "7", "HOME": "/root"}
    config = Config.load(path, environ=environ, max_per_ip=9)
    assert config.tcp_addresses == (Address("127.0.0.1", 7000),)
    assert config.udp_addresses == ()
    assert config.idle_timeout_s == 90  # the environment over the file
    assert config.max_per_ip == 9  # code (or a flag) over both
    assert config.framing == "line"
    assert config.max_connections is None
    assert config.message_timeout_s == Config().message_timeout_s  # untouched: the default


def test_every_setting_is_reachable_from_the_file_and_the_environment(tmp_path: Path) -> None:
    # One non-default value per setting, written as each source writes it.
    file_values = {
        "tcp": '["127.0.0.1:7001"]', "udp": '["127.0.0.1:7002"]', "handler": '"echo"',
        "framing": '"length"', "length_prefix_bytes": "2", "loop": '"asyncio"',
        "encoding": '"latin-1"', "log_format": '"json"', "log_level": '"debug"',
        "workers": '"auto"', "max_line_bytes": "100", "bare_message_delay_s": "0.5",
        "idle_timeout_s": "1.5",
        "message_timeout_s": "0", "max_connections": "10", "max_per_ip": "3",
        "write_buffer_high_bytes": "1000", "write_buffer_low_bytes": "10",
        "send_timeout_s": "2", "backlog": "7", "max_pending_messages": "2",
        "shutdown_timeout_s": "3", "udp_max_datagram_bytes": "512", "udp_rate": "0",
        "udp_rate_sources": "4", "udp_receive_buffer_bytes": "65536",
        "udp_allow_ports": "[53, 123]", "unix": '["/tmp/a.sock", "/tmp/b.sock"]',
        "unix_mode": "0o600", "proxy_protocol": '"v2"',
        "proxy_allow": '["10.0.0.0/8", "192.0.2.7"]', "proxy_timeout_s": "2",
        "tls_cert": '"/etc/tls/cert.pem"', "tls_key": '"/etc/tls/key.pem"',
        "tls_client_ca": '"/etc/tls/ca.pem"', "tls_handshake_timeout_s": "3",
        "metrics": '"127.0.0.1:9109"',
    }  # fmt: skip
    assert set(file_values) == set(settings())  # a new setting must be added here
    from_file = Config.load(
        write(tmp_path, "".join(f"{k} = {v}\n" for k, v in file_values.items())), environ={}
    )
    environ = {f"NETFRAME_{k.upper()}": v.strip('"[]').replace('"', "").replace(" ", "")
               for k, v in file_values.items()}  # fmt: skip
    from_environment = Config.load(environ=environ)
    defaults = Config()
    for name in settings():
        assert getattr(from_file, name) != getattr(defaults, name), name
        assert getattr(from_environment, name) == getattr(from_file, name), name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("idle_timeout_s = -1", "netframe.toml: idle_timeout_s: must be 0 (off) or more"),
        ("idle-timeout = 5", "unknown setting 'idle-timeout' (did you mean idle_timeout_s?)"),
        ("idle_timout_s = 5", "unknown setting 'idle_timout_s' (did you mean idle_timeout_s?)"),
        ('max_connections = "30"', "max_connections: must be a whole number, not '30'"),
        ("backlog = 1.5", "backlog: must be a whole number, not 1.5"),
        ('framing = "lines"', "framing: 'lines' is not one of auto, line, raw, length"),
        ('tcp = ["localhost"]', "tcp: malformed address 'localhost'"),
        ("udp_allow_ports = [70000]", "udp_allow_ports: must hold ports from 1 to 65535"),
        ('unix = ["@abstract"]', "unix: Unix socket path '@abstract': abstract-namespace"),
        ("unix = [5]", "unix: a Unix socket path must be a non-empty string, not 5"),
        ('unix_mode = "0o1777"', "unix_mode: '0o1777' is not a file mode: at most 777"),
        ("unix_mode = 660", "unix_mode: must be a file mode from 0o000 to 0o777, not 0o1224"),
        ('proxy_allow = ["10.0.0.1/8"]', "proxy_allow: '10.0.0.1/8' has host bits set"),
        ("proxy_allow = [10]", "proxy_allow: must hold IP addresses or networks, not 10"),
        ('metrics = "9109"', "metrics: malformed address '9109': expected HOST:PORT"),
        ("metrics = 9109", "metrics: must be an address like 127.0.0.1:9100, not 9109"),
        ("tcp = [", "netframe.toml: not valid TOML"),
    ],
)
def test_file_errors_name_the_file_the_key_and_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(write(tmp_path, text + "\n"), environ={})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NETFRAME_IDLE_TIMEOUT_S": "soon"}, "NETFRAME_IDLE_TIMEOUT_S: 'soon' is not a number"),
        ({"NETFRAME_BACKLOG": ""}, "NETFRAME_BACKLOG: is empty"),
        (
            {"NETFRAME_IDLE_TIMEOUT": "5"},
            "unknown environment variable NETFRAME_IDLE_TIMEOUT "
            "(did you mean NETFRAME_IDLE_TIMEOUT_S?)",
        ),
        ({"NETFRAME_TCP": "127.0.0.1:99999"}, "NETFRAME_TCP: malformed address"),
        ({"NETFRAME_PROXY_ALLOW": "10.0.0.0/8,lb"}, "NETFRAME_PROXY_ALLOW: 'lb' is not an IP"),
    ],
)
def test_environment_errors_name_the_variable_and_the_reason(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(environ=environ)


def test_the_environment_names_the_file_and_an_empty_list_turns_a_transport_off(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, 'tcp = ["127.0.0.1:7000"]\nudp = ["127.0.0.1:7000"]\n')
    config = Config.load(environ={"NETFRAME_CONFIG": str(path), "NETFRAME_UDP": ""})
    assert config.tcp_addresses == (Address("127.0.0.1", 7000),)
    assert config.udp_addresses == ()
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.toml"):
        Config.load(tmp_path / "missing.toml", environ={})
    # Variables of netframe's that are not settings are not mistaken for typos.
    assert Config.load(environ={"NETFRAME_NO_EXTENSIONS": "1"}) == Config()


def test_serve_takes_flags_over_environment_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_server: Callable[..., CliServer]
) -> None:
    path = write(
        tmp_path,
        'tcp = ["127.0.0.1:0"]\nudp = []\nhandler = "echo"\nframing = "raw"\n'
        'max_connections = 50\nlog_format = "console"\n',
    )
    monkeypatch.setenv("NETFRAME_FRAMING", "line")
    monkeypatch.setenv("NETFRAME_MAX_CONNECTIONS", "40")
    server = cli_server("--config", str(path), "--max-connections", "30")
    serving = server.wait_for("serving")[0]  # JSON: the flag beat the file's console
    assert (serving["handler"], serving["framing"], serving["max_connections"]) == (
        "echo",
        "line",
        30,
    )
    assert [e["transport"] for e in server.events if e["event"] == "listening"] == ["tcp"]


def test_serve_with_a_bad_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "idle_timeout_s = -5\n")
    done = run_netframe("serve", "--config", str(path))
    assert_one_line_error(done, 2, f"{path}: idle_timeout_s: must be 0 (off) or more seconds")


def test_the_file_shown_in_operations_md_loads(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert block, "operations.md has lost its TOML example"
    example = block[1].replace("\n  ", "\n").removeprefix("  ")  # it is indented in a list
    config = Config.load(write(tmp_path, example), environ={})
    assert config.handler == "echo"
    assert config.udp_addresses == ()
    assert config.idle_timeout_s == 60


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ('encoding = "bogus"', {}, "netframe.toml: encoding: unknown encoding 'bogus'"),
        ("", {"NETFRAME_ENCODING": "bogus"}, "NETFRAME_ENCODING: unknown encoding 'bogus'"),
        (
            "tcp = [9000]",
            {},
            "netframe.toml: tcp: must hold addresses like 127.0.0.1:9999, not 9000",
        ),
        ('handler = "nope"', {}, "netframe.toml: handler: unknown handler 'nope'"),
        ("", {"NETFRAME_HANDLER": "no.such:Thing"}, "NETFRAME_HANDLER: cannot import handler"),
    ],
)
def test_checks_made_by_config_too_name_their_source(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load(write(tmp_path, text + "\n"), environ=environ)


def test_proxy_allow_takes_addresses_and_networks_from_every_source(tmp_path: Path) -> None:
    import ipaddress

    expected = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::7"))
    assert Config(proxy_allow=["10.0.0.0/8", "2001:db8::7"]).proxy_allow == expected
    assert Config(proxy_allow=[ipaddress.ip_address("2001:db8::7")]).proxy_allow == expected[1:]
    from_env = Config.load(environ={"NETFRAME_PROXY_ALLOW": "10.0.0.0/8, 2001:db8::7"})
    assert from_env.proxy_allow == expected
    path = write(tmp_path, 'proxy_protocol = "any"\nproxy_allow = "10.0.0.0/8"\n')
    assert Config.load(path, environ={}).proxy_allow == expected[:1]


def test_serve_with_the_proxy_protocol_but_no_trusted_balancer_is_one_line_and_exit_2() -> None:
    done = run_netframe("serve", "--proxy-protocol", "v2", "--tcp", "127.0.0.1:0")
    assert_one_line_error(done, 2, "needs proxy_allow (--proxy-allow)")
    done = run_netframe("serve", "--proxy-protocol", "v2", "--proxy-allow", "10.0.0.1/8")
    assert_one_line_error(done, 2, "has host bits set: write 10.0.0.0/8")
