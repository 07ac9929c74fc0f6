"""The `tollway` command."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, audit, config, keys, logs
from .config import LongContextPrice, ModelPrice, Rates

if TYPE_CHECKING:
    from .limits.spend import Period, Subject

CONFIG_ENV = "TOLLWAY_CONFIG"


def _load(path: Path | None) -> config.Config:
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    return config.load(path)


def _keys_file(args: argparse.Namespace) -> Path:
    path = Path(args.keys_file).absolute() if args.keys_file is not None else None
    path = path or _load(args.config).auth.keys_file
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    cfg = _load(args.config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from . import up

    cfg = _load(args.config)
    if args.tls or args.tls_dir is not None:
        tls_dir = (args.tls_dir or Path("tls")).absolute()
        missing = [p for p in up.tls_files(tls_dir) if not p.is_file()]
        if missing:
            print(
                f"tollway up: no certificates in {tls_dir} ({missing[0].name} is missing): "
                f"make them with `tollway certs --dir {args.tls_dir or 'tls'}`",
                file=sys.stderr,
            )
            return 2
        cfg = config.override(cfg, {"tls": {"dir": tls_dir}}, "--tls")
    if args.port is not None:
        cfg = cfg.model_copy(update={"envoy": cfg.envoy.model_copy(update={"port": args.port})})
    if args.replicas is not None:
        cfg = config.override(cfg, {"server": {"replicas": args.replicas}}, "--replicas")
    return up.run(cfg, demo=args.demo, log_format=args.log_format)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Everything `tollway serve` checks at start-up (the same code): refusals are errors
    (exit 2, through main), a missing provider key is a warning."""
    from .server import preflight

    cfg = config.load(Path(args.file))
    ready = preflight(cfg)
    limited = sum(r.limits != keys.NO_LIMITS and r.revoked is None for r in ready.runtime.auth.keys)
    unshared = config.replicas_need_shared_store(cfg, limited)  # what `tollway up` refuses
    if unshared is not None:
        raise config.ConfigError(f"{args.file}: {unshared}")
    # The Runtime has logged each missing provider key as a warning, as serve does.
    keys_loaded = len(ready.runtime.auth.keys)
    warnings = len(ready.missing_provider_keys)
    print(
        f"{args.file}: ok ({len(cfg.upstreams)} upstreams, {keys_loaded} keys "
        f"in {cfg.auth.keys_file}, {warnings} warning{'s' if warnings != 1 else ''})"
    )
    return 0


def cmd_render_envoy(args: argparse.Namespace) -> int:
    from . import envoyconf

    text = envoyconf.render_yaml(_load(args.config))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


# The limit options of `keys create` and `keys limits`: flag, KeyLimits field, help.
_LIMIT_OPTIONS = (
    ("--rpm", "rpm", "requests a minute"),
    ("--tpm", "tpm", "tokens a minute"),
    ("--concurrency", "concurrency", "requests in flight at once"),
)


def _limit_options(sp: argparse.ArgumentParser, clear: str) -> None:
    for flag, _field, help_ in _LIMIT_OPTIONS:
        sp.add_argument(flag, metavar="N", help=f"{help_}, a positive integer{clear}")
    sp.add_argument(
        "--budget-usd",
        metavar="AMOUNT[/day|/month]",
        help=f"spending budget in US dollars a day or a month (default: month){clear}",
    )


