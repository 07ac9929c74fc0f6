"""Configuration: safe defaults, and errors an operator can act on."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from extproc import config
from extproc.config import ConfigError, Credential, Upstream


def write(tmp_path: Path, text: str, name: str = "tollway.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, environ=environ or {})
    return str(info.value)


# ---- defaults --------------------------------------------------------------------


def test_defaults_are_safe() -> None:
    cfg = config.load(None, environ={})
    assert cfg.server.address == "127.0.0.1"
    assert cfg.server.tls is None and cfg.server.allow_plaintext is False
    assert cfg.envoy.address == "127.0.0.1"
    assert cfg.envoy.admin_address == "127.0.0.1"
    assert cfg.metrics.address == "127.0.0.1"
    assert cfg.max_body_bytes == 10 * 1024 * 1024
    assert set(cfg.upstreams) == {"openai", "anthropic", "gemini"}
    for name, upstream in cfg.upstreams.items():
        assert upstream.auth is True, name
        assert upstream.tls is True, name  # providers are reached over https
        # Provider secrets come from the environment, never from the config itself.
        assert upstream.credential is not None and upstream.credential.env, name
        assert upstream.credential.file is None, name


def test_default_routes_send_each_provider_its_own_header() -> None:
    ups = config.load(None, environ={}).upstreams
    assert {name: up.key_header for name, up in ups.items()} == {
        "openai": "authorization",
        "anthropic": "x-api-key",
        "gemini": "x-goog-api-key",
    }


def test_load_without_environ_argument_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLWAY__SERVER__PORT", "50099")
    assert config.load(None).server.port == 50099
    assert config.load(None, environ={}).server.port == 50051


# ---- file errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("server:\n  bogus: 1\n", "server.bogus", "Extra inputs are not permitted"),
        ("bogus: 1\n", "bogus", "Extra inputs are not permitted"),
        ("server:\n  port: lots\n", "server.port", "valid integer"),
        ("server:\n  port: 70000\n", "server.port", "65535"),
        ("server:\n  reload_interval_s: 0\n", "server.reload_interval_s", "greater than 0"),
        ("server:\n  replicas: 0\n", "server.replicas", "greater than or equal to 1"),
        ("server:\n  replicas: 33\n", "server.replicas", "less than or equal to 32"),
        (
            "server:\n  port: 65534\n  replicas: 3\n",
            "(top level)",
            "server.port 65534 + 2 (server.replicas - 1) is above 65535",
        ),
        (
            "server:\n  replicas: 2\nmetrics:\n  port: 65535\n",
            "(top level)",
            "metrics.port 65535 + 1",
        ),
        ("envoy:\n  concurrency: 0\n", "envoy.concurrency", "greater than or equal to 1"),
        ("metrics:\n  enabled: maybe\n", "metrics.enabled", "valid boolean"),
        ("max_body_bytes: 10\n", "max_body_bytes", "1024"),
        ("upstreams:\n  x:\n    url: ftp://h.example\n", "upstreams.x.url", "http:// or https://"),
        ("upstreams:\n  x:\n    url: https://\n", "upstreams.x.url", "with a host"),
        ("upstreams:\n  x:\n    url: not a url\n", "upstreams.x.url", "http:// or https://"),
        ("upstreams:\n  x:\n    url: https://h.example/?a=1\n", "upstreams.x.url", "query"),
        (
            "upstreams:\n  x:\n    url: https://h.example\n    api: cohere\n",
            "upstreams.x.api",
            "'anthropic'",
        ),
        ("upstreams:\n  x:\n    api: openai\n", "upstreams.x.url", "Field required"),
        (
            "upstreams:\n  x:\n    url: https://h.example\n    prefixes: [v1/]\n",
            "upstreams.x.prefixes",
            "must start with '/'",
        ),
        (
            "upstreams:\n  x:\n    url: https://h.example\n    prefixes: []\n",
            "upstreams.x.prefixes",
            "at least one",
        ),
        (
            "upstreams:\n"
            "  a:\n    url: https://a.example\n    prefixes: [/v1/]\n"
            "  b:\n    url: https://b.example\n    prefixes: [/v2/, /v1/]\n",
            "upstreams",
            "prefix '/v1/' is used by 'a' and 'b'",
        ),
        ("upstreams: {}\n", "upstreams", "at least one upstream"),
        ("upstreams:\n  'bad name':\n    url: https://h.example\n", "upstreams", "'bad name'"),
        (
            "upstreams:\n  x:\n    url: https://h.example\n    credential: {env: A, file: b}\n",
            "upstreams.x.credential",
            "exactly one of 'env' or 'file'",
        ),
        (
            "upstreams:\n  x:\n    url: https://h.example\n    credential: {header: x-key}\n",
            "upstreams.x.credential",
            "exactly one of 'env' or 'file'",
        ),
        ("server:\n  address: 0.0.0.0\n", "server", "allow_plaintext"),
    ],
)
def test_bad_file_names_the_file_and_key_path(
    tmp_path: Path, text: str, where: str, what: str
) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: invalid configuration")
    assert f"\n  {where}: " in message
    assert what in message


@pytest.mark.parametrize("url", ["https://h.example:99999", "https://h.example:abc"])
def test_bad_port_in_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f"upstreams:\n  x:\n    url: '{url}'\n")
    assert "upstreams.x.url" in load_error(path)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("server: [unclosed\n", "not valid YAML"),
        ("server:\n  port: 1\n    bad-indent: 2\n", "not valid YAML"),
        ("- a list\n", "the top level must be a mapping"),
        ("just a string\n", "the top level must be a mapping"),
    ],
)
def test_unparseable_file_names_the_file(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert what in message
    assert "<unicode string>" not in message
    if what == "not valid YAML":
        assert re.search(r"line \d+, column \d+: ", message), message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = load_error(path)
    assert message.startswith(f"{path}: cannot read")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), environ={})
    assert cfg.server.port == 50051 and set(cfg.upstreams) == {"openai", "anthropic", "gemini"}


# ---- environment overrides -------------------------------------------------------


def test_env_overrides_apply_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6000\nmetrics:\n  port: 7000\n")
    cfg = config.load(
        path,
        environ={
            "TOLLWAY__SERVER__PORT": "50052",
            "TOLLWAY__METRICS__ENABLED": "false",
            "TOLLWAY__MAX_BODY_BYTES": "2048",
            "TOLLWAY__AUTH__KEYS_FILE": "/etc/tollway/keys.yaml",
            "OTHER__SERVER__PORT": "1",
            "TOLLWAY_SERVER_PORT": "2",
        },
    )
    assert cfg.server.port == 50052
    assert cfg.metrics.port == 7000  # untouched keys from the file stay
    assert cfg.metrics.enabled is False
    assert cfg.max_body_bytes == 2048
    assert cfg.auth.keys_file == Path("/etc/tollway/keys.yaml")


def test_env_override_errors_name_the_environment_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6000\n")
    message = load_error(path, {"TOLLWAY__SERVER__PORT": "lots"})
    assert message.startswith(f"{path} + TOLLWAY__* environment: invalid configuration")
    assert "\n  server.port: " in message
    message = load_error(None, {"TOLLWAY__SERVER__ADDRESS": "0.0.0.0"})
    assert message.startswith("defaults + TOLLWAY__* environment")
    assert "allow_plaintext" in message


def test_env_can_allow_plaintext_on_a_private_network() -> None:
    cfg = config.load(
        None,
        environ={"TOLLWAY__SERVER__ADDRESS": "0.0.0.0", "TOLLWAY__SERVER__ALLOW_PLAINTEXT": "true"},
    )
    assert cfg.server.address == "0.0.0.0" and cfg.server.allow_plaintext is True


# ---- plaintext policy ------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "ok"),
    [
        ("address: 127.0.0.1", True),
        ("address: 127.0.0.2", True),
        ("address: '::1'", True),
        ("address: localhost", True),
        ("address: 0.0.0.0", False),
        ("address: '::'", False),
        ("address: 10.0.0.5", False),
        ("address: tollway.internal", False),
        ("address: localhost.evil.example", False),
        ("{address: 0.0.0.0, allow_plaintext: true}", True),
        ("{address: 0.0.0.0, tls: {cert_file: c.pem, key_file: k.pem}}", True),
    ],
)
def test_plaintext_only_on_loopback(tmp_path: Path, server: str, ok: bool) -> None:
    body = server if server.startswith("{") else "{" + server + "}"
    path = write(tmp_path, f"server: {body}\n")
    if ok:
        config.load(path, environ={})
    else:
        assert "configure server.tls or set server.allow_plaintext: true" in load_error(path)


# ---- paths -----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        auth:
          keys_file: keys.yaml
        server:
          address: 0.0.0.0
          tls: {cert_file: tls/server.pem, key_file: tls/server.key, client_ca_file: ca.pem}
        envoy:
          tls: {cert_file: front.pem, key_file: /abs/front.key}
        upstreams:
          openai:
            url: https://api.openai.com
            credential: {file: secrets/openai.key}
          other:
            url: https://h.example
            prefixes: [/other/]
            credential: {file: /run/secrets/other.key}
        """,
        name="conf/tollway.yaml",
    )
    cfg = config.load(path, environ={})
    here = tmp_path / "conf"
    assert cfg.auth.keys_file == here / "keys.yaml"
    assert cfg.server.tls is not None
    assert cfg.server.tls.cert_file == here / "tls/server.pem"
    assert cfg.server.tls.key_file == here / "tls/server.key"
    assert cfg.server.tls.client_ca_file == here / "ca.pem"
    assert cfg.envoy.tls is not None
    assert cfg.envoy.tls.cert_file == here / "front.pem"
    assert cfg.envoy.tls.key_file == Path("/abs/front.key")
    openai, other = cfg.upstreams["openai"].credential, cfg.upstreams["other"].credential
    assert openai is not None and openai.file == here / "secrets/openai.key"
    assert other is not None and other.file == Path("/run/secrets/other.key")


