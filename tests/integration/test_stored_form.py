"""What ``push()`` stores is exactly what Beanie's encoder stored, and a task is still validated when it must be.

``push()`` builds its document with ``beanie_tasks.modelling`` instead of Beanie's
``get_dict``, and skips the second validation of a task no field of which changed since it
was built. These tests hold both to the old behaviour: the stored document of rich task
classes against Beanie's own encoding of the same task (key order and BSON types
included), and the validation a changed task still gets.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any

import bson
import pytest
from beanie import DecimalAnnotation, Link, PydanticObjectId
from beanie.odm.utils.dump import get_dict
from bson import DBRef, ObjectId
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from beanie_tasks import DependencyType, Priority, State, Task, depends_on
from beanie_tasks.driver import BEANIE_MAJOR
from beanie_tasks.modelling import stored_document

EAST = timezone(timedelta(hours=5, minutes=30))


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


class Size(IntEnum):
    S = 1
    L = 3


class Shape(Enum):
    ROUND = (1, "round")  # a value BSON stores as a list


class Point(BaseModel):
    x: int = 0
    y: float = 0.0
    when: datetime | None = None
    tag: Colour = Colour.RED


class Rich(Task):
    """Every kind of value a task's fields hold, each one Beanie converts or passes through."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    when: datetime = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=EAST)
    day: date = date(2030, 1, 2)
    span: timedelta = timedelta(seconds=90)
    ref: ObjectId = ObjectId("65a1b2c3d4e5f60718293a4b")
    own_id: PydanticObjectId | None = None
    pointer: DBRef | None = None
    amount: DecimalAnnotation = Decimal("12.50")
    colour: Colour = Colour.BLUE
    size: Size = Size.L
    point: Point = Point(x=1, y=2.5, when=datetime(2030, 1, 1, tzinfo=timezone.utc))
    points: list[Point] = Field(default_factory=lambda: [Point(), Point(x=2)])
    mapping: dict[str, Any] = Field(default_factory=lambda: {"a": [1, 2], "b": {"c": Decimal("1.5")}})
    raw: bytes = b"\x00\x01"
    key: uuid.UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")
    labels: set[str] = Field(default_factory=lambda: {"one"})
    flag: bool = True
    ratio: float = 0.25
    hidden: str = Field(default="not stored by Beanie 2", exclude=True)

    class Settings:
        name = "bt_stored_rich"


class Odd(Task):
    """Values Beanie stores but cannot read back: a plain Decimal (as Decimal128), an enum of a tuple."""

    amount: Decimal = Decimal("7.5")
    shape: Shape = Shape.ROUND
    shapes: list[Shape] = Field(default_factory=lambda: [Shape.ROUND])

    class Settings:
        name = "bt_stored_odd"


class Aliased(Task):
    """Fields stored under another key, and a class encoder that takes over a type BSON has."""

    note: str = Field(default="hello", alias="n0te")
    amount: Decimal = Decimal("3.25")
    stamp: datetime = datetime(2031, 5, 6, tzinfo=timezone.utc)

    class Settings:
        name = "bt_stored_aliased"
        bson_encoders = {Decimal: str, datetime: lambda value: value.isoformat()}


class Base(Task):
    class Settings:
        name = "bt_stored_family"
        is_root = True


class Child(Base):
    size: Size = Size.S


class Linking(Task):
    parent: Link[Child] | None = depends_on(DependencyType.DIRECT)

    class Settings:
        name = "bt_stored_linking"


class Checked(Task):
    """Validators that must still run on a task changed after it was built."""

    low: int = 0
    high: int = 10
    items: list[int] = Field(default_factory=list)

    @field_validator("items")
    @classmethod
    def _bounded(cls, value: list[int]) -> list[int]:
        if any(item > 100 for item in value):
            raise ValueError("items must be at most 100")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Checked:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self

    class Settings:
        name = "bt_stored_checked"


class WithOwnPrivates(Task):
    """A subclass's own private attributes and ``model_post_init`` behave as pydantic's do."""

    _seen: list[str] = PrivateAttr(default_factory=list)
    _shared_default: list[str] = PrivateAttr(default=[])
    _posted: int = PrivateAttr(default=0)

    def model_post_init(self, context: Any, /) -> None:
        self._posted += 1

    class Settings:
        name = "bt_stored_privates"


class Built(Task):
    """A subclass with its own ``__init__``: stored documents are read through it."""

    built_by_init: bool = False

    def __init__(self, **data: Any) -> None:
        data["built_by_init"] = True
        super().__init__(**data)

    class Settings:
        name = "bt_stored_built"


MODELS = (Rich, Odd, Aliased, Base, Child, Linking, Checked, WithOwnPrivates, Built)


@pytest.fixture(autouse=True)
async def models(init_tasks: Any) -> None:
    await init_tasks(*MODELS)


def beanie_document(task: Task) -> dict[str, Any]:
    """The document the old ``push_draft`` stored: Beanie's ``get_dict`` of the checked task, plus the dedupe slot."""
    document = dict(get_dict(task, to_db=True, keep_nulls=True))
    if task.dedupe_key is not None:
        document["dedupe_slot"] = task.dedupe_key
    return document


