"""The command line's own rules: --version, the options of every verb before or after
it, exit status 2 for usage errors, a description for every verb."""

from __future__ import annotations

import pytest

from backupmx.cli.main import _verbs, build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("backupmx ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "a.toml", "--database", "sqlite:///q.db", "--json", "queue", "stats"],
        ["queue", "stats", "--config", "a.toml", "--database", "sqlite:///q.db", "--json"],
        ["--config", "a.toml", "queue", "stats", "--database", "sqlite:///q.db", "--json"],
    ],
)
def test_global_options_before_or_after_the_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.config, args.database, args.json) == ("a.toml", "sqlite:///q.db", True)


def test_options_left_out_keep_their_defaults() -> None:
    args = build_parser().parse_args(["config", "check"])
    assert (args.config, args.database, args.json) == (None, None, False)


@pytest.mark.parametrize(
    "argv",
    [[], ["frob"], ["queue"], ["queue", "list", "--nonsense"], ["serve", "--primary", "x"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_every_verb_has_a_one_line_description() -> None:
    verbs = _verbs(build_parser())
    assert len(verbs) > 15
    for verb in verbs:
        assert verb.description and "\n" not in verb.description, verb.prog


def test_primary_names_a_domain_and_a_route() -> None:
    args = build_parser().parse_args(["serve", "--primary", "Example.TEST=127.0.0.1:2526"])
    assert args.primary == [("example.test", "127.0.0.1:2526")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--primary", "example.test=[::1"])
