"""Maintenance rounds: repairing what dead workers leave behind, for one command per database when all is well.

Every ``recovery_interval`` a worker redelivers tasks whose lease expired, tells the
dependents of tasks whose finisher died first, frees concurrency slots of tasks that
stopped running, now and then sets aside documents no claim can take, and checks parked
dependents against their links. Asked class by class, that cost two commands or more
per class per round, even when nothing was wrong.

Here one probe asks every question at once: one ``aggregate`` per database
(``store.probe``, a ``$unionWith`` of one branch per question), each branch an indexed,
``$limit``-ed match that answers with the classes it found work for, or nothing. Classes
sharing a collection (Beanie inheritance) share its branches, so the probe costs the same
for one class or many; the repairing commands are sent only for classes the probe named.
A lease is still recovered in the round after it expires, as before.

Each document is repaired under its own class's settings (``store.owner_of``): a subclass
task whose lease expired is recovered under the subclass's ``max_redeliveries`` and
``ttl`` even when the worker runs its parent. A probe the server refuses counts as "work
for every class", so the round repairs everything the old way; a repair that fails is
logged and the others go on. A lost connection is raised for the caller to wait out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from beanie_tasks import admin, clock, dependencies, store
from beanie_tasks.limits import SLOT_CLAIM_GRACE
from beanie_tasks.redact import get_logger, redact_text
from beanie_tasks.store import UNCLAIMABLE_CHECKS, Answer, Question, Store

log = get_logger("beanie_tasks.maintenance")


@dataclasses.dataclass(frozen=True)
class Maintained:
    """A class a round maintains: its store, and whether it declares link fields (its parked tasks are checked)."""

    store: Store
    has_links: bool = False


@dataclasses.dataclass
class Report:
    """What a round did: tasks it recovered from expired leases, repairs that failed, whether the probe was refused."""

    recovered: int = 0
    failures: int = 0
    probe_refused: bool = False


@dataclasses.dataclass
class _Collection:
    """The maintained classes of one collection, which share its probe branches."""

    raw: Any
    classes: list[Maintained]

    @property
    def name(self) -> str:
        return str(self.raw.name)

    @property
    def class_field(self) -> str | None:
        return self.classes[0].store.class_field

    def class_ids(self) -> list[str] | None:
        """Every class id of every maintained class here, once each (None without a class field)."""
        if self.class_field is None:
            return None
        ids: dict[str, None] = {}
        for maintained in self.classes:
            ids.update(dict.fromkeys(maintained.store.class_ids() or ()))
        return list(ids)

    def owner(self, class_id: str | None) -> Store:
        """The store whose class's settings apply to documents of ``class_id``."""
        if class_id is None or self.class_field is None:
            return self.classes[0].store
        holder = next((m.store for m in self.classes if class_id in (m.store.class_ids() or ())), self.classes[0].store)
        return store.owner_of(holder, class_id)


@dataclasses.dataclass
class _Ask:
    """A probe question and what to do with its answer (None: the probe was refused, so act for everything)."""

    question: Question
    act: Callable[[Answer | None], Awaitable[None]]


