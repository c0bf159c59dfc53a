"""The delivery stage: routes (MX lookup, self-pruning), paced SMTP connections, retries.

Reads due recipients from the queue store and writes results back to it; it
never reaches into the receive or bounce stages (docs/architecture.md).
"""
