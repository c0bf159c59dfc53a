"""ESMTP parameters of MAIL and RCPT (RFC 5321 §4.1.2, RFC 1870, RFC 6152, RFC 6531, RFC 3461).

aiosmtpd upper-cases every parameter and answers 555 to DSN ones; here keywords
are matched case-insensitively while values keep the case the client sent
(ENVID and ORCPT are opaque xtext that must reach the primary unchanged).

Parameters are separated by spaces only (RFC 5321 §4.1.2), and hold only what the
queue keeps byte for byte (`storable.flaw`).  Unknown keywords raise
`AddressError` with ``555 5.5.4``; malformed or repeated values, invalid UTF-8,
NUL and control characters with ``501 5.5.4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backupmx.mail.address import AddressError
from backupmx.mail.storable import UTF8_NON_ASCII, flaw

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rf"(?:[\x21-\x3c\x3e-\x7e]|{UTF8_NON_ASCII})+")  # RFC 6531 §3.3
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True)
class MailParameters:
    size: int | None = None
    body: str = "7BIT"  # 7BIT or 8BITMIME
    smtputf8: bool = False
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None


@dataclass(frozen=True)
class RcptParameters:
    notify: str | None = None  # NEVER, or a comma list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # addr-type;xtext, as sent


def _split(text: str) -> dict[str, str | None]:
    problem = flaw(text)
    if problem:  # named, rather than a "malformed" echo of bytes we could not store
        raise AddressError(f"501 5.5.4 Malformed parameter text: contains {problem}")
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not _VALUE.fullmatch(value)):
            raise AddressError(f"501 5.5.4 Malformed parameter {item!r}")
        key = keyword.upper()
        if key in params:
            raise AddressError(f"501 5.5.4 Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def _xtext(key: str, value: str | None, max_length: int) -> str:
    if value is None or not _XTEXT.fullmatch(value) or len(value) > max_length:
        raise AddressError(f"501 5.5.4 Malformed {key} parameter")
    return value


def parse_mail_parameters(text: str) -> MailParameters:
    params = _split(text)
    size: int | None = None
    body, smtputf8, ret, envid = "7BIT", False, None, None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise AddressError("501 5.5.4 Malformed SIZE parameter")
            size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise AddressError("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise AddressError("501 5.5.4 SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise AddressError("501 5.5.4 RET must be FULL or HDRS")
            ret = value.upper()
        elif key == "ENVID":
            envid = _xtext("ENVID", value, 100)  # RFC 3461 §4.4
        else:
            raise AddressError(f"555 5.5.4 MAIL parameter {key} not supported")
    return MailParameters(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid)


def parse_rcpt_parameters(text: str) -> RcptParameters:
    params = _split(text)
    notify: str | None = None
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            valid = words == ["NEVER"] or (set(words) <= _NOTIFY and len(set(words)) == len(words))
            if not value or not valid:
                raise AddressError("501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
            notify = ",".join(words)
        elif key == "ORCPT":
            addr_type, semicolon, address = (value or "").partition(";")
            if not semicolon or not _KEYWORD.fullmatch(addr_type) or not address:
                raise AddressError("501 5.5.4 ORCPT must be addr-type;address")
            _xtext("ORCPT", address, 500)  # RFC 3461 §4.2 (with utf-8-addr-xtext headroom)
            orcpt = value
        else:
            raise AddressError(f"555 5.5.4 RCPT parameter {key} not supported")
    return RcptParameters(notify=notify, orcpt=orcpt)
