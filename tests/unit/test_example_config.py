"""deploy/backupmx.toml shows every setting of backupmx/config.py, with its default.

The example is written the way Postfix documents main.cf: a setting left at its
default is a comment ``# key = default`` (a ``#``, one space, the key), under the
table it belongs to, in the order of config.py's dataclasses.  An active line
that sets something else says the default in its comment (``# default: "5d"``).
Array tables given only as an example are commented headers (``# [[dnsbl.zone]]``).
Prose is any other comment; a comment that quotes another value indents it
(``#   database = "postgresql://…"``), so it is not taken for a default.

The settings are read from config.py's dataclasses, recursively (sections, the
``[[domain]]`` entries, the ``[[dnsbl.zone]]`` entries), so a key added there
without a line here fails `test_example_config_shows_every_setting`.  The file must
load as shipped, and again with every commented line made active (the examples are
valid and the defaults are defaults).  That `config check` approves it as installed
is tests/integration/test_deploy.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from backupmx import config as configuration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "backupmx.toml"

HEADER = re.compile(r"^(# )?(\[\[?)([a-z0-9_.]+)\]\]?\s*$")
SETTING = re.compile(r"^(# )?([a-z_][a-z0-9_]*) = (.*)$")
# Defaults that depend on the machine, and how the example says them.
MACHINE_DEFAULTS = {"hostname": "the machine's FQDN"}


@dataclass(frozen=True)
class Setting:
    key: str  # "limits.max_message_size", "domain[].name"
    hint: Any
    field: dataclasses.Field[Any]

    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and (
            self.field.default_factory is dataclasses.MISSING
        )


@dataclass(frozen=True)
class Line:
    number: int
    table: str  # "", "limits", "domain[]", "dnsbl.zone[]"
    block: int  # how many table headers come before it: each [[domain]] is one
    name: str
    value: str  # the TOML text after "=", its trailing comment included
    commented: bool

    @property
    def key(self) -> str:
        return f"{self.table}.{self.name}" if self.table else self.name


def settings(cls: type[Any] = configuration.Config, prefix: str = "") -> Iterator[Setting]:
    """Every key `configuration.load` accepts, in the order of the dataclasses; a
    section (a dataclass field) or an array of tables (a tuple of dataclasses) is
    walked in place of its own key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        item = typing.get_args(base)[0] if typing.get_origin(base) is tuple else None
        if dataclasses.is_dataclass(base):
            yield from settings(typing.cast(type[Any], base), f"{prefix}{field.name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            yield from settings(typing.cast(type[Any], item), f"{prefix}{field.name}[].")
        else:
            yield Setting(prefix + field.name, hint, field)


def example_lines(text: str) -> list[Line]:
    """The example's settings, active and commented, each under the table it belongs to."""
    lines, table, block = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if header := HEADER.match(line):
            table = header.group(3) + ("[]" if header.group(2) == "[[" else "")
            block += 1
        elif setting := SETTING.match(line):
            commented, name, value = setting.groups()
            lines.append(Line(number, table, block, name, value, commented is not None))
    return lines


def uncommented(text: str) -> str:
    """The example with every commented default and example table made active."""
    return "\n".join(
        line[2:] if line.startswith("# ") and (HEADER.match(line) or SETTING.match(line)) else line
        for line in text.splitlines()
    )


def value_of(setting: Setting, text: str) -> Any:
    """A TOML value (a trailing comment allowed) as config.py stores it: "5m" -> 300.0,
    by the loader's own conversion, so "50MiB" and 52428800 are the same default."""
    raw = tomllib.loads(f"value = {text}")["value"]
    return configuration._convert(setting.hint, raw, setting.key)


def stated_default(line: Line) -> str | None:
    """What an active line's comment gives as the default: ``# …; default: "5d"``."""
    found = re.search(r"#.*\bdefault: (.+)$", line.value)
    return found.group(1).strip() if found else None


# --------------------------------------------------------------------------- tests


def test_example_config_shows_every_setting() -> None:
    shown = {line.key for line in example_lines(EXAMPLE.read_text())}
    missing = [s.key for s in settings() if s.key not in shown]
    assert not missing, f"deploy/backupmx.toml does not show: {missing}"


def test_example_config_shows_no_setting_config_py_lacks() -> None:
    known = {s.key for s in settings()}
    lines = example_lines(EXAMPLE.read_text())
    unknown = [f"{line.number}: {line.key}" for line in lines if line.key not in known]
    assert not unknown, f"deploy/backupmx.toml shows keys config.py does not accept: {unknown}"


def test_example_config_gives_each_default() -> None:
    by_key = {s.key: s for s in settings()}
    wrong = []
    for line in example_lines(EXAMPLE.read_text()):
        setting = by_key[line.key]
        if setting.required:
            continue
        if setting.key in MACHINE_DEFAULTS:
            if stated_default(line) != MACHINE_DEFAULTS[setting.key]:
                wrong.append(
                    f"{line.number}: {line.key}: say 'default: {MACHINE_DEFAULTS[line.key]}'"
                )
            continue
        default = setting.default()
        if value_of(setting, line.value) == default:
            continue
        stated = stated_default(line)
        if line.commented:
            wrong.append(f"{line.number}: # {line.key} = {line.value} is not the default")
        elif stated is None or value_of(setting, stated) != default:
            wrong.append(f"{line.number}: {line.key} sets {line.value!r}, say the default")
    assert not wrong, "deploy/backupmx.toml:\n" + "\n".join(wrong)


def test_example_config_follows_the_order_of_config_py() -> None:
    """Tables in the order of Config's fields and keys in the order of their section's,
    as far as TOML allows: top-level keys come before every table, and an array of
    tables inside a section ([[dnsbl.zone]]) after that section's own keys."""
    keys = [s.key for s in settings()]

    def rank(table: str) -> tuple[int, int]:
        if not table:
            return (-1, 0)
        top = table.split(".")[0].removesuffix("[]")
        first = next(i for i, key in enumerate(keys) if re.match(rf"{top}(\[\])?\.", key))
        return (first, table.count("."))

    lines = example_lines(EXAMPLE.read_text())
    wrong = [
        f"{after.number}: {after.key} after {before.key}"
        for before, after in itertools.pairwise(lines)
        if rank(after.table) < rank(before.table)
        or (after.block == before.block and keys.index(after.key) <= keys.index(before.key))
    ]
    assert not wrong, "deploy/backupmx.toml, not in config.py's order:\n" + "\n".join(wrong)


def test_example_config_loads_as_shipped_and_with_every_example_uncommented(
    tmp_path: Path,
) -> None:
    shipped = configuration.load(EXAMPLE)
    assert [d.name for d in shipped.domain] == ["example.com"]
    (tmp_path / "all.toml").write_text(uncommented(EXAMPLE.read_text()))
    everything = configuration.load(tmp_path / "all.toml")
    # Uncommenting the defaults changes nothing; the example tables add entries.
    assert everything.dnsbl.zone and everything.domain[: len(shipped.domain)] == shipped.domain
    assert len(everything.domain) > len(shipped.domain)
    unchanged = dataclasses.replace(
        everything, domain=shipped.domain, dnsbl=dataclasses.replace(everything.dnsbl, zone=())
    )
    assert unchanged == shipped