def _limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The KeyLimits fields the options given set; ``none`` sets a field to None."""
    changes: dict[str, Any] = {
        field: keys.parse_count(text, flag)
        for flag, field, _help in _LIMIT_OPTIONS
        if (text := getattr(args, field)) is not None
    }
    if args.budget_usd is not None:
        budget = keys.parse_budget(args.budget_usd, "--budget-usd")
        changes["budget_usd"], changes["budget_period"] = budget or (None, None)
    return changes


def _limits_text(limits: keys.KeyLimits) -> str:
    """As the options spell them: what `keys list` shows is what one would type."""
    parts = [
        f"{field}={value}"
        for _flag, field, _help in _LIMIT_OPTIONS
        if (value := getattr(limits, field)) is not None
    ]
    if limits.budget_usd is not None:
        parts.append(f"budget-usd={keys.amount_text(limits.budget_usd)}/{limits.budget_period}")
    return " ".join(parts) or "-"


def _keys_audit(args: argparse.Namespace) -> audit.AuditLog | None:
    """The audit log a keys command appends to, opened before anything changes: a
    change is never made unaudited. With ``audit.file: "-"`` it is stderr (stdout
    carries the new key)."""
    cfg = _load(args.config)
    try:
        return audit.open_log(cfg.audit, threaded=False, stdout_fd=2)
    except OSError as exc:
        why = f"audit.file: {cfg.audit.file}: cannot open: {exc}; nothing changed"
        raise ValueError(why) from None


_NOT_OPTIONS = frozenset({"func", "command", "keys_command"})


def _audit_keys(
    log: audit.AuditLog | None, args: argparse.Namespace, event: str, changed: list[keys.KeyRecord]
) -> None:
    """One line per key changed: by whom, the command and its options (a value shaped
    like a key keeps only its id), and the key's public id."""
    if log is None:
        return
    options = {
        name: audit.public(str(value) if isinstance(value, Path) else value)
        for name, value in vars(args).items()
        if name not in _NOT_OPTIONS and value is not None
    }
    by = audit.operator()
    for record in changed:
        log.event(
            event,
            by=by,
            command=f"keys {args.keys_command}",
            options=options,
            key_id=record.id,
            key_name=record.name,
            tenant=record.tenant,
        )
    log.close()


