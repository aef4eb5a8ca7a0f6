"""Loading and validating shoal.yaml (parse_config / load_config), without starting anything."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.common import config as cfg
from services.common.config import (
    ConfigError,
    Replicates,
    Route,
    ShoalConfig,
    load_config,
    parse_config,
    parse_duration,
)

NO_ENV: dict[str, str] = {}


def parse(data: dict[str, Any], env: dict[str, str] | None = None, **kw: Any) -> ShoalConfig:
    base: dict[str, Any] = {"replication": {"hostname": "server-one"}}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_config(base, env=NO_ENV if env is None else env, **kw)


def problems_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(data, env)
    assert err.value.problems
    for problem in err.value.problems:
        assert problem in str(err.value)
    return err.value.problems


def one_problem(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    problems = problems_of(data, env)
    assert len(problems) == 1, problems
    return problems[0]


# -- defaults -----------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = parse_config(
        {"replication": {"hostname": "server-one"}}, env=NO_ENV, base_dir=tmp_path
    )
    assert config.node_name == "server-one"
    assert config.root_path == tmp_path / "shoal-data"
    assert config.storage_path == tmp_path / "shoal-data" / "database"
    assert config.keys_path == tmp_path / "shoal-data" / "keys"
    assert config.host == "127.0.0.1"
    assert config.storage.port == cfg.DEFAULT_STORAGE_PORT == 9926
    assert config.operations_api.port == cfg.DEFAULT_ADMIN_PORT == 9925
    # Replication over mutual TLS only: the plain port is closed unless asked for.
    assert config.replication.port is None
    assert config.replication.secure_port == cfg.DEFAULT_REPLICATION_SECURE_PORT == 9933
    assert config.replication.allowed_sources == ()
    assert config.sockets_folder == tmp_path / "shoal-data" / "sockets"
    assert config.socket_address("storage") == f"unix:{tmp_path}/shoal-data/sockets/storage.sock"
    assert config.replication.routes == ()
    assert config.replication.databases is None
    assert config.replication.max_clock_skew_s == 60.0
    assert config.replication.heartbeat_interval_s == 2.0
    assert config.replication.peer_timeout_s == 10.0
    assert config.storage.sync_writes is False
    assert config.storage.purge_interval_s == 3600.0
    assert config.logging.level == "info"
    assert config.logging.format == "text"
    assert config.logging.audit_retention_s == 3 * 86400.0
    assert config.tls.certificate is None
    assert config.admin.username == "admin"
    assert config.admin.password is None
    assert config.testing.clock_offset_ms == 0
    assert config.source is None
    assert config.local_address(9926) == "127.0.0.1:9926"


def test_local_address_for_wildcard_and_ipv6_hosts() -> None:
    assert parse({"host": "0.0.0.0"}).local_address(1) == "127.0.0.1:1"
    assert parse({"host": "::"}).local_address(1) == "127.0.0.1:1"
    assert parse({"host": "::1"}).local_address(2) == "[::1]:2"
    assert parse({"host": "127.0.0.5"}).local_address(3) == "127.0.0.5:3"


# -- Harper key names ---------------------------------------------------------------------


def test_harper_key_names(tmp_path: Path) -> None:
    config = parse_config(
        {
            "rootPath": "/var/lib/shoal",
            "host": "127.0.0.9",
            "operationsApi": {"network": {"port": 9000}},
            "logging": {"level": "WARN", "format": "json", "auditRetention": "3d"},
            "storage": {"port": 9001, "path": "db", "syncWrites": True},
            "tls": {
                "certificate": "keys/cert.pem",
                "privateKey": "keys/key.pem",
                "certificateAuthority": "keys/ca.pem",
            },
            "replication": {
                "hostname": "server-one",
                "port": 9002,
                "securePort": 9003,
                "databases": ["dev", "data"],
                "routes": [
                    "server-two",
                    "shoal://server-three:9933",
                    "127.0.0.2",
                    {
                        "hostname": "server-four",
                        "port": 9943,
                        "replicates": {"sends": False, "receives": True},
                        "startTime": "2024-01-01T00:00:00Z",
                        "revokedCertificates": ["1a2b3c", "ff00"],
                    },
                ],
            },
        },
        env=NO_ENV,
        base_dir=tmp_path,
    )
    assert config.root_path == Path("/var/lib/shoal")
    assert config.storage_path == Path("/var/lib/shoal/db")
    assert config.host == "127.0.0.9"
    assert config.operations_api.port == 9000
    assert config.storage.port == 9001
    assert config.storage.sync_writes is True
    assert config.logging.level == "warn"
    assert config.logging.format == "json"
    assert config.logging.audit_retention_s == 3 * 86400.0
    assert config.tls.certificate == Path("keys/cert.pem")
    assert config.tls.private_key == Path("keys/key.pem")
    assert config.tls.certificate_authority == Path("keys/ca.pem")
    assert config.replication.port == 9002
    assert config.replication.secure_port == 9003
    assert config.replication.database_names == ("dev", "data")
    assert config.replication.routes == (
        Route(hostname="server-two"),
        Route(hostname="server-three", port=9933),
        Route(hostname="127.0.0.2"),
        Route(
            hostname="server-four",
            port=9943,
            replicates=Replicates(sends=False, receives=True),
            start_time=datetime(2024, 1, 1, tzinfo=UTC),
            revoked_certificates=("1A2B3C", "FF00"),
        ),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server-two", Route("server-two")),
        ("server-two:9950", Route("server-two", port=9950)),
        ("shoal://server-three:9933", Route("server-three", port=9933)),
        ("shoal://server-three/", Route("server-three")),
        ("wss://server-three:9933", Route("server-three", port=9933, secure=True)),
        ("grpc://10.0.0.1:9932", Route("10.0.0.1", port=9932, secure=False)),
        ("127.0.0.2", Route("127.0.0.2")),
        ("[::1]:9933", Route("::1", port=9933)),
    ],
)
def test_route_strings(text: str, expected: Route) -> None:
    assert parse({"replication": {"routes": [text]}}).replication.routes == (expected,)


def test_route_mapping_forms() -> None:
    routes = parse(
        {
            "replication": {
                "routes": [
                    {"host": "server-two", "replicates": False},
                    {"url": "wss://server-three:9999"},
                    {"hostname": "server-four", "startTime": "2024-06-01T12:00:00"},
                ]
            }
        }
    ).replication.routes
    assert routes[0] == Route("server-two", replicates=Replicates(False, False))
    assert routes[1] == Route("server-three", port=9999, secure=True)
    assert routes[2].start_time == datetime(2024, 6, 1, 12, tzinfo=UTC)


def test_databases_star_means_all() -> None:
    assert parse({"replication": {"databases": "*"}}).replication.databases is None


# -- errors -------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "storage": {"port": "abc"},
            "logging": {"level": "loud"},
            "replication": {
                "hostnam": "server-uno",
                "routes": ["server-two", 42],
                "heartbeatInterval": "soon",
            },
            "surprise": 1,
        }
    )
    assert sorted(problems) == sorted(
        [
            "storage.port: expected a whole number (got 'abc')",
            "logging.level: must be one of trace, debug, info, warn, warning, error, fatal, "
            "notify (got 'loud')",
            "replication.hostnam: unknown key",
            "replication.routes[1]: expected a host name, a URL or a mapping (got 42)",
            "replication.heartbeatInterval: expected a duration such as 60, '500ms', '60s', "
            "'5m' or '3d' (got 'soon')",
            "surprise: unknown key",
        ]
    )


@pytest.mark.parametrize(
    ("data", "key", "bad"),
    [
        ({"storage": {"port": 0}}, "storage.port", "0"),
        ({"storage": {"port": 70000}}, "storage.port", "70000"),
        ({"storage": {"port": True}}, "storage.port", "True"),
        ({"storage": {"syncWrites": "yes"}}, "storage.syncWrites", "'yes'"),
        ({"storage": {"maxMessageBytes": 10}}, "storage.maxMessageBytes", "10"),
        ({"storage": "fast"}, "storage", "'fast'"),
        ({"storage": {"prot": 1}}, "storage.prot", ""),
        ({"operationsApi": {"network": {"port": "x"}}}, "operationsApi.network.port", "'x'"),
        ({"logging": {"format": "xml"}}, "logging.format", "'xml'"),
        ({"logging": {"auditRetention": -1}}, "logging.auditRetention", "-1"),
        ({"host": "not a host"}, "host", "'not a host'"),
        ({"replication": {"hostname": "bad name"}}, "replication.hostname", "'bad name'"),
        ({"replication": {"routes": "server-two"}}, "replication.routes", "'server-two'"),
        ({"replication": {"routes": ["ftp://x"]}}, "replication.routes[0]", "'ftp://x'"),
        ({"replication": {"routes": ["x:99999"]}}, "replication.routes[0]", "'x:99999'"),
        ({"replication": {"routes": [{"port": 1}]}}, "replication.routes[0]", "{'port': 1}"),
        (
            {"replication": {"routes": [{"hostname": "a", "replicates": "both"}]}},
            "replication.routes[0].replicates",
            "'both'",
        ),
        (
            {"replication": {"routes": [{"hostname": "a", "replicates": {"send": True}}]}},
            "replication.routes[0].replicates.send",
            "",
        ),
        (
            {"replication": {"routes": [{"hostname": "a", "startTime": 5}]}},
            "replication.routes[0].startTime",
            "5",
        ),
        (
            {"replication": {"routes": [{"hostname": "a", "revokedCertificates": "x"}]}},
            "replication.routes[0].revokedCertificates",
            "'x'",
        ),
        (
            {"replication": {"routes": [{"hostname": "a", "colour": "x"}]}},
            "replication.routes[0].colour",
            "",
        ),
        ({"replication": {"databases": ["ok", "not ok"]}}, "replication.databases[1]", "'not ok'"),
        (
            {"replication": {"databases": [{"name": "dev", "replicateTo": 0}]}},
            "replication.databases[0].replicateTo",
            "0",
        ),
        (
            {"replication": {"databases": [{"name": "dev", "copies": 2}]}},
            "replication.databases[0].copies",
            "",
        ),
        ({"replication": {"peerTimeout": "3s"}}, "replication.peerTimeout", "3.0"),
        ({"admin": {"username": "no spaces"}}, "admin.username", "'no spaces'"),
        ({"testing": {"clockOffsetMs": 1.5}}, "testing.clockOffsetMs", "1.5"),
        # Above what every read path can serialize again (services/common/jsoninput.py).
        ({"storage": {"maxNestingDepth": 201}}, "storage.maxNestingDepth", "201"),
        ({"storage": {"maxNestingDepth": 7}}, "storage.maxNestingDepth", "7"),
    ],
)
def test_each_problem_names_its_key_and_value(data: dict[str, Any], key: str, bad: str) -> None:
    problem = one_problem(data)
    assert problem.startswith(f"{key}: "), problem
    assert bad in problem


def test_unknown_keys_are_errors_not_defaults() -> None:
    problems = problems_of({"replication": {"hostname": "server-one", "hostnam": "x"}})
    assert problems == ["replication.hostnam: unknown key"]


def test_a_route_naming_this_node_is_rejected() -> None:
    problem = one_problem({"replication": {"routes": ["server-two", "shoal://server-one:9933"]}})
    assert problem == "replication.routes: a route names this node itself (got 'server-one')"


def test_the_same_peer_twice_is_rejected() -> None:
    problem = one_problem({"replication": {"routes": ["server-two", {"hostname": "server-two"}]}})
    assert problem.startswith("replication.routes: the same peer is listed twice")
    assert "'server-two'" in problem


def test_duplicate_ports_across_services_are_rejected() -> None:
    problem = one_problem({"storage": {"port": 9925}})
    assert problem == "storage.port: port 9925 is already used by operationsApi.network.port"
    problems = problems_of({"replication": {"port": 9000, "securePort": 9000}})
    assert problems == ["replication.securePort: port 9000 is already used by replication.port"]


def test_secure_port_can_be_turned_off() -> None:
    config = parse({"replication": {"securePort": None, "port": 9933}})
    assert config.replication.secure_port is None
    assert config.replication.port == 9933
    insecure = parse({"replication": {"securePort": None}})
    assert insecure.replication.port == cfg.DEFAULT_REPLICATION_PORT == 9932


def test_the_plain_port_opens_only_when_asked_for() -> None:
    assert parse({"replication": {}}).replication.port is None
    assert parse({"replication": {"port": None}}).replication.port is None
    both = parse({"replication": {"port": 9932}})
    assert (both.replication.port, both.replication.secure_port) == (9932, 9933)
    problem = one_problem({"replication": {"port": None, "securePort": None}})
    assert problem.startswith("replication.port: replication.port and")
    assert "cannot both be null" in problem


def test_allowed_sources_are_addresses_or_networks() -> None:
    config = parse({"replication": {"allowedSources": ["127.0.0.1", "10.1.0.0/16", "::1"]}})
    assert [str(n) for n in config.replication.allowed_sources] == [
        "127.0.0.1/32",
        "10.1.0.0/16",
        "::1/128",
    ]
    problem = one_problem({"replication": {"allowedSources": ["10.1.0.0/16", "nope"]}})
    assert problem.startswith("replication.allowedSources: not an IP address or network")
    assert "'nope'" in problem
    problem = one_problem({"replication": {"allowedSources": "127.0.0.1"}})
    assert "expected a list" in problem


def test_sockets_path_is_checked_against_the_socket_limit(tmp_path: Path) -> None:
    config = parse({"socketsPath": "/run/shoal"})
    assert config.socket_address("replicator") == "unix:/run/shoal/replicator.sock"
    problem = one_problem({"socketsPath": "/" + "x" * 100})
    assert problem.startswith("socketsPath:")
    assert "more than the 107 a Unix socket allows" in problem
    # Without socketsPath, a rootPath too deep for sockets falls back to a folder of the
    # temporary folder named after it: the same for every process of the node.
    deep = parse({"rootPath": "/" + "d" * 100})
    folder = deep.sockets_folder
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("shoal-")
    assert parse({"rootPath": "/" + "d" * 100}).sockets_folder == folder
    assert parse({"rootPath": "/" + "e" * 100}).sockets_folder != folder


def test_config_error_message_lists_problems_and_source() -> None:
    err = ConfigError(["a: bad", "b: worse"], "shoal.yaml")
    assert str(err) == "invalid shoal.yaml:\n  - a: bad\n  - b: worse"
    assert err.problems == ["a: bad", "b: worse"]


# -- environment --------------------------------------------------------------------------


def test_env_overrides() -> None:
    config = parse(
        {"storage": {"port": 9100}},
        env={
            "SHOAL_STORAGE_PORT": "9999",
            "SHOAL_REPLICATION_ROUTES": "[a, b]",
            "SHOAL_REPLICATION_HOSTNAME": "server-env",
            "SHOAL_LOGGING_AUDITRETENTION": "5m",
            "SHOAL_OPERATIONSAPI_NETWORK_PORT": "9998",
            "UNRELATED": "1",
        },
    )
    assert config.storage.port == 9999
    assert config.replication.routes == (Route("a"), Route("b"))
    assert config.node_name == "server-env"
    assert config.logging.audit_retention_s == 300.0
    assert config.operations_api.port == 9998


def test_env_overrides_are_validated_like_the_file() -> None:
    problem = one_problem({}, env={"SHOAL_STORAGE_PORT": "lots"})
    assert problem == "storage.port: expected a whole number (got 'lots')"
    problem = one_problem({}, env={"SHOAL_STORAGE_PORT": "[unclosed"})
    assert problem.startswith("SHOAL_STORAGE_PORT: not valid YAML")


def test_env_applies_only_to_the_mapping_given() -> None:
    # An override replaces the value from the file, and keys absent from env keep the file's.
    config = parse(
        {"storage": {"port": 9100, "syncWrites": True}}, env={"SHOAL_STORAGE_PORT": "9101"}
    )
    assert config.storage.port == 9101
    assert config.storage.sync_writes is True


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("60s", 60.0),
        ("5m", 300.0),
        ("3d", 259200.0),
        ("2h", 7200.0),
        ("100ms", 0.1),
        ("1.5s", 1.5),
        (" 7 ", 7.0),
        ("7", 7.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["-5s", "5 weeks", "ms", "", "1y", True, None, -1, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_durations_in_the_file() -> None:
    config = parse(
        {
            "storage": {"purgeInterval": "5m"},
            "replication": {
                "maxClockSkew": "60s",
                "reconnectDelay": "100ms",
                "heartbeatInterval": 1,
                "peerTimeout": "3d",
            },
        }
    )
    assert config.storage.purge_interval_s == 300.0
    assert config.replication.max_clock_skew_s == 60.0
    assert config.replication.reconnect_delay_s == pytest.approx(0.1)
    assert config.replication.heartbeat_interval_s == 1.0
    assert config.replication.peer_timeout_s == 259200.0


# -- files --------------------------------------------------------------------------------


def test_load_config_relative_root_is_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "node1"
    folder.mkdir()
    file = folder / "shoal.yaml"
    file.write_text(
        "rootPath: data\n"
        "replication:\n"
        "  hostname: server-one\n"
        "  routes:\n"
        "    - server-two\n"
        "    - hostname: server-three\n"
        "      replicates: {sends: true, receives: false}\n",
        encoding="utf-8",
    )
    config = load_config(file, env={})
    assert config.root_path == folder / "data"
    assert config.source == file
    assert config.replication.routes == (
        Route("server-two"),
        Route("server-three", replicates=Replicates(True, False)),
    )


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("replication:\n  hostname: server-one\nstorage:\n  port: nope\n")
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    assert err.value.problems == ["storage.port: expected a whole number (got 'nope')"]
    assert str(err.value).startswith(f"invalid {file}:")


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing, env={})
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"cannot read {missing}")


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("replication: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("not valid YAML")


def test_load_config_not_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_config(file, env={})
    assert err.value.problems == ["the file must hold a mapping of keys"]


def test_load_config_empty_file_uses_defaults(tmp_path: Path) -> None:
    file = tmp_path / "shoal.yaml"
    file.write_text("")
    config = load_config(file, env={"SHOAL_REPLICATION_HOSTNAME": "server-one"})
    assert config.node_name == "server-one"
    assert config.root_path == tmp_path / "shoal-data"


# -- client certificates (storage.mtls, operationsApi.mtls) --------------------------------


def test_mtls_is_off_by_default_and_takes_harpers_forms() -> None:
    config = parse({})
    assert not config.storage.mtls.enabled and not config.operations_api.mtls.enabled
    config = parse(
        {
            "storage": {"mtls": {"required": True}},
            "operationsApi": {"mtls": {"required": True, "user": None}},
        }
    )
    assert config.storage.mtls == cfg.MtlsConfig(True, True, True)
    assert config.operations_api.mtls == cfg.MtlsConfig(True, True, False)
    assert parse({"storage": {"mtls": False}}).storage.mtls == cfg.MtlsConfig()
    config = parse({}, {"SHOAL_OPERATIONSAPI_MTLS_REQUIRED": "true"})
    assert config.operations_api.mtls == cfg.MtlsConfig(True, True, True)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"storage": {"mtls": True}}, ["storage.mtls.required", "must be true"]),
        ({"operationsApi": {"mtls": {"user": None}}}, ["operationsApi.mtls.required"]),
        ({"storage": {"mtls": "yes"}}, ["storage.mtls", "expected true, false"]),
        (
            {"storage": {"mtls": {"required": True, "user": "Subject"}}},
            ["storage.mtls.user", "'Common Name' or null", "Subject"],
        ),
        ({"storage": {"mtls": {"required": True, "role": "x"}}}, ["storage.mtls.role: unknown"]),
        (
            {"storage": {"tls": False, "mtls": {"required": True}}},
            ["storage.mtls", "storage.tls: true"],
        ),
        (
            {"replication": {"hostname": "n", "securePort": None},
             "operationsApi": {"mtls": {"required": True}}},
            ["operationsApi.mtls", "insecure mode"],
        ),
    ],
)  # fmt: skip
def test_mtls_problems_name_their_key(data: dict[str, Any], words: list[str]) -> None:
    text = "\n".join(problems_of(data))
    for word in words:
        assert word in text


def test_database_entries_with_replicate_to() -> None:
    config = parse(
        {"replication": {"databases": ["system", {"name": "dev", "replicateTo": 2}]}}
    ).replication
    assert config.database_names == ("system", "dev")
    assert config.replicate_to("dev") == 2
    assert config.replicate_to("system") is None
    assert config.replicate_to("other") is None
