"""Typed configuration: the TOML file of docs/contracts.md#configuration and the quick-start flags.

Every limit is a named setting here, with its default and the reason for it next
to the field.  Everything else in backupmx receives the parts it needs as
arguments; nothing reads a global configuration object.

On failure, `load` raises `ConfigError` naming the key (``limits.max_message_size``)
and the problem; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from backupmx.mail.domains import DomainNames, normalize_domain
from backupmx.mail.hosts import HostPort, parse_host_port
from backupmx.mail.networks import parse_networks

DEFAULT_CONFIG_PATH = Path("/etc/backupmx/backupmx.toml")
DEFAULT_DATABASE = "sqlite:///backupmx.db"  # ./backupmx.db, the quick-start default


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class Duration:
    """Marker: a duration such as "30s", "5m", "2h", "5d" (stored as float seconds)."""


class Size:
    """Marker: a size such as "50MiB", "10MB", "65536" (stored as int bytes)."""


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(text: str | int | float) -> float:
    """ "30s" -> 30.0; a bare number means seconds."""
    if isinstance(text, bool):
        raise ValueError("not a duration")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not a duration (use e.g. 30s, 5m, 2h, 5d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(text: str | int) -> int:
    """ "50MiB" -> 52428800; a bare number means bytes."""
    if isinstance(text, bool):
        raise ValueError("not a size")
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"{text!r} is not a size (use e.g. 65536, 10MB, 50MiB)")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 0:
        raise ValueError("a size cannot be negative")
    return value


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Limits:
    # Postfix's message_size_limit is 10 MB, Exim's 50 MB; a backup must not refuse
    # what the primary takes, and bodies are spooled, so a large limit costs no memory.
    max_message_size: Annotated[int, Size] = 50 * 1024**2
    # RFC 5321 §4.5.3.1.8 asks for at least 100; Postfix and OpenSMTPD take 1000.
    max_recipients: int = 1000
    # Postfix's default_process_limit is 100 smtpd processes.
    max_connections: int = 100
    # Postfix's smtpd_client_connection_count_limit (half the process limit).
    max_connections_per_ip: int = 50
    # RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next command.
    command_timeout: Annotated[float, Duration] = 300.0
    # Upper bound on a whole DATA phase (each read is also bounded by command_timeout):
    # stops a client that trickles a byte at a time from holding a slot forever.
    data_timeout: Annotated[float, Duration] = 600.0
    # RFC 5321 §6.3: "at least 100" Received: headers before declaring a loop.
    max_received_headers: int = 100
    # Bare CR or LF in DATA (SMTP smuggling): "normalize" to CRLF as Postfix 3.9
    # does by default, or "reject" with 550 5.6.0 as Exim 4.98 and sendmail 8.18.
    bare_newline: Literal["normalize", "reject"] = "normalize"
    # Postfix's smtpd_hard_error_limit: this many errors in one session closes it.
    max_errors: int = 20
    # On SIGTERM, sessions in DATA may finish for this long before being cut.
    drain_timeout: Annotated[float, Duration] = 30.0
    # Per client IP, over a sliding minute (Postfix's anvil: smtpd_client_message_rate_limit
    # and smtpd_client_recipient_rate_limit, off by default there too: a big provider
    # may send everything through one address while the primary is down).  0: off.
    max_messages_per_minute_per_ip: int = 0  # past it MAIL gets 450 4.7.1
    max_recipients_per_minute_per_ip: int = 0  # past it RCPT gets 450 4.7.1
    # Wait this long before the 220 greeting (postscreen's greet_wait is 6 s); a client
    # that talks before it is an early talker (spamware) and is dropped with 554 5.5.0.
    # 0: greet at once.  At most MAX_BANNER_DELAY: RFC 5321 §4.5.3.2.1 clients wait 5 min.
    banner_delay: Annotated[float, Duration] = 0.0
    # Load balancers listed in `proxy_protocol` must send their PROXY header within this
    # (Postfix's smtpd_upstream_proxy_timeout).
    proxy_timeout: Annotated[float, Duration] = 5.0


@dataclass(frozen=True)
class Delivery:
    port: int = 25  # the primaries' SMTP port (a static primary may name its own)
    # Postfix's minimal/maximal_backoff_time.  Probes, not backoff, decide when a
    # primary that was down is tried again; backoff only paces recipients that a
    # reachable primary deferred.
    retry_min: Annotated[float, Duration] = 300.0
    retry_max: Annotated[float, Duration] = 4000.0
    # Postfix's maximal_queue_lifetime; backup operators often raise it.
    max_queue_lifetime: Annotated[float, Duration] = 5 * 86400.0
    delay_warning: Annotated[float, Duration] = 0.0  # 0: off (Postfix's default)
    probe_interval: Annotated[float, Duration] = 30.0
    # Postfix's default_destination_concurrency_limit is 20 and its initial window
    # 5; a primary that just came back gets a gentler start here.
    max_connections_per_host: int = 20
    initial_connections_per_host: int = 2
    max_messages_per_second_per_host: int = 50  # 0: no rate cap
    messages_per_connection: int = 100  # Postfix's smtp_connection_reuse_count_limit
    connect_timeout: Annotated[float, Duration] = 30.0  # Postfix's smtp_connect_timeout
    # The wait for the 220 greeting once TCP is up: RFC 5321 §4.5.3.2.1 asks for
    # 5 minutes (Postfix's smtp_helo_timeout is 300 s), and a primary just back
    # under load is the one that greets slowly.
    greeting_timeout: Annotated[float, Duration] = 300.0
    command_timeout: Annotated[float, Duration] = 300.0  # Postfix's smtp_*_timeout
    data_timeout: Annotated[float, Duration] = 600.0  # Postfix's smtp_data_done_timeout
    # A node whose heartbeat (every lease/6) is older than this is dead, and any live
    # node sharing the queue gives its recipients back (backupmx.deliver.membership).
    # The same on every node of a cluster.  Read at start-up only.
    lease: Annotated[float, Duration] = 30.0
    tls: Literal["may", "verify"] = "may"  # opportunistic STARTTLS, or a valid certificate
    ca_file: str = ""  # CA bundle for tls = "verify"; empty: the system's
    # Recipients claimed and not yet recorded, per node: the deliverer's whole
    # working set (each claimed message's body is in memory while it is sent).  It
    # bounds memory during a flush, and how much one node takes from a shared queue.
    # These three are read at start-up only.
    max_recipients_in_flight: int = 2000
    # Recipients leased by one claim query, at most; a node claims again once no more
    # than one batch waits for a connection.  Smaller batches leave more of a
    # backlog to the other nodes; larger ones mean fewer queries.
    claim_batch: int = 100
    # How often expiry, delay warnings and the recipient-verification
    # cache's upkeep run.  Expiry and warnings are late by at most this much.
    housekeeping_interval: Annotated[float, Duration] = 60.0


@dataclass(frozen=True)
class Queue:
    # How long the record of a finished message (envelope, each recipient's outcome,
    # no body) stays for `queue list --all` and `queue show`.  Its body goes at once.
    # Postfix keeps nothing but the log; a week answers "what happened to X's mail".
    keep_finished: Annotated[float, Duration] = 7 * 86400.0


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()  # "127.0.0.1:5353"; empty: the system resolver
    timeout: Annotated[float, Duration] = 5.0


@dataclass(frozen=True)
class Tls:
    cert: str = ""  # PEM certificate chain for inbound STARTTLS; empty: no STARTTLS
    key: str = ""  # PEM private key; reloaded with the certificate on SIGHUP


@dataclass(frozen=True)
class Metrics:
    # Prometheus metrics and /healthz, never on the SMTP port.  Loopback by default:
    # the figures name domains and hosts; scrape from elsewhere through a proxy or
    # listen on a private address.  "" turns the endpoint off.  Read at start-up only.
    listen: str = "127.0.0.1:9325"
    # How long a scrape or /healthz waits for the queue database before reporting it
    # unreachable: well under Prometheus' default scrape_timeout of 10 s.
    store_timeout: Annotated[float, Duration] = 5.0
    # STATUS= for systemd (`systemctl status`): the queue size, refreshed this often.
    status_interval: Annotated[float, Duration] = 30.0


SpamAction = Literal["reject", "defer", "tag", "accept"]

# What each backend's own verdict means unless `spamcheck.actions` says otherwise:
# rspamd's actions by name, spamd's and a command's "spam"/"ham".  A backup that
# rejects less than its primary is the way around the primary's filter, and one that
# rejects more loses mail the primary would take: by default only rspamd's own
# "reject" is refused here, everything else is tagged and left to the primary.
DEFAULT_SPAM_ACTIONS: dict[str, SpamAction] = {
    "reject": "reject",
    "soft reject": "defer",
    "rewrite subject": "tag",
    "add header": "tag",
    "greylist": "accept",  # greylisting is [greylist]'s job here, by triplet
    "no action": "accept",
    "spam": "tag",
    "ham": "accept",
}


@dataclass(frozen=True)
class SpamCheck:
    backend: Literal["none", "spamd", "rspamd", "command"] = "none"
    # spamd: "host:port" (spamd's default port is 783) or a Unix socket path;
    # rspamd: its normal worker, "host:port" (11333) or a Unix socket path.
    address: str = ""
    command: tuple[str, ...] = ()  # "command": argv of a program reading the message on stdin
    # The whole check, connect to verdict.  The client waits for our reply after its
    # final dot (RFC 5321 §4.5.3.2.6 gives it 10 min); Postfix's milter_content_timeout
    # is 300 s.  Past it, `on_error` decides.
    timeout: Annotated[float, Duration] = 30.0
    # The checker is down, slow or answers nonsense: "defer" (451 4.7.1: the sender
    # retries, nothing is lost and no spam is let through unchecked) or "accept".
    on_error: Literal["accept", "defer"] = "defer"
    # Larger messages are not checked (verdict "skipped"): spam is small, and spamc's
    # own default limit is 500 KB.
    max_size: Annotated[int, Size] = 1024 * 1024
    # Backend verdict -> action, over DEFAULT_SPAM_ACTIONS.
    actions: dict[str, SpamAction] = field(default_factory=dict)
    # Action -> score at or above which it applies ({reject = 15.0, tag = 5.0}); the
    # stricter of this and the backend's verdict wins.  Empty: the backend's verdict only.
    thresholds: dict[SpamAction, float] = field(default_factory=dict)

    def action_for(self, verdict: str) -> SpamAction:
        return self.actions.get(verdict, DEFAULT_SPAM_ACTIONS.get(verdict, "accept"))


@dataclass(frozen=True)
class Recipients:
    # Postfix's address_verify_positive_expire_time and ..._negative_expire_time.
    verify_positive_ttl: Annotated[float, Duration] = 31 * 86400.0
    verify_negative_ttl: Annotated[float, Duration] = 3 * 86400.0
    # How long a session waits for a callout before the address counts as unverified
    # (the domain's verify_unknown answers); the callout goes on and fills the cache
    # for the sender's retry (Postfix polls 3 x 3 s).
    verify_wait: Annotated[float, Duration] = 6.0
    # Bound on one whole callout: connect, EHLO, MAIL FROM:<>, RCPT, QUIT.
    verify_timeout: Annotated[float, Duration] = 30.0
    # Callouts in flight at once over all sessions: a flood of unknown recipients
    # must not turn into a flood of connections to the primary.
    max_callouts: int = 10
    # After a primary did not answer a callout, its domain gets none for this long;
    # uncached recipients get `verify_unknown` at once instead of waiting again.
    verify_retry: Annotated[float, Duration] = 60.0
    # Directory-harvest protection: after this many unknown recipients (550 5.1.1) in
    # one session, the next RCPT is answered 421 4.7.0 after `harvest_delay`, and the
    # session is closed.
    max_unknown_recipients: int = 5
    harvest_delay: Annotated[float, Duration] = 5.0


@dataclass(frozen=True)
class DnsblZone:
    name: str  # "zen.example.org": the client 192.0.2.1 is looked up as 1.2.0.192.zen…
    weight: float = 1.0  # postscreen_dnsbl_sites' "*weight"
    answers: tuple[str, ...] = ()  # A records that count ("127.0.0.2"); empty: any in 127/8


@dataclass(frozen=True)
class Dnsbl:
    zone: tuple[DnsblZone, ...] = ()  # none: no DNSBL lookups
    # A client whose weights add up to this is refused at RCPT with 550 5.7.1
    # (postscreen_dnsbl_threshold is 1).
    threshold: float = 1.0
    # Lookups start at connect, in parallel, and a zone that has not answered by the
    # first RCPT within this long counts as not listing the client (fail open).
    timeout: Annotated[float, Duration] = 5.0


@dataclass(frozen=True)
class Greylist:
    enabled: bool = False
    # postgrey's defaults: retry no sooner than 5 min, within 2 days; a triplet that
    # passed stays passed for 35 days after it was last seen.
    delay: Annotated[float, Duration] = 300.0
    retry_window: Annotated[float, Duration] = 2 * 86400.0
    pass_ttl: Annotated[float, Duration] = 35 * 86400.0
    # Clients never greylisted (addresses or networks): the primary itself, relays the
    # primary trusts.  The backup must not be the way around the primary's greylisting.
    pass_clients: tuple[str, ...] = ()


@dataclass(frozen=True)
class Domain:
    name: str  # exact name; a leading dot (".example.com") covers its subdomains only
    # Static route, "host[:port]" each; empty means: the domain's MX set from DNS.
    primary: tuple[str, ...] = ()
    # A primary answering 5xx within hold_window after an outage may be one that came
    # back misconfigured: "hold" parks such recipients (visible, releasable).
    on_primary_5xx: Literal["bounce", "hold"] = "bounce"
    hold_window: Annotated[float, Duration] = 3600.0
    tls: Literal["", "may", "verify"] = ""  # "": as delivery.tls
    # Which local parts exist.  "any" accepts them all: mail for unknown users then
    # bounces later, to forged senders (backscatter), so `config check` warns.  "list":
    # the file `recipient_list`; "verify": a callout to the primary, cached.
    recipients: Literal["any", "list", "verify"] = "any"
    # One address or "@domain" (catch-all) per line, "#" comments; compared without
    # regard to case, as Postfix's lookup tables do.  Re-read on SIGHUP and on change.
    recipient_list: str = ""
    # "verify" while the primary cannot answer and nothing is cached: "accept" (Exim's
    # defer_ok: the primary decides at delivery, on_primary_5xx handles a refusal, at
    # the risk of a later bounce, backscatter) or "defer" (450 4.2.1: nothing unknown
    # gets in, but a freshly deployed backup takes almost nothing during the outage it
    # exists for, and senders' retries run out).
    verify_unknown: Literal["defer", "accept"] = "accept"


MAX_RECEIVERS = 64  # receiver processes; each holds an event loop and a database pool


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)  # banner, EHLO, self-detection
    aliases: tuple[str, ...] = ()  # other names of this host in MX records (self-detection)
    listen: tuple[str, ...] = ("0.0.0.0:25", "[::]:25")
    # Receiver processes taking connections on the listen addresses (Postfix runs one
    # smtpd per session; one event loop per core does as much).  0: one per core.
    # Read at start-up only.
    receivers: int = 0
    database: str = DEFAULT_DATABASE  # SQLAlchemy URL; sqlite:/// or postgresql+psycopg://
    # The Unix socket on which `serve` answers `backupmx status` (backupmx.control).
    # "": beside the SQLite queue file (queue.db -> queue.sock), so each queue has its
    # own; with PostgreSQL /run/backupmx/control.sock (the unit's RuntimeDirectory).
    # Read at start-up only.
    control_socket: str = ""
    # Clients (addresses or networks) allowed to ask for a flush with ETRN (RFC 1985),
    # typically the primary itself when it comes back.
    etrn_clients: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    delivery: Delivery = field(default_factory=Delivery)
    queue: Queue = field(default_factory=Queue)
    dns: Dns = field(default_factory=Dns)
    tls: Tls = field(default_factory=Tls)
    spamcheck: SpamCheck = field(default_factory=SpamCheck)
    recipients: Recipients = field(default_factory=Recipients)
    dnsbl: Dnsbl = field(default_factory=Dnsbl)
    greylist: Greylist = field(default_factory=Greylist)
    # Load balancers (addresses or networks) that must open every connection with a
    # PROXY protocol v1 or v2 header naming the real client.  Nobody else may send one.
    proxy_protocol: tuple[str, ...] = ()
    metrics: Metrics = field(default_factory=Metrics)
    # Where mail to the bare ``RCPT TO:<Postmaster>`` goes (RFC 5321 §4.1.1.3: no domain,
    # any case).  An address in a backed-up domain; "": postmaster@ the first exactly-named
    # [[domain]].  Required when every [[domain]] is a ".parent" entry.
    postmaster: str = ""
    domain: tuple[Domain, ...] = ()

    def listen_addresses(self) -> list[HostPort]:
        return [parse_host_port(text) for text in self.listen]

    def receiver_count(self) -> int:
        """`receivers`, with 0 standing for one per core this process may run on."""
        return self.receivers or len(os.sched_getaffinity(0))

    def postmaster_address(self) -> str:
        """The mailbox `<Postmaster>` stands for, its domain in A-labels.  With no
        [[domain]] at all it is postmaster@`hostname`, which the relay check then refuses
        like every recipient (nothing is backed up)."""
        if self.postmaster:
            local, _, domain = self.postmaster.rpartition("@")
            return f"{local}@{normalize_domain(domain)}"
        exact = [d.name for d in self.domain if not d.name.startswith(".")]
        return f"postmaster@{normalize_domain(exact[0] if exact else self.hostname)}"


# --------------------------------------------------------------------------- loading


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the TOML file (if any), apply quick-start overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as file:
                raw = tomllib.load(file)
        except OSError as error:
            raise ConfigError("", f"cannot read {path}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError("", f"{path}: {error}") from error
    for key, value in (overrides or {}).items():
        raw[key] = value
    config: Config = _build(Config, raw, "")
    _validate(config)
    return config


def default_path(explicit: str | None) -> Path | None:
    """--config, else $BACKUPMX_CONFIG, else /etc/backupmx/backupmx.toml if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("BACKUPMX_CONFIG"):
        return Path(os.environ["BACKUPMX_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, "must be a table")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(_join(prefix, unknown[0]), "unknown key")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _convert(hints[name], value, _join(prefix, name))
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_join(prefix, missing[0]), "is required")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    try:
        if origin is Annotated:
            base, marker = typing.get_args(hint)[:2]
            if marker is Duration:
                return parse_duration(value)
            if marker is Size:
                return parse_size(value)
            return _convert(base, value, key)
        if origin is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(map(repr, allowed))}")
            return value
        if origin is tuple:
            item_type = typing.get_args(hint)[0]
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise ValueError("must be a list")
            return tuple(_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
        if dataclasses.is_dataclass(hint):
            return _build(typing.cast(type[Any], hint), value, key)
        if origin is dict:
            value_type = typing.get_args(hint)[1]
            if not isinstance(value, Mapping):
                raise ValueError("must be a table")
            key_type = typing.get_args(hint)[0]
            return {
                _convert(key_type, k, key): _convert(value_type, v, f"{key}.{k}")
                for k, v in value.items()
            }
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("must be a number")
            return float(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("must be a non-negative integer")
            return value
        if hint is str:
            if not isinstance(value, str):
                raise ValueError("must be a string")
            return value
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(key, str(error)) from error
    if isinstance(hint, types.UnionType):
        raise ConfigError(key, "unsupported type")
    raise ConfigError(key, f"unsupported type {hint!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate(config: Config) -> None:
    for i, text in enumerate(config.listen):
        try:
            parse_host_port(text)
        except ValueError as error:
            raise ConfigError(f"listen[{i}]", str(error)) from error
    if not config.listen:
        raise ConfigError("listen", "needs at least one address")
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", config.database):
        raise ConfigError(
            "database", f"{config.database!r} is not a sqlite:// or postgresql:// URL"
        )
    try:
        normalize_domain(config.hostname)
    except ValueError as error:
        raise ConfigError("hostname", str(error)) from error
    seen: set[str] = set()
    for i, domain in enumerate(config.domain):
        key = f"domain[{i}]"
        try:
            # ".example.com" (its subdomains) and "example.com" are two entries.
            name = "." * domain.name.startswith(".") + normalize_domain(
                domain.name.removeprefix(".")
            )
        except ValueError as error:
            raise ConfigError(f"{key}.name", str(error)) from error
        if name in seen:
            raise ConfigError(f"{key}.name", f"{domain.name!r} is listed twice")
        seen.add(name)
        for j, text in enumerate(domain.primary):
            try:
                parse_host_port(text, default_port=25)
            except ValueError as error:
                raise ConfigError(f"{key}.primary[{j}]", str(error)) from error
    _validate_networks("etrn_clients", config.etrn_clients)
    for i, text in enumerate(config.dns.nameservers):
        try:
            parse_host_port(text, default_port=53)
        except ValueError as error:
            raise ConfigError(f"dns.nameservers[{i}]", str(error)) from error
    if config.metrics.listen:
        try:
            metrics_address = parse_host_port(config.metrics.listen)
        except ValueError as error:
            raise ConfigError("metrics.listen", str(error)) from error
        if any(a.port == metrics_address.port for a in config.listen_addresses()):
            raise ConfigError("metrics.listen", "must not share a port with listen")
    if config.metrics.status_interval < 1:
        raise ConfigError("metrics.status_interval", "must be at least 1s")
    if config.delivery.retry_min > config.delivery.retry_max:
        raise ConfigError("delivery.retry_min", "is larger than delivery.retry_max")
    if not 0 <= config.receivers <= MAX_RECEIVERS:
        raise ConfigError("receivers", f"must be 0 (one per core) to {MAX_RECEIVERS}")
    if config.delivery.max_connections_per_host < 1:
        raise ConfigError("delivery.max_connections_per_host", "must be at least 1")
    if config.delivery.max_recipients_in_flight < 1:
        raise ConfigError("delivery.max_recipients_in_flight", "must be at least 1")
    if config.delivery.claim_batch < 1:
        raise ConfigError("delivery.claim_batch", "must be at least 1")
    if config.delivery.lease < 1:
        raise ConfigError("delivery.lease", "must be at least 1s")
    if config.delivery.housekeeping_interval < 1:
        raise ConfigError("delivery.housekeeping_interval", "must be at least 1s")
    if config.queue.keep_finished < 2 * config.delivery.housekeeping_interval:
        # The recipient cache learns from finished records once per housekeeping run.
        raise ConfigError(
            "queue.keep_finished", "must be at least twice delivery.housekeeping_interval"
        )
    limits = config.limits
    if limits.max_recipients < 1:
        raise ConfigError("limits.max_recipients", "must be at least 1")
    if limits.max_message_size < 1024:
        raise ConfigError("limits.max_message_size", "must be at least 1KiB")
    if bool(config.tls.cert) != bool(config.tls.key):
        raise ConfigError("tls.key" if config.tls.cert else "tls.cert", "cert and key go together")
    _validate_postmaster(config)
    _validate_protection(config)


# A dot-atom local part without "%" and "!": the relay check refuses sender-specified
# routing, so a postmaster address with it could never be delivered.
def _validate_networks(key: str, texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        try:
            parse_networks([text])
        except ValueError as error:
            raise ConfigError(f"{key}[{i}]", str(error)) from error


_POSTMASTER_LOCAL = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*")


def _validate_postmaster(config: Config) -> None:
    """The `postmaster` key names a plain mailbox in a domain we back up (mail to
    `<Postmaster>` must never be relayed elsewhere), or there is a default for it."""
    if not config.postmaster:
        if config.domain and all(d.name.startswith(".") for d in config.domain):
            raise ConfigError(
                "postmaster",
                'is required when every [[domain]] is a ".parent" entry'
                " (RFC 5321 §4.5.1: mail to <Postmaster> must go somewhere)",
            )
        return
    local, at, domain = config.postmaster.rpartition("@")
    if not at or not _POSTMASTER_LOCAL.fullmatch(local) or len(local) > 64:
        raise ConfigError(
            "postmaster", f"{config.postmaster!r} is not a mailbox such as admin@example.com"
        )
    try:
        name = normalize_domain(domain)
    except ValueError as error:
        raise ConfigError("postmaster", str(error)) from error
    if not DomainNames((d.name, d) for d in config.domain).covers(name):
        raise ConfigError("postmaster", f"{name} is not a [[domain]] backed up here")


MAX_BANNER_DELAY = 30.0


def _validate_protection(config: Config) -> None:
    """Recipient validation, the spam check and the client checks."""
    for i, domain in enumerate(config.domain):
        if domain.recipients == "list":
            if not domain.recipient_list:
                raise ConfigError(
                    f"domain[{i}].recipient_list", 'is required by recipients = "list"'
                )
            if not os.access(domain.recipient_list, os.R_OK):
                raise ConfigError(
                    f"domain[{i}].recipient_list", f"cannot read {domain.recipient_list}"
                )
    spam = config.spamcheck
    if spam.backend in ("spamd", "rspamd") and not spam.address:
        raise ConfigError("spamcheck.address", f"is required by backend = {spam.backend!r}")
    if spam.backend == "command" and not spam.command:
        raise ConfigError("spamcheck.command", 'is required by backend = "command"')
    if spam.address and not spam.address.startswith("/"):
        try:
            parse_host_port(spam.address)
        except ValueError as error:
            raise ConfigError("spamcheck.address", str(error)) from error
    if config.limits.banner_delay > MAX_BANNER_DELAY:
        raise ConfigError("limits.banner_delay", f"must be at most {MAX_BANNER_DELAY:.0f}s")
    _validate_networks("proxy_protocol", config.proxy_protocol)
    _validate_networks("greylist.pass_clients", config.greylist.pass_clients)
    for i, zone in enumerate(config.dnsbl.zone):
        try:
            normalize_domain(zone.name)
        except ValueError as error:
            raise ConfigError(f"dnsbl.zone[{i}].name", str(error)) from error
        for j, answer in enumerate(zone.answers):
            try:
                ipaddress.IPv4Address(answer)
            except ValueError as error:
                raise ConfigError(f"dnsbl.zone[{i}].answers[{j}]", str(error)) from error
    if config.recipients.max_callouts < 1:
        raise ConfigError("recipients.max_callouts", "must be at least 1")


def warnings(config: Config) -> list[str]:
    """What `config check` points out without refusing the file."""
    found = []
    if not config.domain:
        found.append("no [[domain]]: nothing is backed up, every recipient is refused (550 5.7.1)")
    for i, domain in enumerate(config.domain):
        if domain.recipients == "any":
            found.append(
                f'domain[{i}] ({domain.name}): recipients = "any" accepts every local part;'
                " mail for unknown users will bounce later, to forged senders (backscatter)."
                ' Use "list", or "verify" (which still accepts unknown addresses while the'
                ' primary cannot be asked, unless verify_unknown = "defer").'
            )
    return found
