"""The delivery stage: routes (MX lookup, self-pruning), paced SMTP connections, retries.

Reads due recipients from the queue store and writes results back to it; it
from backupmx.deliver.primaries import Primaries, describe, target
from backupmx.deliver.route import Bounce, Defer, RoutePlan
from backupmx.deliver.schedule import next_attempt
from backupmx.mail.reply import Outcome, Verdict, bounced, deferred
from backupmx.queue.records import Claim, NewMessage, Outbound, Result, utcnow
"""