def cmd_keys_create(args: argparse.Namespace) -> int:
    expires = keys.parse_expiry(args.expires) if args.expires else None
    if expires is not None and expires <= datetime.now(UTC):
        raise ValueError("--expires is in the past")
    models = None
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise ValueError("--models names no model; leave it out for a key that may use any")
    limits = keys.KeyLimits(**_limit_changes(args))
    if args.redaction is not None:
        _known_policy(args, args.redaction)
    roles = [r.strip() for r in (args.roles or "").split(",") if r.strip()]
    if roles:
        known = _load(args.config).roles
        unknown = [r for r in roles if r not in known]
        if unknown:
            raise ValueError(
                f"--roles: {', '.join(unknown)} not in roles ({', '.join(known) or 'none'})"
            )
    key, record = keys.generate(
        name=args.name,
        tenant=args.tenant,
        models=models or (),
        expires=expires,
        limits=limits,
        redaction=args.redaction,
        roles=roles,
    )
    path = _keys_file(args)
    log = _keys_audit(args)
    same_name = [r.id for r in keys.read_records(path) if r.name == args.name and r.active()]
    keys.add(path, record)
    _audit_keys(log, args, "key_created", [record])
    print(key)
    print(
        f"created key {record.id} ({record.name}, tenant {record.tenant}) in {path}; "
        "the key is shown only now",
        file=sys.stderr,
    )
    if same_name:
        print(
            f"warning: {len(same_name)} other active key(s) named {args.name!r} "
            f"({', '.join(same_name)}): revoke by id (tollway keys revoke ID)",
            file=sys.stderr,
        )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    header = ("ID", "NAME", "TENANT", "STATE", "EXPIRES (UTC)", "MODELS", "ROLES", "REDACTION")
    rows = [(*header, "LIMITS")]
    for r in keys.read_records(_keys_file(args)):
        state = "revoked" if r.revoked else "active" if r.active(now) else "expired"
        expires = r.expires.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if r.expires else "-"
        models = ",".join(r.models) or "*"
        policy = r.redaction or "-"
        roles = ",".join(r.roles) or "-"
        rows.append(
            (r.id, r.name, r.tenant, state, expires, models, roles, policy, _limits_text(r.limits))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    return 0


def _report(changed: list[keys.KeyRecord], key: str, line: Callable[[keys.KeyRecord], str]) -> int:
    if not changed:
        print(f"no active key with id or name {key!r}", file=sys.stderr)
        return 1
    for r in changed:
        print(line(r))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    path, log = _keys_file(args), _keys_audit(args)
    try:
        changed = keys.revoke(path, args.key)
    except keys.AmbiguousName as exc:
        raise ValueError(f"{exc}; revoke one by id (tollway keys revoke ID)") from None
    _audit_keys(log, args, "key_revoked", changed)
    return _report(changed, args.key, lambda r: f"revoked {r.id} ({r.name})")


def cmd_keys_limits(args: argparse.Namespace) -> int:
    changes = _limit_changes(args)
    if not changes:
        raise ValueError("give a limit to set or clear: --rpm, --tpm, --concurrency, --budget-usd")
    path, log = _keys_file(args), _keys_audit(args)
    try:
        changed = keys.set_limits(path, args.key, lambda limits: replace(limits, **changes))
    except keys.AmbiguousName as exc:
        raise ValueError(f"{exc}; pick one by id (tollway keys limits ID ...)") from None
    _audit_keys(log, args, "key_changed", changed)
    return _report(changed, args.key, lambda r: f"{r.id} ({r.name}): {_limits_text(r.limits)}")


def _known_policy(args: argparse.Namespace, name: str) -> None:
    policies = _load(args.config).redaction_policies
    if name not in policies:
        known = ", ".join(sorted(policies)) or "none are configured"
        raise ValueError(f"--redaction {name!r}: not in redaction_policies ({known})")


def cmd_keys_redaction(args: argparse.Namespace) -> int:
    policy = None if args.policy == "none" else args.policy
    if policy is not None:
        _known_policy(args, policy)
    path, log = _keys_file(args), _keys_audit(args)
    try:
        changed = keys.set_redaction(path, args.key, policy)
    except keys.AmbiguousName as exc:
        raise ValueError(f"{exc}; pick one by id (tollway keys redaction ID ...)") from None
    _audit_keys(log, args, "key_changed", changed)
    return _report(changed, args.key, lambda r: f"{r.id} ({r.name}): redaction {args.policy}")


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


_RATE_NAMES = {
    "input": "input",
    "output": "output",
    "cached_input": "cached input",
    "cache_write": "cache write",
    "cache_write_1h": "cache write 1h",
    "reasoning": "reasoning",
    "input_audio": "audio input",
    "input_image": "image input",
    "input_video": "video input",
    "cached_input_audio": "cached audio input",
    "cached_input_image": "cached image input",
    "output_audio": "audio output",
    "output_image": "image output",
}


def _threshold(tokens: int) -> str:
    return f">{tokens // 1000}k" if tokens % 1000 == 0 else f">{tokens}"


def _price_columns(price: ModelPrice) -> list[tuple[str, Rates]]:
    """(heading, rates) of each tier that prices the model: standard, long context, service."""
    columns: list[tuple[str, Rates]] = []
    for name, tier in (("standard", price), *price.service_tiers.items()):
        columns.append((name, tier))
        if tier.long_context is not None:
            columns.append((f"{name} {_threshold(tier.long_context.threshold)}", tier.long_context))
    return columns


def _print_price(model: str, name: str, price: ModelPrice) -> None:
    print(f"{model}: {name} (input {_usd(price.input)}, output {_usd(price.output)})")
    print(f"  source: {price.source or '-'}; provider: {price.provider or '-'}")
    if price.aliases:
        print(f"  aliases: {', '.join(price.aliases)}")
    columns = _price_columns(price)
    rates = [
        (label, [getattr(tier, field) for _, tier in columns])
        for field, label in _RATE_NAMES.items()
        if any(getattr(tier, field) is not None for _, tier in columns)
    ]
    widths = [max(len(heading), 6) for heading, _ in columns]
    first = max(len("USD per 1M tokens"), *(len(label) for label, _ in rates))
    print(
        "  "
        + "  ".join(
            [f"{'USD per 1M tokens':<{first}}", *map(str.rjust, [h for h, _ in columns], widths)]
        )
    )
    for label, values in rates:
        cells = [_usd(v).rjust(w) for v, w in zip(values, widths, strict=True)]
        print("  " + "  ".join([f"{label:<{first}}", *cells]))
    thresholds = sorted({t.threshold for _, t in columns if isinstance(t, LongContextPrice)})
    for threshold in thresholds:
        print(
            f"  {_threshold(threshold)}: above {threshold:,} input tokens, "
            "the whole request at these rates"
        )
    if any(v is None for _, values in rates for v in values):
        print("  -: at the rate it is a part of (cached audio: cached, cached: input...)")


def cmd_prices(args: argparse.Namespace) -> int:
    from .pricing import load_prices

    if args.update_from is not None:
        from .pricing.update import SHIPPED_TABLE, update_table

        if args.models:
            raise ValueError("--update-from writes a table: name no models with it")
        output = args.output or SHIPPED_TABLE
        skipped: list[str] = []
        models = update_table(args.update_from, output, args.litellm_version, skipped=skipped)
        print(f"wrote {len(models)} models to {output} (LiteLLM {args.litellm_version})")
        for name in skipped:
            print(
                f"note: overrides.yaml corrects {name}, not in the file: left out", file=sys.stderr
            )
        return 0
    if args.output is not None:
        raise ValueError("--output is the table --update-from writes")
    table = load_prices(_load(args.config).pricing)
    if args.models:  # how names as upstreams send them resolve
        missing = 0
        for model in args.models:
            found = table.lookup(model)
            if found is None:
                missing += 1
                print(f"{model}: not priced (cost 0, metrics label 'other')")
            else:
                _print_price(model, *found)
        return 1 if missing else 0
    version = f" from LiteLLM {table.litellm_version}" if table.litellm_version else ""
    print(f"USD per 1M tokens; price table last updated {table.last_updated}{version}")
    columns = ("MODEL", "PROVIDER", "INPUT", "OUTPUT", "CACHED", "CACHE_WRITE", "LONG_CONTEXT")
    width = min(max((len(name) for name in table.models), default=5), 44)  # longer: pushed
    row = f"{{:<{width}}}  {{:<9}}  {{:>8}}  {{:>8}}  {{:>8}}  {{:>11}}  {{:<16}}  {{}}"
    print(row.format(*columns, "TIERS").rstrip())
    for name, p in sorted(table.models.items()):
        long = p.long_context
        tier = (
            f"{_threshold(long.threshold)}: {_usd(long.input)}/{_usd(long.output)}" if long else "-"
        )
        cells = (_usd(p.input), _usd(p.output), _usd(p.cached_input), _usd(p.cache_write))
        tiers = ",".join(p.service_tiers) or "-"
        print(row.format(name, p.provider or "-", *cells, tier, tiers))
    return 0


class _Unanswered(Exception):
    """Where spend is kept did not answer (exit 1, the message says where it asked)."""


def _spend_subject(args: argparse.Namespace, keys_file: Path) -> Subject:
    from .limits import spend

    records = keys.read_records(keys_file)
    if args.key is not None:
        try:
            record = keys.resolve(records, args.key)
        except keys.AmbiguousName as exc:
            raise ValueError(f"{exc}; pick one by id (tollway spend --key ID)") from None
        if record is None:
            raise _Unanswered(f"no key with id or name {args.key!r} in {keys_file}")
        return spend.Subject("key", record)
    subject = spend.find_subject(records, spend.Query(tenant=args.tenant))
    if subject is None:
        raise _Unanswered(f"no key in {keys_file} has tenant {args.tenant!r}")
    return subject


def _spend_from_server(
    cfg: config.Config, subject: Subject, period: Period | None
) -> dict[str, Any]:
    """The counters live in `tollway serve`: ask it on its loopback metrics port."""
    import json
    import urllib.error
    import urllib.request

    from .metrics_http import SPEND_PATH

    metrics = cfg.metrics
    if not metrics.enabled or not metrics.port:
        raise _Unanswered(
            "the limits store is the server's own (no store.redis), and its metrics port "
            "is off or not fixed (metrics.enabled, metrics.port): nothing to ask"
        )
    # A wildcard bind is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(
        metrics.address, metrics.address
    )
    base = f"http://{f'[{host}]' if ':' in host else host}:{metrics.port}"
    url = f"{base}{SPEND_PATH}?{subject.query(period)}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via *_PROXY
    try:
        with direct.open(url, timeout=10) as response:
            found: dict[str, Any] = json.loads(response.read())
            return found
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise _Unanswered(f"{base}{SPEND_PATH}: {exc.code} {reason}") from None
    except OSError as exc:
        why = getattr(exc, "reason", exc)
        raise _Unanswered(
            f"cannot reach the server's metrics port at {base} ({why}): is `tollway serve` "
            "running with this config?"
        ) from None


