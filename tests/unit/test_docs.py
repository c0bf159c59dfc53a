"""docs/ stays the design of record: complete, reachable, and true to the code.

* The repository names no design notes outside itself: a clone has only docs/.
* Every configuration key the loader accepts is in the Configuration section of
  docs/contracts.md, and the loader accepts every key written there.
* Every CLI verb and option of the argparse parser is in its Command line section.
* Every metric the endpoint exports is in its Metrics section, and every metric
  written there is exported.
* Every relative link and #anchor in docs/ and README.md resolves, and so does every
  docs/<page>.md#anchor that a comment or docstring names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import pytest

from backupmx import config as configuration
from backupmx import metrics
from backupmx.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONTRACTS = DOCS / "contracts.md"

# The notes the design started from lived beside the repository, not in it.
OUTSIDE_NOTES = re.compile(r"\.\./shared\b|\b(?:design|anchors|style)\.md\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAMED_PAGE = re.compile(r"(?<![\w/.])docs/([\w-]+\.md)(?:#([\w-]+))?")
KEY_ROW = re.compile(r"^\|\s*`([a-z_][a-z0-9_.\[\]]*)`\s*\|", re.M)
METRIC_ROW = re.compile(r"^\|\s*`(backupmx_[a-z_]+)`\s*\|", re.M)
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", "build", "dist", "node_modules"}


# --------------------------------------------------------------------------- helpers


def repository_files() -> list[Path]:
    """The repository's files, walked (a unit test starts no process, so no `git`)."""
    found = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [
            d
            for d in subdirectories
            if d not in SKIPPED_DIRS and not d.endswith(("_cache", ".egg-info"))
        ]
        found += [Path(directory) / f for f in files]
    return sorted(found)


def text_of(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_docs() -> Iterator[tuple[Path, str]]:
    for path in repository_files():
        if path.is_relative_to(DOCS):
            continue
        text = text_of(path)
        if text is not None:
            yield path, text


def without_code_blocks(markdown: str) -> str:
    """Fenced blocks removed (their lines kept empty, so line numbers stay)."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else line)
    return "\n".join(lines)


def section(markdown: str, heading: str) -> str:
    """The text under a `## heading`, up to the next heading of that level."""
    match = re.search(rf"^{re.escape(heading)}\s*$", markdown, re.M)
    assert match, f"{heading!r} is missing"
    rest = markdown[match.end() :]
    following = re.search(r"^## ", rest, re.M)
    return rest[: following.start()] if following else rest


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", without_code_blocks(path.read_text()), re.M)
    seen: Counter[str] = Counter()
    found = set()
    for heading in headings:
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return frozenset(found)


def markdown_pages() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


# --------------------------------------------------------------------------- the code's side


def accepted_keys(cls: type[Any] = configuration.Config, prefix: str = "") -> set[str]:
    """What `configuration.load` accepts: the fields of the section dataclasses, which
    its builder turns tables into (anything else is an "unknown key").  A tuple of
    dataclasses is an array of tables, written ``name[].key``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    keys: set[str] = set()
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(hint):
            keys |= accepted_keys(typing.cast(type[Any], hint), f"{prefix}{field.name}.")
        elif item is not None and dataclasses.is_dataclass(item):
            keys |= accepted_keys(typing.cast(type[Any], item), f"{prefix}{field.name}[].")
        else:
            keys.add(prefix + field.name)
    return keys


def raw_table(key: str, value: object) -> dict[str, Any]:
    """``dnsbl.zone[].weight`` → ``{"dnsbl": {"zone": [{"weight": value}]}}``."""
    *tables, last = key.split(".")
    result: Any = value
    result = {last: result}
    for name in reversed(tables):
        result = {name.removesuffix("[]"): [result] if name.endswith("[]") else result}
    return typing.cast(dict[str, Any], result)


def refused_as_unknown(key: str) -> bool:
    """Ask the loader itself: `True` is the wrong type for almost every key, so it is
    refused naming the key, but never as "unknown key" if the key exists."""
    try:
        configuration.load(None, raw_table(key, True))
    except configuration.ConfigError as error:
        return error.problem == "unknown key"
    return False


def cli_verbs(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every verb the parser takes (``queue list``, ``db upgrade``), with its parser."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield path, parser
    for action in subcommands:
        for name, subparser in action.choices.items():
            yield from cli_verbs(subparser, (*path, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def documented_keys() -> set[str]:
    return set(KEY_ROW.findall(section(CONTRACTS.read_text(), "## Configuration")))


def exported_metrics() -> set[str]:
    """Our metric families by the names contracts.md gives them (counters with ``_total``)."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
        if family.name.startswith("backupmx_")
    }


# --------------------------------------------------------------------------- tests


def test_no_file_names_design_notes_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path, text in outside_docs()
        for number, line in enumerate(text.splitlines(), 1)
        if OUTSIDE_NOTES.search(line)
    ]
    assert not offenders, "point these at docs/ instead:\n" + "\n".join(offenders)


def test_every_accepted_configuration_key_is_documented() -> None:
    missing = sorted(accepted_keys() - documented_keys())
    assert not missing, f"not in docs/contracts.md#configuration: {missing}"


def test_every_documented_configuration_key_is_accepted() -> None:
    documented = documented_keys()
    assert len(documented) > 50, "the key tables of ## Configuration were not found"
    unknown = sorted(k for k in documented if refused_as_unknown(k))
    assert not unknown, f"docs/contracts.md documents keys config.py refuses: {unknown}"


def test_the_key_probe_tells_known_keys_from_unknown_ones() -> None:
    assert not refused_as_unknown("limits.max_message_size")
    assert not refused_as_unknown("domain[].name")
    assert refused_as_unknown("limits.no_such_key")
    assert refused_as_unknown("dnsbl.zone[].no_such_key")


def test_every_cli_verb_and_option_is_documented() -> None:
    text = section(CONTRACTS.read_text(), "## Command line")
    parser = build_parser()
    missing = [f"--{o.lstrip('-')} (global)" for o in options(parser) if o not in text]
    verbs = list(cli_verbs(parser))
    assert len(verbs) > 10, "the parser's verbs were not found"
    for path, subparser in verbs:
        verb = " ".join(path)
        if f"backupmx {verb}" not in text:
            missing.append(f"backupmx {verb}")
        missing += [f"{verb} {o}" for o in sorted(options(subparser)) if o not in text]
    assert not missing, f"not in docs/contracts.md#command-line: {missing}"


def test_every_metric_is_documented_and_every_documented_metric_exported() -> None:
    documented = set(METRIC_ROW.findall(section(CONTRACTS.read_text(), "## Metrics")))
    exported = exported_metrics()
    assert len(exported) > 10, "the registry's metrics were not found"
    assert not exported - documented, f"not in docs/contracts.md#metrics: {exported - documented}"
    assert not documented - exported, f"documented, not exported: {documented - exported}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_pages_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(without_code_blocks(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        linked = (page.parent / name).resolve() if name else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_docs_pages_named_in_the_code_exist() -> None:
    broken = []
    for path, text in outside_docs():
        for number, line in enumerate(text.splitlines(), 1):
            for page, anchor in NAMED_PAGE.findall(line):
                target = DOCS / page
                where = f"{path.relative_to(ROOT)}:{number}"
                if not target.exists():
                    broken.append(f"{where}: docs/{page} does not exist")
                elif anchor and anchor not in anchors(target):
                    broken.append(f"{where}: docs/{page} has no heading #{anchor}")
    assert not broken, "\n".join(broken)
