"""Tasks to stored documents and back, without Beanie's and pydantic's generic walks on every call.

Every push encodes a task and every claim builds one, so what Beanie and pydantic work
out generically each time (which fields are stored under which keys, which values need
converting, which private attributes a model starts with) is worked out here once per
class and replayed. The results are the same by construction: the keys a class stores
are read off Beanie's own ``get_dict`` of a probe, values that are already BSON pass
through as Beanie's ``Encoder`` passes them, and every other value goes through that
very ``Encoder``. A class this cannot mirror exactly (links, extra fields) is encoded by
Beanie itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from operator import is_
from typing import Any, TypeVar
from uuid import UUID

from beanie import Document
from beanie.odm.utils.dump import get_dict
from beanie.odm.utils.encoder import BSON_SCALAR_TYPES, Encoder
from bson import ObjectId
from pydantic import BaseModel, PrivateAttr
from pydantic_core import PydanticUndefined

from beanie_tasks.states import State

Model = TypeVar("Model", bound=BaseModel)

# Types whose values cannot change in place: a task holding only these is exactly as validated while
# each value is the very object validation produced.
IMMUTABLE_TYPES = frozenset({type(None), bool, int, float, str, bytes, datetime, date, time, timedelta, Decimal, UUID})

# Beanie's encoder for values outside a document (a task's result), shared: encoding changes no state of it.
VALUE_ENCODER = Encoder(to_db=True)
_value_passes: dict[type, bool] = {}


def encode_value(value: Any) -> Any:
    """``Encoder(to_db=True).encode(value)``, without the call for a value that is BSON already."""
    kind = type(value)
    passes = _value_passes.get(kind)
    if passes is None:
        passes = _value_passes[kind] = issubclass(kind, BSON_SCALAR_TYPES)
    return value if passes else VALUE_ENCODER.encode(value)


# ------------------------------------------------------------- the stored form


@dataclass
class StoredForm:
    """How Beanie stores one class's documents, read off ``get_dict`` once (``init_beanie`` rebuilds settings)."""

    settings: Any
    exact: bool  # False: the class is encoded by Beanie itself, field by field
    header: dict[str, Any] = field(default_factory=dict)  # what Beanie puts first: the class id of inheritance
    keys: dict[str, str] = field(default_factory=dict)  # stored field name -> its key, in field order
    names: frozenset[str] = frozenset()  # every field name, stored or not
    # The common shape: ``id`` first, stored as ``_id``, every other field under its own name
    # but for ``unstored`` ones (Beanie's ``revision_id``).
    plain: bool = False
    unstored: tuple[str, ...] = ()
    encoder: Encoder = field(default_factory=Encoder)  # Beanie's, with the class's bson_encoders
    passing: set[type] = field(default_factory=set)  # value types seen to be stored as they are

    def encode(self, value: Any) -> Any:
        """Beanie's encoding of one field value; remembers the types it returns unchanged.

        Those are BSON already and claimed by none of the class's custom encoders.
        """
        kind = type(value)
        custom = self.encoder.custom_encoders
        claimed = kind in custom or any(isinstance(c, type) and issubclass(kind, c) for c in custom)
        if not claimed and issubclass(kind, BSON_SCALAR_TYPES):
            self.passing.add(kind)
            return value
        return self.encoder.encode(value)


_forms: dict[type, StoredForm] = {}


def read_stored_form(task_class: type[Document], settings: Any) -> StoredForm:
    """Ask Beanie which keys it stores, by encoding a probe whose every field is set."""
    if task_class.get_link_fields():
        return StoredForm(settings, exact=False)
    fields = task_class.model_fields
    try:
        probe = task_class.model_construct(**dict.fromkeys(fields))
        probe.id = ObjectId()  # so that ``_id`` is among the keys (Beanie leaves it out while None)
        sample = get_dict(probe, to_db=True, keep_nulls=True)
    except Exception:  # a custom encoder that refuses None: let Beanie encode this class
        return StoredForm(settings, exact=False)
    named = {name: info.alias or name for name, info in fields.items()}
    keys = {name: key for name, key in named.items() if key in sample}
    header = {key: value for key, value in sample.items() if key not in named.values()}
    # Beanie writes the header first; a field stored under a header key would move it.
    if list(sample)[: len(header)] != list(header) or named.get("id") != "_id":
        return StoredForm(settings, exact=False)
    plain = next(iter(named)) == "id" and all(key == name for name, key in keys.items() if name != "id")
    return StoredForm(
        settings,
        exact=True,
        header=header,
        keys=keys,
        names=frozenset(named),
        plain=plain,
        unstored=tuple(name for name in named if name not in keys),
        encoder=Encoder(custom_encoders=settings.bson_encoders, to_db=True, keep_nulls=True),
    )


def stored_document(task: Document) -> dict[str, Any]:
    """What ``get_dict(task, to_db=True, keep_nulls=True)`` returns, key for key and value for value."""
    task_class = type(task)
    settings = task_class.get_settings()
    form = _forms.get(task_class)
    if form is None or form.settings is not settings:
        form = _forms[task_class] = read_stored_form(task_class, settings)
    values = task.__dict__
    # Beanie's own walk for what this does not mirror: links, extra fields, attributes set outside the model.
    if not form.exact or task.__pydantic_extra__ or not values.keys() <= form.names:
        return dict(get_dict(task, to_db=True, keep_nulls=True))
    if form.plain and form.passing.issuperset(map(type, values.values())):
        # Every value BSON already: the fields as they are, ``id`` renamed in its place (all in C).
        document = form.header | {"_id": values.get("id")} | values
        del document["id"]
        for name in form.unstored:
            document.pop(name, None)
    else:
        keys, passing, encode = form.keys, form.passing, form.encode
        document = form.header | {
            keys[name]: value if type(value) in passing else encode(value)
            for name, value in values.items()
            if name in keys
        }
    if document.get("_id", True) is None:
        del document["_id"]  # Beanie leaves out an unset id
    return document


