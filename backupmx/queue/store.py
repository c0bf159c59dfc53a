"""The queue store: the only way any stage reads or changes the queue.

`Store` is one object composed of the queue's roles, one file each:

* `backupmx.queue.claims` — which recipients are due, claims and their leases;
* `backupmx.queue.results` — delivery results and the sweeps (expiry, bounce,
  delay warning), each with its DSNs in the same transaction;
* `backupmx.queue.domains` — the domains table (each primary's state, and each
  node's own view of it);
* `backupmx.queue.nodes` — the nodes sharing the queue, their heartbeats, and the
  leases of dead ones given back;
* `backupmx.queue.memory` — the receiver's memory (verification cache,
  greylisting, spam records);
* `backupmx.queue.admin` — an operator's hold, release, delete;
* `backupmx.queue.inventory` — what the queue holds, read for people;
* `backupmx.queue.attempts` — each recipient's last delivery attempts;
* `backupmx.queue.shape` — pending mail by domain and age (``queue shape``);
* `backupmx.queue.retention` — finished messages: their bodies go at once, their
  records after ``keep_finished``, and the space they took is given back;
* `backupmx.queue.space` — the database's size and the free space beside it.

The records they take and give are in `backupmx.queue.records`; every state
change of a recipient is a transition of `backupmx.queue.state`.

Promises: `enqueue` returns only after the message and all its recipients are
committed (by the intake process, `backupmx.queue.intake`, in group commits); on
any storage error it raises and nothing of the message is visible.  `start`
starts the results writer (``serve``), `start_intake` the intake (each receiver
worker); the CLI reads and acts without either; `close` lets them finish what
they hold.
"""

from __future__ import annotations

from dataclasses import replace

from backupmx.queue.admin import Admin
from backupmx.queue.attempts import Attempts
from backupmx.queue.claims import Claims
from backupmx.queue.domains import Domains
from backupmx.queue.intake import Intake
from backupmx.queue.inventory import Inventory
from backupmx.queue.memory import Memory
from backupmx.queue.nodes import Nodes
from backupmx.queue.records import NewMessage
from backupmx.queue.results import Results
from backupmx.queue.retention import Retention
from backupmx.queue.shape import Shape
from backupmx.queue.space import Space


class Store(
    Claims, Results, Domains, Nodes, Memory, Admin, Inventory, Attempts, Shape, Retention, Space
):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._intake = Intake(url)

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(url)

    async def start(self) -> None:
        """Start the group-commit thread for delivery results (serve, which delivers)."""
        self._start_recorder()

    async def start_intake(self) -> None:
        """Start the intake process for received mail (a receiver worker)."""
        await self._intake.start()

    async def close(self) -> None:
        await self._intake.close()
        await self._stop_recorder()
        await self.engine.dispose()

    async def enqueue(self, message: NewMessage) -> None:
        await self._intake.commit(replace(message, body=message.body.portable()))