class _Round:
    def __init__(self, who: str, *, sweep: bool, slots: bool) -> None:
        self.who = who
        self.sweep = sweep
        self.slots = slots
        self.report = Report()

    async def guarded(self, name: str, repair: Awaitable[Any]) -> Any:
        """Run one repair; one class's broken data must not stop the others' recovery."""
        try:
            return await repair
        except ConnectionFailure:
            raise
        except Exception as exc:
            self.report.failures += 1
            log.error(
                "%s: maintenance of %s failed (%s); the other classes go on",
                self.who,
                name,
                redact_text(str(exc) or type(exc).__name__),
            )
            return None

    async def run(self, database: Any, collections: list[_Collection]) -> None:
        await clock.refresh(collections[0].raw)
        for collection in collections:
            for maintained in collection.classes:
                await self.guarded(maintained.store.name, maintained.store.retry_undos())
        asks: list[_Ask] = []
        for collection in collections:
            asks.extend(self.questions(collection))
        try:
            answers: Sequence[Answer | None] = await store.probe(database, [a.question for a in asks])
        except ConnectionFailure:
            raise
        except OperationFailure as exc:  # the server refused the probe: repair everything, as if all answered yes
            self.report.probe_refused = True
            log.warning("%s: the maintenance probe was refused (%s); every class is maintained", self.who, exc)
            answers = [None] * len(asks)
        for ask, answer in zip(asks, answers, strict=True):
            await ask.act(answer)

    def questions(self, collection: _Collection) -> list[_Ask]:
        name, class_field, ids = collection.name, collection.class_field, collection.class_ids()
        now = collection.classes[0].store.now()
        asks = [
            _Ask(store.expired_leases_question(name, class_field, class_id, now), self._recover(collection, class_id))
            for class_id in (ids if ids is not None else [None])
        ]
        asks.append(_Ask(store.told_dependents_question(name, class_field, ids), self._tell(collection)))
        linked = [m.store for m in collection.classes if m.has_links and dependencies.reconcile_due(m.store)]
        if linked:
            asks.append(_Ask(store.parked_question(name, class_field, ids), self._reconcile(linked)))
        if self.slots:
            for maintained in collection.classes:
                limited = maintained.store
                if limited.limits.key_concurrency is not None:
                    settled_before = limited.now() - timedelta(seconds=SLOT_CLAIM_GRACE)
                    question = store.stale_slots_question(limited.limit_scope, settled_before)
                    asks.append(_Ask(question, self._free_slots(limited)))
        if self.sweep:
            for check in range(len(UNCLAIMABLE_CHECKS)):
                question = store.malformed_question(name, class_field, ids, check, admin.MAX_SET_ASIDE_PER_ROUND)
                asks.append(_Ask(question, self._set_aside(collection, check)))
        return asks

    def _recover(self, collection: _Collection, class_id: str | None) -> Callable[[Answer | None], Awaitable[None]]:
        async def act(answer: Answer | None) -> None:
            if answer is not None and not answer.rows:
                return
            owner = collection.owner(class_id)
            ids = [class_id] if class_id is not None else None
            recovered = await self.guarded(owner.name, owner.recover_expired(ids))
            if recovered:
                self.report.recovered += recovered
                log.warning("%s: recovered %d task(s) with expired leases", owner.name, recovered)

        return act

    def _tell(self, collection: _Collection) -> Callable[[Answer | None], Awaitable[None]]:
        async def act(answer: Answer | None) -> None:
            ids = collection.class_ids()
            everyone: set[Any] = set(ids) if ids is not None else {None}
            found = answer.markers if answer is not None and answer.complete else everyone
            for class_id in sorted(found, key=str):
                owner = collection.owner(class_id)
                ids = [class_id] if class_id is not None else None
                await self.guarded(owner.name, dependencies.tell_unfinished(owner, ids))

        return act

    def _reconcile(self, linked: list[Store]) -> Callable[[Answer | None], Awaitable[None]]:
        async def act(answer: Answer | None) -> None:
            for owner in linked:
                ids = owner.class_ids()
                parked = (
                    answer is None
                    or not answer.complete
                    or (bool(answer.rows) if ids is None else bool(answer.markers & set(ids)))
                )
                if parked:
                    await self.guarded(owner.name, dependencies.reconcile_parked(owner))
                else:
                    dependencies.reconciled(owner)

        return act

    def _free_slots(self, owner: Store) -> Callable[[Answer | None], Awaitable[None]]:
        async def act(answer: Answer | None) -> None:
            if answer is not None and not answer.rows:
                return
            settled_before = owner.now() - timedelta(seconds=SLOT_CLAIM_GRACE)
            await self.guarded(owner.name, owner.reconcile_slots(settled_before))

        return act

    def _set_aside(self, collection: _Collection, check: int) -> Callable[[Answer | None], Awaitable[None]]:
        condition, field_name, problem = UNCLAIMABLE_CHECKS[check]

        async def act(answer: Answer | None) -> None:
            if answer is None:
                if check == 0:  # every check at once, class by class, once per refused probe
                    for maintained in collection.classes:
                        await self.guarded(maintained.store.name, admin.set_aside_unclaimable(maintained.store))
                return
            for row in answer.rows:
                class_field = collection.class_field
                owner = collection.owner(row.get(class_field) if class_field is not None else None)
                guard = {"_id": row["_id"], **condition}
                await self.guarded(owner.name, admin.set_aside_malformed(owner, row, guard, field_name, problem))

        return act


def _by_database(classes: Sequence[Maintained]) -> list[tuple[Any, list[_Collection]]]:
    """The maintained classes grouped by database (on one client) and collection, in the order given."""
    databases: dict[tuple[int, str], tuple[Any, dict[str, _Collection]]] = {}
    for maintained in classes:
        raw = maintained.store.raw
        database = raw.database
        _, collections = databases.setdefault((id(database.client), str(database.name)), (database, {}))
        if raw.name in collections:
            collections[raw.name].classes.append(maintained)
        else:
            collections[raw.name] = _Collection(raw, [maintained])
    return [(database, list(collections.values())) for database, collections in databases.values()]


async def maintain(classes: Sequence[Maintained], *, who: str, sweep: bool = False, slots: bool = True) -> Report:
    """One maintenance round over ``classes``: one probe per database, then the repairs it found work for.

    ``sweep`` also sets aside documents no claim can take; ``slots`` frees the concurrency
    slots of tasks that stopped running. A database whose probe fails on the server's
    side (not the connection) is logged and the other databases go on.
    """
    state = _Round(who, sweep=sweep, slots=slots)
    for database, collections in _by_database(classes):
        try:
            await state.run(database, collections)
        except ConnectionFailure:
            raise
        except PyMongoError as exc:
            state.report.failures += 1
            log.error("%s: maintenance of database %s failed (%s)", who, database.name, redact_text(str(exc)))
    return state.report
