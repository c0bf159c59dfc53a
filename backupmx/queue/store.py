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
starts the writers (only ``serve`` needs them: the results writer and the intake
process), `receive_through` points a receiver worker at that intake; the CLI
reads and acts without either; `close` lets them finish what they hold.
"""

from __future__ import annotations

from dataclasses import replace

from backupmx.queue.admin import Admin
from backupmx.queue.attempts import Attempts
from backupmx.queue.claims import Claims
from backupmx.queue.domains import Domains
from backupmx.queue.intake import Intake, IntakeClient, IntakeError
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
        self.intake: Intake | None = None  # serve's: the intake process
        self._intake_client: IntakeClient | None = None  # a receiver's way to it

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(url)

    async def start(self) -> None:
        """Start the writers (serve only): the group-commit thread for delivery results,
        and the intake process, which the receiver workers reach at `intake.address`."""
        self._start_recorder()
        self.intake = Intake(self.url)
        await self.intake.start()
        self._intake_client = IntakeClient(self.intake.address)  # serve's own enqueue

    async def receive_through(self, intake_address: str) -> None:
        """Commit received mail through serve's intake (a receiver worker); raises
        IntakeError if it cannot be reached."""
        self._intake_client = IntakeClient(intake_address)
        await self._intake_client.connect()

    async def close(self) -> None:
        if self._intake_client is not None:
            await self._intake_client.close()
        if self.intake is not None:
            await self.intake.close()
        await self._stop_recorder()
        await self.engine.dispose()

    async def enqueue(self, message: NewMessage) -> None:
        if self._intake_client is None:
            raise IntakeError("this process does not receive mail")
        await self._intake_client.commit(replace(message, body=message.body.portable()))
