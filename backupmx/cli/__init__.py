"""The command line: `main` parses, each verb's module does its work through the store."""


class CommandError(Exception):
    """An operation failed; the message is printed and the exit status is 1."""
