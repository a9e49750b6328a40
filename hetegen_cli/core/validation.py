"""Checking what hetegen reads (documents, configs, headers) against a pydantic schema, with
one clear error that names the file, the field and what was expected (docs/validation.md).

Schemas use the strict field types below: no coercion ("1" is not 1, true is not 1), finite
floats only (no NaN or infinity), sizes bounded so later arithmetic cannot overflow.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from hetegen_cli.core.errors import HetegenError

#: the largest count or size accepted anywhere (2**53: exact as a float, far beyond any machine)
MAX_INT = 2**53

Count = Annotated[StrictInt, Field(ge=1, le=MAX_INT)]  # >= 1
Index = Annotated[StrictInt, Field(ge=0, le=MAX_INT)]  # >= 0 (sizes in bytes, rows, counts)
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e300, le=1e300)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1e300)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1e300)]
Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]
Text = StrictStr
Flag = StrictBool

T = TypeVar("T", bound=BaseModel)


class Schema(BaseModel):
    """A JSON object with these fields at least (extra fields are allowed and ignored)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Closed(Schema):
    """A JSON object with exactly these fields."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


#: pydantic's wording for the common type errors, said in JSON's terms
_MESSAGES = {
    "dict_type": "should be a JSON object",
    "model_type": "should be a JSON object",
    "model_attributes_type": "should be a JSON object",
    "list_type": "should be a JSON list",
    "tuple_type": "should be a JSON list",
    "int_type": "should be a whole number",
    "float_type": "should be a number",
    "string_type": "should be a string",
    "bool_type": "should be true or false",
    "finite_number": "should be a finite number",
    "extra_forbidden": "is not a known field",
}


def describe(exc: ValidationError) -> str:
    """The first problem of a ValidationError as 'field a.b[2].c: <what> (got <value>)'."""
    first = exc.errors()[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = _MESSAGES.get(first["type"]) or str(first["msg"])
    message = message[:1].lower() + message[1:]
    if message.startswith("value error, "):
        message = message.removeprefix("value error, ")
    more = len(exc.errors()) - 1
    tail = f"; {more} more problem{'s' if more > 1 else ''}" if more > 0 else ""
    if first["type"] == "missing":
        return f"field {where} is missing{tail}"
    # a whole-object check (where is empty) says what is wrong itself
    shown = f" (got {_short(first.get('input'))})" if where else ""
    return (f"field {where}: {message}" if where else message) + shown + tail


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(schema: type[T], data: Any, *, source: str, error: type[HetegenError], hint: str) -> T:
    """`schema.model_validate(data)`, or `error(f"{source}: <the first problem>", hint)`."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise error(f"{source}: {describe(exc)}", hint) from None
    except (OverflowError, RecursionError, TypeError) as exc:  # values pydantic cannot even compare
        raise error(f"{source}: a value is out of range ({exc.__class__.__name__})", hint) from None
