"""Configuration: typed values, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupmx.config import ConfigError, load, parse_duration, parse_size
from backupmx.mail.hosts import parse_host_port


def test_durations_and_sizes() -> None:
    assert (
        parse_duration("30s") == 30
        and parse_duration("5m") == 300
        and parse_duration("5d") == 432000
    )
    assert (
        parse_size("50MiB") == 50 * 1024**2
        and parse_size("10MB") == 10**7
        and parse_size(65536) == 65536
    )


def test_host_port_forms() -> None:
    assert str(parse_host_port("[::1]:25")) == "[::1]:25"
    assert parse_host_port("mx1.example.test", default_port=25).port == 25


def test_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'hostname = "mx2.example.net"\nlisten = ["127.0.0.1:2525"]\n'
        '[limits]\nmax_message_size = "20MiB"\ncommand_timeout = "1m"\n'
        '[[domain]]\nname = "example.com"\nprimary = ["10.0.0.5:2525"]\n'
    )
    config = load(path, {"database": "sqlite:///x.db"})
    assert config.limits.max_message_size == 20 * 1024**2
    assert config.limits.command_timeout == 60
    assert config.domain[0].primary == ("10.0.0.5:2525",)
    assert config.database == "sqlite:///x.db"
    assert config.limits.max_recipients == 1000  # default


DOMAIN_TABLE = '[[domain]]\nname = "example.test"\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1", "bogus"),
        ('[limits]\nmax_message_size = "10XB"', "limits.max_message_size"),
        ('[limits]\ncommand_timeout = "soon"', "limits.command_timeout"),
        ('listen = ["127.0.0.1"]', "listen[0]"),
        ('[limits]\nbare_newline = "ignore"', "limits.bare_newline"),
        ('[[domain]]\nname = "bad domain"', "domain[0].name"),
        ('[[domain]]\nname = "a.test"\nprimary = ["host:99999"]', "domain[0].primary[0]"),
        ('[[domain]]\nprimary = ["host"]', "domain[0].name"),
        ('database = "mysql://x"', "database"),
        (f'{DOMAIN_TABLE}recipients = "list"', "domain[0].recipient_list"),
        (
            f'{DOMAIN_TABLE}recipients = "list"\nrecipient_list = "/nonexistent/list.txt"',
            "domain[0].recipient_list",
        ),
        (f'{DOMAIN_TABLE}recipients = "some"', "domain[0].recipients"),
        (f'{DOMAIN_TABLE}verify_unknown = "maybe"', "domain[0].verify_unknown"),
        ('[spamcheck]\nbackend = "spamd"', "spamcheck.address"),
        ('[spamcheck]\nbackend = "command"', "spamcheck.command"),
        ('[spamcheck]\nbackend = "rspamd"\naddress = "localhost"', "spamcheck.address"),
        ('[spamcheck]\non_error = "drop"', "spamcheck.on_error"),
        ('[queue]\nkeep_finished = "1m"', "queue.keep_finished"),
        ('[queue]\nkeep_finished = "soon"', "queue.keep_finished"),
        ('[spamcheck]\nactions = { spam = "bounce" }', "spamcheck.actions.spam"),
        ("[spamcheck]\nthresholds = { quarantine = 5.0 }", "spamcheck.thresholds"),
        ('[spamcheck]\nthresholds = { reject = "high" }', "spamcheck.thresholds.reject"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load(path)
    assert error.value.key == key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DOMAIN_TABLE, "postmaster@example.test"),
        (
            '[[domain]]\nname = ".sub.test"\n[[domain]]\nname = "Bücher.test"\n'
            '[[domain]]\nname = "other.test"\n',
            "postmaster@xn--bcher-kva.test",  # the first exactly-named domain, A-labels
        ),
        ('postmaster = "ops@EXAMPLE.test"\n' + DOMAIN_TABLE, "ops@example.test"),
        ('postmaster = "hostmaster@a.sub.test"\n[[domain]]\nname = ".sub.test"\n',
         "hostmaster@a.sub.test"),
        # Nothing backed up: postmaster@ this host, which the relay check refuses like
        # every recipient.
        ('hostname = "mx2.example.net"\n', "postmaster@mx2.example.net"),
    ],
)  # fmt: skip
def test_bare_postmaster_goes_to_the_postmaster_key_else_the_first_exact_domain(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load(path).postmaster_address() == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[domain]]\nname = ".sub.test"\n', 'is required when every [[domain]] is a ".parent"'),
        ('postmaster = "nobody"\n' + DOMAIN_TABLE, "is not a mailbox"),
        ('postmaster = "a%b@example.test"\n' + DOMAIN_TABLE, "is not a mailbox"),
        ('postmaster = "host!a@example.test"\n' + DOMAIN_TABLE, "is not a mailbox"),
        ("postmaster = '\"a b\"@example.test'\n" + DOMAIN_TABLE, "is not a mailbox"),
        ('postmaster = "pm@[127.0.0.1]"\n' + DOMAIN_TABLE, "is not a domain name"),
        ('postmaster = "pm@other.test"\n' + DOMAIN_TABLE, "other.test is not a [[domain]]"),
        ('postmaster = "pm@sub.test"\n[[domain]]\nname = ".sub.test"\n', "sub.test is not"),
        ('postmaster = "pm@example.test"\n', "example.test is not a [[domain]] backed up"),
    ],
)
def test_postmaster_key_must_be_a_plain_mailbox_in_a_backed_up_domain(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert error.value.key == "postmaster"
    assert problem in error.value.problem, error.value.problem


def test_finished_records_are_kept_a_week_by_default_and_as_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("")
    assert load(path).queue.keep_finished == 7 * 86400
    path.write_text('[queue]\nkeep_finished = "2h"\n')
    assert load(path).queue.keep_finished == 7200
