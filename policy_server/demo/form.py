"""The observation form as data: `/schema`'s observations → fields, their example and random values,
and the parsing and checking of list fields typed as text. No streamlit here."""

import math
import random
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

Scalar = int | float | bool
Value = Scalar | list[Scalar]

SHORT_LIST = 8  # fixed-length lists up to this long get one input per element; longer ones a text area
RANDOM_SPAN = 2.0  # a value without bounds is drawn within this of its one bound (or of 0)
DECIMALS = 2  # what a float number input shows, so random values are what the user sees


class Widget(Enum):
    SCALAR = "scalar"  # a number input, or a checkbox for a bool
    ELEMENTS = "elements"  # one input per list element
    TEXT = "text"  # a text area of comma-separated values
    MASK = "mask"  # the action mask: one checkbox per action, labelled


@dataclass(frozen=True)
class Field:
    name: str
    element: str  # "int", "float" or "bool": the type of the value, or of each list element
    widget: Widget
    is_list: bool = False
    length: int = 1  # of the example and random values of a list
    min_items: int | None = None
    max_items: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str | None = None
    labels: tuple[str, ...] = ()  # the mask's action labels
    head_sizes: tuple[int, ...] = ()  # the mask's actions per discrete head, in order

    def bounds(self) -> tuple[Scalar | None, Scalar | None]:
        """minimum and maximum in the element's type (an int field's bounds rounded inwards): streamlit's
        number inputs refuse bounds of another type than their value."""
        if self.element == "int":
            low = None if self.minimum is None else math.ceil(self.minimum)
            return low, None if self.maximum is None else math.floor(self.maximum)
        return _float_or_none(self.minimum), _float_or_none(self.maximum)


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def fields(schema: dict[str, Any]) -> list[Field]:
    """One field per observation of `/schema`, in order; [] when the schema declares none."""
    observations: dict[str, dict[str, Any]] = schema.get("observations") or {}
    heads = [head for head in schema.get("actions") or [] if head.get("kind") == "discrete"]
    lengths = _list_lengths(observations, schema.get("input_size"))
    return [_field(name, spec, lengths[name], heads if name == schema.get("action_mask") else None) for name, spec in observations.items()]


def _list_lengths(observations: dict[str, dict[str, Any]], input_size: int | None) -> dict[str, int]:
    """Each observation's length in the model's input row. A list without a fixed length is given what the
    row has left when it is the only such list; otherwise min_items (or 1), which the user may have to change."""
    fixed = {name: _fixed_length(spec) for name, spec in observations.items()}
    free = [name for name, length in fixed.items() if length is None]
    spare = (input_size or 0) - sum(length or 0 for length in fixed.values())
    lengths = {name: length or observations[name].get("min_items") or 1 for name, length in fixed.items()}
    if len(free) == 1 and _fits(observations[free[0]], spare):
        lengths[free[0]] = spare
    return lengths


def _fixed_length(spec: dict[str, Any]) -> int | None:
    if not spec["type"].startswith("List["):
        return 1
    return spec["min_items"] if spec.get("min_items") is not None and spec.get("min_items") == spec.get("max_items") else None


def _fits(spec: dict[str, Any], length: int) -> bool:
    return (spec.get("min_items") or 0) <= length <= (spec.get("max_items") or length) and length > 0


def _field(name: str, spec: dict[str, Any], length: int, mask_heads: list[dict[str, Any]] | None) -> Field:
    type_name: str = spec["type"]
    is_list = type_name.startswith("List[")
    fixed = _fixed_length(spec) is not None
    mask_labels = action_labels(mask_heads or [])
    if not is_list:
        widget = Widget.SCALAR
    elif fixed and type_name == "List[bool]" and mask_heads and len(mask_labels) == length:
        widget = Widget.MASK
    elif fixed and length <= SHORT_LIST:
        widget = Widget.ELEMENTS
    else:
        widget = Widget.TEXT
    return Field(
        name=name,
        element=type_name[5:-1] if is_list else type_name,
        widget=widget,
        is_list=is_list,
        length=length,
        min_items=spec.get("min_items"),
        max_items=spec.get("max_items"),
        minimum=spec.get("minimum"),
        maximum=spec.get("maximum"),
        description=spec.get("description"),
        labels=tuple(mask_labels) if widget is Widget.MASK else (),
        head_sizes=tuple(head["n"] for head in mask_heads or []) if widget is Widget.MASK else (),
    )


