"""The bounce stage: RFC 3464 delivery status notifications, enqueued as ordinary mail.

A DSN is sent from the null sender ``<>`` and is itself never bounced.
"""
