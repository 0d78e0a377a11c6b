"""The settings object: defaults, address parsing and validation."""

from __future__ import annotations

import pytest

from netframe import Address, Config, ConfigError, parse_address


def test_defaults_listen_on_tcp_and_udp_9999_like_the_seeds() -> None:
    config = Config()
    assert config.tcp_addresses == (Address("127.0.0.1", 9999),)
    assert config.udp_addresses == (Address("127.0.0.1", 9999),)


def test_giving_one_transport_replaces_the_default_set() -> None:
    config = Config(tcp=["[::1]:0", "127.0.0.1:7000"])
    assert config.tcp_addresses == (Address("::1", 0), Address("127.0.0.1", 7000))
    assert config.udp_addresses == ()
    assert Config(udp="127.0.0.1:5").tcp_addresses == ()


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