def test_relative_paths_come_out_absolute_wherever_the_process_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tollway up` rewrites the config into a temporary folder: it must still mean the same
    files (it used to read `<temp>/tollway-keys.yaml`, and every key got 401)."""
    path = write(
        tmp_path,
        """\
        pricing: {litellm_file: prices/litellm.json}
        envoy:
          extproc_client_tls: {ca_file: ca.pem, cert_file: envoy.pem, key_file: envoy.key}
        """,
        name="conf/tollway.yaml",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(path, environ={})
    here = tmp_path / "conf"
    assert cfg.pricing.litellm_file == here / "prices/litellm.json"
    client = cfg.envoy.extproc_client_tls
    assert client is not None and client.ca_file == here / "ca.pem"
    assert (client.cert_file, client.key_file) == (here / "envoy.pem", here / "envoy.key")
    # Not in the file: the default keys file and an env override are the working directory's.
    assert cfg.auth.keys_file == elsewhere / "tollway-keys.yaml"
    env = {"TOLLWAY__AUTH__KEYS_FILE": "keys/k.yaml"}
    assert config.load(path, environ=env).auth.keys_file == elsewhere / "keys/k.yaml"

    rewritten = tmp_path / "tmp" / "tollway.yaml"
    rewritten.parent.mkdir()
    rewritten.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert config.load(rewritten, environ={}) == cfg


def test_defaults_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert config.load(None, environ={}).auth.keys_file == tmp_path / "tollway-keys.yaml"
    env = {"TOLLWAY__AUTH__KEYS_FILE": "~/k.yaml"}
    assert config.load(None, environ=env).auth.keys_file == Path.home() / "k.yaml"


# ---- models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ({"env": "OPENAI_API_KEY"}, True),
        ({"file": Path("k.txt")}, True),
        ({"env": "X", "file": Path("k.txt")}, False),
        ({}, False),
        ({"header": "x-key"}, False),
    ],
)
def test_credential_needs_exactly_one_source(fields: dict[str, object], ok: bool) -> None:
    if ok:
        Credential(**fields)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValidationError, match="exactly one of 'env' or 'file'"):
            Credential(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "base_path"),
    [
        ("https://api.openai.com", "api.openai.com", 443, True, ""),
        ("https://api.openai.com/", "api.openai.com", 443, True, ""),
        ("http://127.0.0.1:9000", "127.0.0.1", 9000, False, ""),
        ("http://llm.internal", "llm.internal", 80, False, ""),
        ("https://h.example:8443/openai/", "h.example", 8443, True, "/openai"),
    ],
)
def test_upstream_url_parts(url: str, host: str, port: int, tls: bool, base_path: str) -> None:
    upstream = Upstream(url=url)
    assert not upstream.url.endswith("/")
    assert (upstream.host, upstream.port, upstream.tls, upstream.base_path) == (
        host,
        port,
        tls,
        base_path,
    )


@pytest.mark.parametrize(
    ("api", "header", "expected"),
    [
        ("openai", None, "authorization"),
        ("azure", None, "api-key"),
        ("anthropic", None, "x-api-key"),
        ("gemini", None, "x-goog-api-key"),
        ("openai", "X-Custom-Key", "x-custom-key"),
    ],
)
def test_upstream_key_header(api: str, header: str | None, expected: str) -> None:
    upstream = Upstream(
        url="https://h.example",
        api=api,  # type: ignore[arg-type]
        credential=Credential(env="K", header=header),
    )
    assert upstream.key_header == expected


def test_config_is_frozen() -> None:
    cfg = config.load(None, environ={})
    with pytest.raises(ValidationError):
        cfg.server.port = 1


def test_an_override_is_validated_with_the_rest_and_named_in_the_error() -> None:
    base = config.load(None, environ={})
    assert config.override(base, {"server": {"replicas": 3}}, "--replicas").server.replicas == 3
    with pytest.raises(
        ConfigError, match=r"^--replicas: invalid configuration\n  server\.replicas"
    ):
        config.override(base, {"server": {"replicas": 0}}, "--replicas")


def test_replicas_need_no_shared_store_until_limits_exist() -> None:
    """A placeholder until the limits: and store: sections land (then: limits with
    server.replicas > 1 need store.redis)."""
    many = config.Config(server=config.ServerConfig(replicas=4))
    assert config.replicas_need_shared_store(many) is None


# ---- redaction -------------------------------------------------------------------


def test_redaction_is_off_by_default_and_on_with_an_empty_block(tmp_path: Path) -> None:
    assert config.load(None, environ={}).redaction is None
    block = config.load(write(tmp_path, "redaction: {}\n"), environ={}).redaction
    assert block is not None
    assert block.entities == ("email", "phone", "credit_card", "iban", "us_ssn", "secrets")
    assert (block.action, block.actions, block.on_error) == (
        "placeholder",
        {"secrets": "block"},
        "fail_closed",
    )
    assert (
        block.phone_regions[:3] == ("US", "GB", "DE") and not block.responses and not block.restore
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("redaction: {entities: [email, passport]}", "unknown entity type(s) passport"),
        ("redaction: {action: scramble}", "redaction.action"),
        ("redaction: {actions: {passport: mask}}", "actions for unknown entity type(s): passport"),
        ("redaction: {phone_regions: [XX]}", "unknown region(s) XX"),
        ("redaction: {custom: [{name: email, pattern: x}]}", "not a built-in entity's name"),
        ("redaction: {custom: [{name: Bad-Name, pattern: x}]}", "lower-case letters"),
        (
            "redaction: {custom: [{name: a, pattern: x}, {name: a, pattern: y}]}",
            "must be unique: a",
        ),
        ("redaction: {action: hash}", "redaction: the hash action needs hash_key"),
        (
            "redaction_policies: {p: {actions: {email: hash}}}",
            "redaction_policies.p: the hash action needs hash_key",
        ),
        ("redaction: {hash_key: {env: A, file: b}}", "set exactly one of 'env' or 'file'"),
        ("redaction: {tenants: [a]}", "only a policy in redaction_policies has tenants"),
        (
            "redaction_policies: {p: {tenants: [t]}, q: {tenants: [t]}}",
            "tenant 't' is in two policies: redaction_policies.p, redaction_policies.q",
        ),
    ],
)
def test_redaction_mistakes_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    assert message in load_error(write(tmp_path, text + "\n"))


def test_a_policy_may_use_the_main_blocks_hash_key(tmp_path: Path) -> None:
    text = "redaction: {hash_key: {env: K}}\nredaction_policies: {p: {action: hash}}\n"
    loaded = config.load(write(tmp_path, text), environ={})
    assert loaded.redaction_policies["p"].hash_key is None  # the stage uses the main one


def test_a_route_can_turn_redaction_off(tmp_path: Path) -> None:
    text = "upstreams: {local: {url: 'http://127.0.0.1:8000', redaction: false}}\n"
    assert config.load(write(tmp_path, text), environ={}).upstreams["local"].redaction is False


def test_a_tls_dir_sets_every_side_and_what_is_written_out_wins(tmp_path: Path) -> None:
    (tmp_path / "tollway.yaml").write_text(
        "tls: {dir: certs}\nenvoy: {tls: {cert_file: /etc/mine.pem, key_file: /etc/mine-key.pem}}\n"
    )
    cfg = config.load(tmp_path / "tollway.yaml", environ={})
    certs = tmp_path / "certs"
    assert cfg.server.tls is not None and cfg.envoy.extproc_client_tls is not None
    assert cfg.server.tls.cert_file == certs / "tollway.pem"
    assert cfg.server.tls.client_ca_file == certs / "ca.pem"
    assert cfg.server.tls.client_sans == ("envoy",)
    assert cfg.envoy.extproc_client_tls.cert_file == certs / "envoy-client.pem"
    assert cfg.envoy.tls is not None and cfg.envoy.tls.cert_file == Path("/etc/mine.pem")
    # --tls on the command line does the same to a loaded config
    again = config.override(config.load(None, environ={}), {"tls": {"dir": certs}}, "--tls")
    assert again.envoy.tls is not None and again.envoy.tls.key_file == certs / "front-door-key.pem"


def test_client_sans_need_client_certificates() -> None:
    with pytest.raises(ValidationError, match="client_sans needs client_ca_file"):
        config.TLSFiles(cert_file=Path("a"), key_file=Path("b"), client_sans=("envoy",))


def test_the_audit_file_is_a_path_beside_the_config_or_dash_for_stdout(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    file = folder / "tollway.yaml"
    file.write_text("audit: {file: audit/tollway.log}\n")
    assert config.load(file, environ={}).audit.file == folder / "audit/tollway.log"
    file.write_text("audit: {file: '-'}\n")
    assert config.load(file, environ={}).audit.file == config.STDOUT
    assert config.load(None, environ={}).audit.file == config.STDOUT  # on, to stdout
    assert config.load(None, environ={}).audit.enabled
    overridden = config.load(None, environ={"TOLLWAY__AUDIT__FILE": "-"})
    assert overridden.audit.file == config.STDOUT