async def _spend_from_redis(
    cfg: config.Config, subject: Subject, period: Period | None
) -> dict[str, Any]:
    """Every replica shares Redis: read it directly, with the server's keys and rules."""
    import time

    from .limits import spend
    from .limits.backend import redis_quota
    from .limits.quota import Keys, StoreUnavailable
    from .limits.redis_store import redact_url
    from .limits.rules import RuleSet

    redis = cfg.store.redis
    assert redis is not None
    # A command may wait longer than a request: its first call also connects.
    quota = redis_quota(redis.model_copy(update={"timeout_ms": max(redis.timeout_ms, 2000)}))
    try:
        return await spend.spend(
            quota, RuleSet(cfg.limits), Keys(redis.hash_tag), subject, time.time(), period
        )
    except StoreUnavailable as exc:
        raise _Unanswered(
            f"Redis at {redact_url(redis.url)} did not answer ({exc.reason})"
        ) from None
    finally:
        await quota.aclose()


def _dollars(text: str) -> str:
    """ "5.000000" as $5.00, "0.001234" as $0.001234: exact, no trailing zeros past cents."""
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.rstrip('0').ljust(2, '0')}"


def _duration(seconds: float) -> str:
    """The two largest units: 26d 13h, 13h 48m, 3m 20s, 45s."""
    left = math.ceil(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return " ".join(parts[:2])


def _spend_table(report: dict[str, Any]) -> list[str]:
    key = report["key"]
    if key is not None:
        title = f"key {key['id']} ({key['name']}, tenant {key['tenant']})"
    elif report["tenant"] is not None:
        title = f"tenant {report['tenant']}"
    else:
        title = "rules for all requests"
    lines = [f"{title} at {report['at']}"]
    if not report["limits"]:
        lines.append("no limit counts it (rules by key, tenant, or none; see README, Spend)")
        return lines
    rows = [("RULE", "SCOPE", "KIND", "WINDOW", "USED", "LIMIT", "REMAINING", "RESETS IN")]
    for r in report["limits"]:
        if r["kind"] == "budget":
            amounts = (
                _dollars(r["used_usd"]),
                _dollars(r["limit_usd"]),
                _dollars(r["remaining_usd"]),
            )
        else:
            per = f"/{r['per']}" if r["per"] else ""
            amounts = (str(r["used"]), f"{r['limit']}{per}", str(r["remaining"]))
        name = r["rule"] + (" (shadow)" if r["shadow"] else "")
        rows.append(
            (name, r["scope"], r["kind"], r["window"] or "-", *amounts, _duration(r["reset_s"]))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {4, 5, 6}  # amounts line up on the right
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def cmd_spend(args: argparse.Namespace) -> int:
    import json

    cfg = _load(args.config)
    keys_file = Path(args.keys_file).absolute() if args.keys_file else cfg.auth.keys_file
    try:
        if args.key is None and args.tenant is None:
            from .limits.spend import Subject

            subject = Subject("all")
        else:
            subject = _spend_subject(args, keys_file)
        if cfg.store.redis is not None:
            report = asyncio.run(_spend_from_redis(cfg, subject, args.period))
        else:
            report = _spend_from_server(cfg, subject, args.period)
    except _Unanswered as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(_spend_table(report)))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from . import certs

    hosts = args.hosts or list(certs.FRONT_DOOR_HOSTS)
    tollway_hosts = [*certs.TOLLWAY_HOSTS, *(args.tollway_hosts or ())]
    had_ca = certs.files(args.dir, certs.CA).cert.exists()
    written = certs.make(args.dir, hosts, tollway_hosts)
    for path in written:
        print(path)
    ca = certs.files(args.dir, certs.CA).cert
    print(
        f"{'kept the CA in' if had_ca else 'a new CA:'} {ca} (clients trust this file)\n"
        f"front door: {', '.join(hosts)}; Tollway: {', '.join(tollway_hosts)}; "
        f"Envoy's client certificate: {certs.ENVOY_NAME}\n"
        f"use them: tollway up --tls --tls-dir {args.dir}, "
        f"or `tls: {{dir: {args.dir}}}` in the config",
        file=sys.stderr,
    )
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from . import demo_upstream

    demo_upstream.run(args.host, args.port, args.provider_key)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tollway",
        description=(
            "Auth, limits, redaction and cost metering for LLM APIs, as an Envoy ext_proc server."
        ),
    )
    p.add_argument("--version", action="version", version=f"tollway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    def config_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            "-c",
            type=Path,
            help=f"YAML config file (default: ${CONFIG_ENV} or built-in defaults)",
        )

    def log_format_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-format",
            choices=logs.FORMATS,
            default="text",
            help="Tollway's own log lines on stderr: text, or JSON lines (default: text)",
        )

    s = add("serve", "run the ext_proc gRPC server that Envoy calls")
    config_option(s)
    log_format_option(s)
    s.set_defaults(func=cmd_serve)

    s = add("up", "run the whole front door locally: Envoy + Tollway (Ctrl-C stops both)")
    config_option(s)
    s.add_argument(
        "--demo",
        action="store_true",
        help="also run a built-in demo upstream and create a demo key (no network)",
    )
    s.add_argument("--port", type=int, help="front door port (default: envoy.port, 8080)")
    s.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help=f"tollway serve processes behind Envoy, 1 to {config.MAX_REPLICAS} "
        "(default: server.replicas, 1)",
    )
    s.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS front door and mTLS to Tollway, with the certificates of `tollway certs`",
    )
    s.add_argument(
        "--tls-dir", type=Path, metavar="DIR", help="where those certificates are (default: ./tls)"
    )
    log_format_option(s)
    s.set_defaults(func=cmd_up)

    s = add("certs", "make a local CA and the certificates for `tollway up --tls` (files 0600)")
    s.add_argument("--dir", type=Path, default=Path("tls"), help="where to write (default: ./tls)")
    s.add_argument(
        "--hosts",
        nargs="+",
        metavar="HOST",
        help="names and addresses clients use for the front door (default: localhost 127.0.0.1)",
    )
    s.add_argument(
        "--tollway-hosts",
        nargs="+",
        metavar="HOST",
        help="more names Envoy dials Tollway by (always: tollway localhost 127.0.0.1)",
    )
    s.set_defaults(func=cmd_certs)

    s = add(
        "check-config",
        "check a config as serve does at start-up: keys, prices, TLS and provider key files",
    )
    s.add_argument("file")
    s.set_defaults(func=cmd_check_config)

    s = add("render-envoy", "print the Envoy front-door config for a Tollway config")
    config_option(s)
    s.add_argument("--output", "-o", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_render_envoy)

    k = add("keys", "create, list and revoke Tollway API keys, and set their limits")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def keys_parser(name: str, help_: str) -> argparse.ArgumentParser:
        sp = ksub.add_parser(name, help=help_, description=help_)
        config_option(sp)
        sp.add_argument("--keys-file", help="keys file (default: auth.keys_file of the config)")
        return sp

    s = keys_parser("create", "create a key and print it once (only its hash is stored)")
    s.add_argument("--name", required=True, help="who or what the key is for")
    s.add_argument("--tenant", default="default", help="tenant for metering (default: default)")
    s.add_argument("--models", help="comma-separated model allowlist; * wildcards allowed")
    s.add_argument("--expires", help="expiry: YYYY-MM-DD (end of day UTC) or ISO 8601 time")
    _limit_options(s, "")
    s.add_argument("--redaction", metavar="POLICY", help="a policy of redaction_policies")
    s.add_argument(
        "--roles", metavar="ROLE,...", help="roles of the config's roles: what it may do"
    )
    s.set_defaults(func=cmd_keys_create)
    s = keys_parser("list", "list keys (ids, names, states; never secrets)")
    s.set_defaults(func=cmd_keys_list)
    s = keys_parser("revoke", "revoke keys by id or name (takes effect within a second)")
    s.add_argument("key", help="key id or name")
    s.set_defaults(func=cmd_keys_revoke)
    s = keys_parser(
        "limits", "set or clear a key's own limits by id or name (takes effect within a second)"
    )
    s.add_argument("key", help="key id or name")
    _limit_options(s, "; none clears it")
    s.set_defaults(func=cmd_keys_limits)
    s = keys_parser(
        "redaction",
        "give a key a redaction policy by id or name, or none for its tenant's or the default",
    )
    s.add_argument("key", help="key id or name")
    s.add_argument("policy", help="a policy of redaction_policies, or none")
    s.set_defaults(func=cmd_keys_redaction)

    s = add(
        "spend",
        "a key's or a tenant's spend, remaining budget and limit usage "
        "(from Redis, or from the running server's metrics port)",
    )
    config_option(s)
    s.add_argument("--keys-file", help="keys file (default: auth.keys_file of the config)")
    who = s.add_mutually_exclusive_group()
    who.add_argument("--key", metavar="ID|NAME", help="a key, by id or name")
    who.add_argument("--tenant", help="a tenant (default, neither: the rules for all requests)")
    s.add_argument(
        "--period", choices=("day", "month"), help="only budgets of this window (default: all)"
    )
    s.add_argument("--json", action="store_true", help="the report as JSON, for scripts")
    s.set_defaults(func=cmd_spend)

    s = add(
        "prices",
        "list the price table, show a model's every price as its name resolves, "
        "or regenerate a table from LiteLLM's price map",
    )
    config_option(s)
    s.add_argument("models", nargs="*", help="model names as upstreams report them")
    s.add_argument(
        "--update-from",
        type=Path,
        metavar="FILE",
        help="write a price table from LiteLLM's model_prices_and_context_window.json "
        "and Tollway's overrides (scripts/update-prices fetches the file)",
    )
    s.add_argument(
        "--output",
        type=Path,
        metavar="PATH",
        help="where --update-from writes (default: the package's shipped prices.yaml); "
        "point pricing.table_file at it",
    )
    s.add_argument(
        "--litellm-version",
        default="unknown",
        metavar="VERSION",
        help="the litellm release the file came from, recorded in the table",
    )
    s.set_defaults(func=cmd_prices)

    s = add("demo-upstream", "run the built-in demo LLM upstream (OpenAI/Anthropic/Gemini)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8081)
    s.add_argument("--provider-key", help="key the demo upstream requires from the gateway")
    s.set_defaults(func=cmd_demo_upstream)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(getattr(args, "log_format", "text"))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a broken pipe shows here, not in the flush at exit
        return code
    except BrokenPipeError:  # `tollway prices | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 0
    except (config.ConfigError, keys.KeysFileError, ValueError, OSError) as exc:
        print(f"tollway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