def same_bson(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Byte for byte: the same keys in the same order, the same BSON types and values."""
    assert list(ours) == list(theirs)
    assert bson.encode(ours) == bson.encode(theirs), {k: (ours[k], theirs.get(k)) for k in ours}


def draft_of(task: Task) -> Any:
    store = type(task).task_store()
    return task.push_draft(store, store.now())


@pytest.mark.parametrize(
    "build",
    [
        lambda: Rich(),
        lambda: Rich(own_id=PydanticObjectId(), pointer=DBRef("elsewhere", ObjectId()), dedupe_key="k1"),
        lambda: Rich(colour="red", size=1, priority=Priority.HIGH, labels={"a", "b"}, run_at=datetime.now(EAST)),
        lambda: Odd(),
        lambda: Aliased(),
        lambda: Aliased(n0te="via alias", amount=Decimal("0.1")),
        lambda: Child(),
        lambda: Child(size=Size.L, max_attempts=4, dedupe_key="child"),
    ],
)
async def test_the_document_push_builds_is_beanies_own(build: Any) -> None:
    draft = draft_of(build())
    same_bson(draft.document, beanie_document(draft.checked))


async def test_a_changed_task_is_encoded_as_beanie_encodes_it() -> None:
    task = Rich()
    task.points.append(Point(x=7, when=datetime(2029, 1, 1, tzinfo=EAST)))
    task.mapping["new"] = {Colour.RED: Size.S}
    task.amount = Decimal("99.99")
    draft = draft_of(task)
    same_bson(draft.document, beanie_document(draft.checked))


async def test_a_linking_task_is_encoded_by_beanie_itself() -> None:
    child = await Child().push()
    draft = draft_of(Linking(parent=child))  # type: ignore[arg-type]
    same_bson(draft.document, beanie_document(draft.checked))
    assert isinstance(draft.document["parent"], DBRef)


async def test_the_stored_document_reads_back_as_beanies_encoding(db: Any) -> None:
    """What the server holds after push() is what Beanie's encoding round-trips to, type for type."""
    task = Rich(own_id=PydanticObjectId(), dedupe_key="read-back")
    expected = beanie_document(draft_of(task).checked)
    pushed = await task.push()
    stored = await db[Rich.get_collection_name()].find_one({"_id": pushed.id})
    expected |= {"_id": pushed.id, "run_at": stored["run_at"], "dedupe_slot": "read-back"}
    same_bson(stored, expected)


async def test_a_stored_rich_task_reads_back_whole() -> None:
    pushed = await Rich(own_id=PydanticObjectId()).push()
    claimed = await Rich.pop()
    assert claimed is not None and claimed.id == pushed.id
    assert claimed.when == pushed.when and claimed.created_at.tzinfo is timezone.utc  # UtcDatetime normalises
    assert claimed.points == pushed.points and claimed.mapping["a"] == [1, 2]  # a Decimal in a dict reads as Decimal128
    assert claimed.amount == Decimal("12.50") and claimed.key == pushed.key and bytes(claimed.raw) == b"\x00\x01"
    assert claimed.state is State.RUNNING
    await claimed.finish()


async def test_an_excluded_field_is_stored_as_the_installed_beanie_stores_it() -> None:
    document = draft_of(Rich()).document
    assert ("hidden" in document) is (BEANIE_MAJOR < 2)


async def test_the_form_is_read_again_after_init_beanie(init_tasks: Any) -> None:
    first = stored_document(Child(id=PydanticObjectId()))
    await init_tasks(*MODELS)
    again = stored_document(Child(id=PydanticObjectId()))
    assert list(first) == list(again) and first["_class_id"] == again["_class_id"]


# ------------------------------------------------------------ validation


async def test_a_field_assigned_since_building_is_validated_at_push() -> None:
    task = Checked(low=1, high=5)
    task.low = 9  # no validate_assignment: pydantic takes it as it is
    with pytest.raises(ValidationError, match="low must not exceed high"):
        await task.push()
    assert task.id is None
    assert await Checked.find_all().count() == 0


async def test_a_value_changed_in_place_is_validated_at_push() -> None:
    task = Checked(items=[1, 2])
    task.items.append(500)
    with pytest.raises(ValidationError, match="at most 100"):
        await task.push()
    assert await Checked.find_all().count() == 0


async def test_a_wrong_type_set_since_building_is_validated_at_push() -> None:
    task = Checked()
    task.high = "ten"  # type: ignore[assignment]
    with pytest.raises(ValidationError, match="high"):
        await task.push()


async def test_an_unchanged_task_pushes_as_it_was_built() -> None:
    task = Checked(low=2, high=3, items=[4])
    pushed = await task.push()
    stored = await Checked.get(pushed.id)
    assert stored is not None and (stored.low, stored.high, stored.items) == (2, 3, [4])


async def test_a_named_priority_is_stored_and_kept_as_a_plain_int() -> None:
    task = Child(priority=Priority.HIGH)
    assert type(task.priority) is int
    document = draft_of(task).document
    assert type(document["priority"]) is int and document["priority"] == 3


# ------------------------------------------------------------ building tasks


async def test_private_attributes_start_fresh_and_a_subclass_post_init_runs() -> None:
    first, second = WithOwnPrivates(), WithOwnPrivates()
    first._seen.append("x")
    first._shared_default.append("y")
    assert second._seen == [] and second._shared_default == []
    assert first._posted == 1 and second._posted == 1
    assert not first.is_settled and first._push_id is None


async def test_a_claimed_task_of_a_class_with_its_own_init_is_built_through_it() -> None:
    await Built().push()
    claimed = await Built.pop()
    assert claimed is not None and claimed.built_by_init
    await claimed.finish()


async def test_lazy_parsing_gives_whole_tasks() -> None:
    await Rich(own_id=PydanticObjectId()).push()
    found = await Rich.find_all(lazy_parse=True).to_list()
    assert len(found) == 1
    task = found[0]
    assert task.amount == Decimal("12.50") and isinstance(task.point, Point) and task.state is State.CREATED
