"""What the receiving side decides by: `ReceivePolicy`, built from the configuration
by `policy_from` and swapped whole on SIGHUP, so that a session sees one
consistent set of domains, limits, networks and certificate per command.

`policy_from` raises what loading the TLS certificate raises (`OSError`,
`ssl.SSLError`); `config check` reports those before `serve` starts.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from backupmx.config import Config, Dnsbl, Greylist, Limits, SpamCheck
from backupmx.mail.address import Address, RelayDomains
from backupmx.mail.networks import Networks, in_networks, parse_networks
from backupmx.receive.recipients import RecipientPolicy


@dataclass(frozen=True)
class ReceivePolicy:
    hostname: str
    relay_domains: RelayDomains
    limits: Limits
    tls_context: ssl.SSLContext | None
    etrn_clients: Networks = ()
    recipients: RecipientPolicy = field(default_factory=RecipientPolicy)
    spamcheck: SpamCheck = field(default_factory=SpamCheck)
    dnsbl: Dnsbl = field(default_factory=Dnsbl)
    greylist: Greylist = field(default_factory=Greylist)
    greylist_pass: Networks = ()
    proxy_from: Networks = ()  # load balancers that send a PROXY header
    postmaster: Address | None = None  # what RCPT TO:<Postmaster> stands for

    def is_postmaster(self, address: Address) -> bool:
        """postmaster@ any domain (RFC 5321 §4.5.1), or the configured postmaster mailbox."""
        configured = self.postmaster
        return address.is_postmaster or (
            configured is not None
            and address.local == configured.local
            and address.routing_domain == configured.routing_domain
        )

    def may_etrn(self, client_ip: str) -> bool:
        return in_networks(client_ip, self.etrn_clients)


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """Server context for STARTTLS: TLS 1.2 or newer, no client certificate asked."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def policy_from(config: Config) -> ReceivePolicy:
    return ReceivePolicy(
        hostname=config.hostname,
        relay_domains=RelayDomains(d.name for d in config.domain),
        limits=config.limits,
        tls_context=tls_context(config.tls.cert, config.tls.key),
        etrn_clients=parse_networks(config.etrn_clients),
        recipients=RecipientPolicy(config.domain, config.recipients),
        spamcheck=config.spamcheck,
        dnsbl=config.dnsbl,
        greylist=config.greylist,
        greylist_pass=parse_networks(config.greylist.pass_clients),
        proxy_from=parse_networks(config.proxy_protocol),
        postmaster=Address(*config.postmaster_address().rsplit("@", 1)),
    )
