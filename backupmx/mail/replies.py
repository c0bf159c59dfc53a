"""The SMTP replies backupmx's server sends: one table, each reply written once.

What a client sees from the receiving side is here, by name, so that the
documentation (docs/receiving.md) and the code cannot drift apart and one
reply is never written twice with two texts.  Pure data: a constant for a
fixed reply, a function for one that names the client, an address or a
figure.  Replies to address and parameter syntax stay beside their parsers
(`mail.address`, `receive.parameters`), which raise them.

Rules every reply here keeps:

* An enhanced status code (RFC 2034, RFC 3463) on every reply except the
  greeting and the EHLO/HELO lines, which have none by definition.
* A failure of our own is 4xx, never 5xx (docs/queue.md, invariant 1: ``250``
  only after the commit; a 5xx would make the client bounce good mail).
* ``421`` ends the session: the server closes the connection after it
  (RFC 5321 §3.8).
* ``452 4.5.3`` (too many recipients) is retried in a new transaction
  (RFC 5321 §4.5.3.1.10) and does not count against ``max_errors``.
"""

from __future__ import annotations

# ---------------------------------------------------------------- connection


def greeting(hostname: str) -> str:
    return f"220 {hostname} ESMTP backupmx"


SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Error: too many connections from your address"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
BAD_PROXY_HEADER = "421 4.7.0 Error: bad or missing PROXY protocol header"
EARLY_TALKER = "554 5.5.0 Error: SMTP protocol synchronization"


def timeout(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: timeout exceeded"


# ---------------------------------------------------------------- commands

LINE_TOO_LONG = "500 5.5.2 Error: line too long"
EMPTY_LINE = "500 5.5.2 Error: bad syntax"
UNKNOWN_COMMAND = "502 5.5.2 Error: command not recognized"
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
OK = "250 2.0.0 Ok"
BYE = "221 2.0.0 Bye"
HELP = "214 2.0.0 See RFC 5321"


def helo_syntax(verb: str) -> str:
    return f"501 5.5.4 Syntax: {verb} hostname"


def helo_flaw(verb: str, problem: str) -> str:
    return f"501 5.5.4 Error: {verb} argument contains {problem}"


def helo_accepted(hostname: str) -> str:
    return f"250 {hostname}"


def ehlo_accepted(hostname: str, extensions: list[str]) -> str:
    """The multi-line EHLO reply: the hostname, then one extension a line."""
    lines = [hostname, *extensions]
    return "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"


# VRFY and EXPN are disabled (Postfix's disable_vrfy_command): RFC 5321 §7.3 asks
# for 252, never a code that could pass for a verification, positive or negative.
VRFY_SYNTAX = "501 5.5.4 Syntax: VRFY address"
VRFY_DISABLED = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
EXPN_SYNTAX = "501 5.5.4 Syntax: EXPN mailing-list"
EXPN_DISABLED = "252 2.5.0 Cannot EXPN list, but will accept message and attempt delivery"

# ---------------------------------------------------------------- MAIL

NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
MAIL_PARAMETERS_AFTER_HELO = "501 5.5.4 Syntax: MAIL FROM:<address> (no parameters after HELO)"
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
SIZE_DECLARED_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
SENDER_OK = "250 2.1.0 Ok"


def too_much_mail(client_ip: str) -> str:
    return f"450 4.7.1 Error: too much mail from [{client_ip}], try again later"


# ---------------------------------------------------------------- RCPT

NEED_MAIL = "503 5.5.1 Error: need MAIL command"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
RCPT_PARAMETERS_AFTER_HELO = "501 5.5.4 Syntax: RCPT TO:<address> (no parameters after HELO)"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
SEPARATE_POSTMASTER = (
    "452 4.5.3 Error: too many recipients (postmaster gets a transaction of its own)"
)
RECIPIENT_OK = "250 2.1.5 Ok"
HARVEST = "421 4.7.0 Error: too many unknown recipients, closing connection"


def too_many_recipients_from(client_ip: str) -> str:
    return f"450 4.7.1 Error: too many recipients from [{client_ip}], try again later"


def user_unknown(address: str) -> str:
    return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


def unverified(address: str) -> str:
    return f"450 4.2.1 <{address}>: Recipient address rejected: unverified address, try again later"


def greylisted(recipient: str, seconds: int) -> str:
    return (
        f"450 4.7.1 <{recipient}>: Recipient address rejected:"
        f" Greylisted, try again in {seconds} seconds"
    )


def blocklisted(client_ip: str, zone: str) -> str:
    return f"550 5.7.1 Service unavailable; client [{client_ip}] blocked using {zone}"


# ---------------------------------------------------------------- DATA

NO_RECIPIENTS = "554 5.5.1 Error: no valid recipients"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed limit"
BARE_NEWLINE = "550 5.6.0 Error: bare CR or LF in message (see RFC 5321 §2.3.8)"
MAIL_LOOP = "554 5.4.6 Error: too many hops (mail loop?)"
STORAGE_FULL = "452 4.3.1 Error: insufficient system storage"
SPOOL_ERROR = "451 4.3.0 Error: local error in processing"
QUEUE_ERROR = "451 4.3.0 Error: queue file write error, try again later"
SPAM_CHECK_UNAVAILABLE = "451 4.7.1 Error: spam check unavailable, try again later"
SPAM_DEFERRED = "451 4.7.1 Message deferred by the spam filter, try again later"


def spam_rejected(reason: str) -> str:
    return f"550 5.7.1 Message rejected as spam ({reason})"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"


# ---------------------------------------------------------------- ETRN (RFC 1985)

ETRN_NOT_ALLOWED = "459 4.7.1 Error: ETRN not allowed from this client"
ETRN_IN_TRANSACTION = "503 5.5.1 Error: ETRN not allowed inside a mail transaction"
ETRN_SYNTAX = "501 5.5.4 Syntax: ETRN domain"


def etrn_refused(domain: str) -> str:
    return f"458 4.7.1 Error: unable to queue messages for {domain}"


def etrn_started(domain: str) -> str:
    return f"250 2.0.0 Queuing for node {domain} started"


# ---------------------------------------------------------------- STARTTLS (RFC 3207)

NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
TLS_ALREADY_ACTIVE = "503 5.5.1 Error: TLS already active"
STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
