"""The command line: `main` parses, each verb's module does its work through the store."""


class CommandError(Exception):
    """An operation failed; the message is printed and the exit status is 1."""


class UsageError(CommandError):
    """The command line asks for something that cannot be done as asked (IDs and
    filters together, a bad pattern): the message is printed and the exit status is 2,
    as for argparse's own usage errors."""