def action_labels(heads: list[dict[str, Any]]) -> list[str]:
    """The label of every action of the discrete `heads`, concatenated in order (as the mask is);
    prefixed by the head's name when there are several heads, numbered when the head has no labels."""
    several = len(heads) > 1
    return [f"{head['name']}: {label}" if several else label for head in heads for label in head_labels(head)]


def head_labels(head: dict[str, Any]) -> list[str]:
    """A discrete head's labels, or its action numbers when it has none."""
    return [str(label) for label in head.get("labels") or range(head["n"])]


def example_value(field: Field) -> Value:
    """A value the server accepts: the middle of the bounds, False, and a mask that allows everything."""
    if field.widget is Widget.MASK:
        return [True] * len(field.labels)
    scalar = _example_scalar(field)
    return [scalar] * field.length if field.is_list else scalar


def _example_scalar(field: Field) -> Scalar:
    if field.element == "bool":
        return False
    low, high = field.bounds()
    if low is not None and high is not None:
        middle = (low + high) / 2
        return math.floor(middle) if field.element == "int" else middle
    value = low if low is not None else high if high is not None else 0
    return value if field.element == "int" else float(value)


def random_value(field: Field, rng: random.Random) -> Value:
    """A random value the server accepts; a random mask still allows one action of each head."""
    if field.widget is Widget.MASK:
        return _random_mask(field, rng)
    if field.is_list:
        return [_random_scalar(field, rng) for _ in range(field.length)]
    return _random_scalar(field, rng)


def _random_scalar(field: Field, rng: random.Random) -> Scalar:
    if field.element == "bool":
        return rng.random() < 0.5
    low, high = field.bounds()
    if low is None:
        low = high - RANDOM_SPAN if high is not None else -RANDOM_SPAN / 2
    if high is None:
        high = low + RANDOM_SPAN
    if field.element == "int":
        return rng.randint(int(low), int(high))
    return min(max(round(rng.uniform(low, high), DECIMALS), low), high)


def _random_mask(field: Field, rng: random.Random) -> list[bool]:
    """Each action allowed with probability 1/2, then one allowed action forced in any head left with none."""
    mask = [rng.random() < 0.5 for _ in field.labels]
    start = 0
    for size in field.head_sizes:
        head = range(start, start + size)
        if not any(mask[i] for i in head):
            mask[rng.choice(head)] = True
        start += size
    return mask


def format_list(values: list[Scalar]) -> str:
    return ", ".join(str(value).lower() if isinstance(value, bool) else str(value) for value in values)


def parse_list(field: Field, text: str) -> tuple[list[Scalar], list[str]]:
    """The values typed in a list field's text area (commas or spaces between them, brackets optional),
    and what is wrong with them: not numbers, out of bounds, too few or too many."""
    tokens = [token for token in re.split(r"[\s,]+", text.strip().strip("[]")) if token]
    values: list[Scalar] = []
    problems: list[str] = []
    for index, token in enumerate(tokens):
        try:
            value = _parse_scalar(field, token)
        except ValueError as exc:
            problems.append(f"{field.name}[{index}]: {exc}")
            continue
        values.append(value)
        problems.extend(f"{field.name}[{index}]: {problem}" for problem in _bound_problems(field, value))
    problems.extend(_length_problems(field, len(tokens)))
    return values, problems


def _parse_scalar(field: Field, token: str) -> Scalar:
    if field.element == "bool":
        words = {"true": True, "1": True, "false": False, "0": False}
        if token.lower() not in words:
            raise ValueError(f"{token!r} is not true or false")
        return words[token.lower()]
    try:
        number = float(token)
    except ValueError:
        raise ValueError(f"{token!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{token!r} is not a finite number")
    if field.element == "int":
        if not number.is_integer():
            raise ValueError(f"{token!r} is not a whole number")
        return int(number)
    return number


def _bound_problems(field: Field, value: Scalar) -> list[str]:
    low, high = field.bounds()
    if isinstance(value, bool):
        return []
    if low is not None and value < low:
        return [f"{value} is below the minimum {low}"]
    if high is not None and value > high:
        return [f"{value} is above the maximum {high}"]
    return []


def _length_problems(field: Field, count: int) -> list[str]:
    if field.min_items is not None and count < field.min_items:
        return [f"{field.name}: {count} values, at least {field.min_items} needed"]
    if field.max_items is not None and count > field.max_items:
        return [f"{field.name}: {count} values, at most {field.max_items} allowed"]
    return []