# What ``State(value)`` returns, looked up without the enum's call.
STATES = {state.value: state for state in State}


def assign(task: BaseModel, values: dict[str, Any]) -> None:
    """Set fields decided by the server (a state as ``State``), as plain assignments would.

    pydantic's ``__setattr__`` of a field stores it and marks it set; that is done here in
    one step, unless the class validates assignments, which then get their validation.
    """
    changes = dict(values)
    if "state" in changes:
        changes["state"] = STATES.get(changes["state"]) or State(changes["state"])
    if type(task).model_config.get("validate_assignment"):
        for name, value in changes.items():
            setattr(task, name, value)
        return
    task.__dict__.update(changes)
    task.__pydantic_fields_set__.update(changes)


# ------------------------------------------------------------- validated once

_immutable: set[type] = set(IMMUTABLE_TYPES)


def holds_immutable(kind: type) -> bool:
    if kind in _immutable:
        return True
    if issubclass(kind, (Enum, ObjectId)):  # an enum member, an ObjectId (PydanticObjectId): fixed values
        _immutable.add(kind)
        return True
    return False


def validated_values(task: BaseModel) -> tuple[Any, ...] | None:
    """What validation just produced, for ``unchanged_since``; None when a value could change in place."""
    values = tuple(task.__dict__.values())
    if _immutable.issuperset(map(type, values)) or all(holds_immutable(type(value)) for value in values):
        return values
    return None


def copy_if_unchanged(task: Model, snapshot: tuple[Any, ...] | None, decided: dict[str, Any]) -> Model | None:
    """A copy of ``task`` with ``decided`` fields set (marked set, as assignments mark them), if every
    field still holds the very object validation produced (``snapshot``); None when one may not.

    Validating such a task again would build the same values, so the copy stands for it.
    """
    values = task.__dict__
    if snapshot is None or task.__pydantic_extra__ or len(values) != len(snapshot):
        return None
    if not all(map(is_, values.values(), snapshot)):
        return None
    kind = type(task)
    twin = kind.__new__(kind)
    object.__setattr__(twin, "__dict__", values | decided)
    object.__setattr__(twin, "__pydantic_extra__", None if task.__pydantic_extra__ is None else {})
    object.__setattr__(twin, "__pydantic_fields_set__", task.__pydantic_fields_set__ | decided.keys())
    private = task.__pydantic_private__
    object.__setattr__(twin, "__pydantic_private__", None if private is None else dict(private))
    return twin


# ------------------------------------------------------------- private attributes


@dataclass(frozen=True)
class PrivateDefaults:
    """The private attributes a new model starts with, as pydantic's ``init_private_attributes`` builds them."""

    template: dict[str, Any]
    factories: tuple[tuple[str, Callable[[], Any]], ...]

    @classmethod
    def of(cls, model_class: type[BaseModel]) -> PrivateDefaults | None:
        """None when a default needs pydantic's own handling (copied defaults, factories of validated data)."""
        template: dict[str, Any] = {}
        factories = []
        for name, attribute in model_class.__private_attributes__.items():
            if attribute.default_factory is not None:
                if attribute.default_factory_takes_validated_data:
                    return None
                template[name] = None  # its place in the order; the factory fills it
                factories.append((name, attribute.default_factory))
            elif attribute.default is PydanticUndefined:
                continue
            elif type(attribute.default) in IMMUTABLE_TYPES:
                template[name] = attribute.default
            else:
                return None
        return cls(template, tuple(factories))  # type: ignore[arg-type]

    def build(self) -> dict[str, Any]:
        values = dict(self.template)
        for name, factory in self.factories:
            values[name] = factory()
        return values


class _PrivateProbe(BaseModel):
    """A model whose ``model_post_init`` is pydantic's own private-attribute initialiser and nothing else."""

    _probe: Any = PrivateAttr(default=None)


PYDANTIC_PRIVATE_INIT = _PrivateProbe.model_post_init


def innermost(hook: Any) -> Any:
    """The function a chain of ``functools.wraps`` wrappers ends in (pydantic wraps a base's hook once per subclass)."""
    while hasattr(hook, "__wrapped__"):
        hook = hook.__wrapped__
    return hook


# Set on the hooks ``speed_up_private_init`` installs, so a subclass's can replace its base's.
OWN_HOOK = "initialises_private_attributes_only"


def speed_up_private_init(model_class: type[BaseModel]) -> None:
    """Give ``model_class`` a ``model_post_init`` that builds its private attributes from ``PrivateDefaults``.

    pydantic calls ``model_post_init`` on every new model, and its own walks every private
    attribute's default (Beanie's four and the task's). Replaced only where that is all the
    hook does: a class (or base) with its own ``model_post_init`` keeps pydantic's chain.
    """
    inner = innermost(model_class.model_post_init)
    if inner is not PYDANTIC_PRIVATE_INIT and not getattr(inner, OWN_HOOK, False):
        return
    defaults = PrivateDefaults.of(model_class)
    if defaults is None:
        return

    template, factories = defaults.template, defaults.factories

    def model_post_init(self: BaseModel, context: Any, /) -> None:
        if getattr(self, "__pydantic_private__", None) is None:
            values = dict(template)
            for name, factory in factories:
                values[name] = factory()
            object.__setattr__(self, "__pydantic_private__", values)

    setattr(model_post_init, OWN_HOOK, True)
    type.__setattr__(model_class, "model_post_init", model_post_init)
