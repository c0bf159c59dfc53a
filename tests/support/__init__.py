"""What the tests share: the real programs they start and the one set of wait helpers.

`server` runs `backupmx serve` as a process with its own config and database;
`primary_sink`, `dns_server` and `spam_filters` start the real peers (smtp-sink,
aiosmtpd primaries, dnsmasq, spamd, rspamd) on loopback ports from `ports`;
`smtp_client` speaks SMTP to them byte for byte; `waiting` polls for what a
process will do, with a deadline and a message naming what never came.
"""
