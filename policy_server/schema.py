"""schema.yaml → one immutable `PolicySpec`.

Backward compatible with every Pathmind schema (`parameters` and `observations` are theirs);
`actions`, `action_mask`, `model` and `serving` are our optional extensions. Every mistake in the
file is a `ConfigError` naming the file, the key and the fix. Type strings are matched against a
whitelist, never evaluated.
"""

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from policy_server.errors import ConfigError

ScalarKind = Literal["int", "float", "bool"]
SCALAR_KINDS: tuple[ScalarKind, ...] = ("int", "float", "bool")
ALLOWED_TYPES = ("int", "float", "bool", "List[int]", "List[float]", "List[bool]")
_LIST_TYPE = re.compile(r"^list\[(int|float|bool)\]$", re.IGNORECASE)
_UNQUOTED_LIST_TYPE = re.compile(r"(\btype\s*:\s*)(List\[\s*\w+\s*\])", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_URL_PATH = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ObservationField:
    """One named observation: a scalar or a list of scalars."""

    name: str
    kind: ScalarKind
    is_list: bool = False
    min_items: int | None = None
    max_items: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    description: str | None = None

    @property
    def type_name(self) -> str:
        return f"List[{self.kind}]" if self.is_list else self.kind

    @property
    def width(self) -> int | None:
        """How many columns this field takes in the model's input row (None: varies)."""
        if not self.is_list:
            return 1
        if self.min_items is not None and self.min_items == self.max_items:
            return self.min_items
        return None


@dataclass(frozen=True)
class DiscreteHead:
    name: str
    n: int
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ContinuousHead:
    name: str
    size: int
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None


Head = DiscreteHead | ContinuousHead


@dataclass(frozen=True)
class Serving:
    backend: str = "local"
    max_batch_size: int = 64
    # 0: a batch leaves as soon as the worker is free; requests arriving meanwhile form the next
    # one. Waiting by default would add its whole wait to every lone request's latency.
    batch_wait_ms: float = 0.0
    replicas: int = 1
    num_gpus: float | Literal["auto"] = "auto"
    version: str | None = None  # pins the version served (models/N/); None: the highest


@dataclass(frozen=True)
class Experience:
    """Where and how the policy's decisions are logged (policy_server/experience/)."""

    dir: Path  # absolute: a relative `dir` is read from the schema's folder
    flush_s: float = 1.0  # at most this much of what was accepted is lost to a SIGKILL
    rotate_mb: float = 64.0  # a Parquet file is closed at this size...
    rotate_minutes: float = 60.0  # ...or this age, and the next one begun
    max_pending_rows: int = 200_000  # rows not yet on disk beyond which episodes get 503s


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a recurrent policy's state, per row: `shape` leaves out the batch dimension."""

    name: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Recurrent:
    """A policy with memory (policy_server/recurrent/): the state tensors its model takes after the
    observation rows and returns after its outputs, and how many episodes' states are kept, how long."""

    state: tuple[StateTensor, ...]
    idle_expiry_s: float = 900.0  # an episode idle this long is forgotten; its next step answers 409
    max_episodes: int = 10_000  # beyond, the least recently used episode is forgotten (409 likewise)

    @property
    def width(self) -> int:
        """Values of all state tensors of one row, as the server keeps them (flat, in order)."""
        return sum(tensor.width for tensor in self.state)


@dataclass(frozen=True)
class PolicySpec:
    """A parsed, validated schema.yaml."""

    path: Path
    discrete: bool
    name: str = "policy"  # names the API, its docs and its SDKs
    is_tuple: bool = False  # several action heads (parameters.tuple)
    api_key: str | None = field(default=None, repr=False)
    url_path: str | None = None  # normalised: "/api/v1", or None
    observations: tuple[ObservationField, ...] | None = None  # None: only /predict_raw
    actions: tuple[Head, ...] | None = None  # None: inferred from the model's outputs
    action_mask: str | None = None
    model_path: Path | None = None  # None: the model file found in models/
    serving: Serving = Serving()
    experience: Experience | None = None  # None: not logged (unless POLICY_SERVER_EXPERIENCE_DIR)
    recurrent: Recurrent | None = None  # None: a policy without memory

    @property
    def input_size(self) -> int | None:
        """Columns of the model's input row, when every list has a fixed length."""
        if self.observations is None:
            return None
        widths = [obs.width for obs in self.observations]
        return None if None in widths else sum(w for w in widths if w is not None)

    def columns_of(self, name: str) -> slice | None:
        """Where an observation sits in the row; None when a variable list comes before it."""
        start = 0
        for obs in self.observations or ():
            if obs.width is None:
                return None
            if obs.name == name:
                return slice(start, start + obs.width)
            start += obs.width
        return None

    def public_dict(self) -> dict[str, Any]:
        """The schema as JSON for /schema: everything but the api key."""
        return {
            "name": self.name,
            "parameters": {"discrete": self.discrete, "tuple": self.is_tuple, "url_path": self.url_path},
            "observations": None
            if self.observations is None
            else {
                obs.name: {
                    key: value
                    for key, value in {
                        "type": obs.type_name,
                        "min_items": obs.min_items,
                        "max_items": obs.max_items,
                        "minimum": obs.minimum,
                        "maximum": obs.maximum,
                        "description": obs.description,
                    }.items()
                    if value is not None
                }
                for obs in self.observations
            },
            "action_mask": self.action_mask,
            "serving": {
                "backend": self.serving.backend,
                "max_batch_size": self.serving.max_batch_size,
                "batch_wait_ms": self.serving.batch_wait_ms,
                "replicas": self.serving.replicas,
                "num_gpus": self.serving.num_gpus,
            },
            "recurrent": None
            if self.recurrent is None
            else {
                "state": [{"name": tensor.name, "shape": list(tensor.shape)} for tensor in self.recurrent.state],
                "idle_expiry_seconds": self.recurrent.idle_expiry_s,
                "max_episodes": self.recurrent.max_episodes,
            },
        }


def load_spec(path: Path) -> PolicySpec:
    """Read and validate one schema.yaml."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "file", f"cannot be read ({exc.strerror})", "check the path and its permissions") from None
    return parse_spec(data, path)


def parse_spec(data: bytes, path: Path) -> PolicySpec:
    """Validate schema.yaml's bytes; `path` is only named in errors and names the policy."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "file", f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    document = _read_yaml(text, path)
    reader = _Reader(path)
    reader.known_keys(
        document, "", ("name", "parameters", "observations", "actions", "action_mask", "model", "serving", "experience", "recurrent")
    )
    parameters = reader.mapping(document.get("parameters"), "parameters", required=True)
    reader.known_keys(parameters, "parameters", ("discrete", "tuple", "api_key", "url_path"))
    if "discrete" not in parameters:
        raise ConfigError(
            path, "parameters.discrete", "is missing", "add 'discrete: true' (integer actions) or 'discrete: false' (continuous)"
        )
    discrete = reader.boolean(parameters["discrete"], "parameters.discrete")
    is_tuple = reader.boolean(parameters.get("tuple", False), "parameters.tuple")
    observations = _observations(reader, document.get("observations"))
    actions = _actions(reader, document.get("actions"), discrete=discrete, is_tuple=is_tuple)
    spec = PolicySpec(
        path=path,
        discrete=discrete,
        name=_name(reader, document.get("name"), path),
        is_tuple=is_tuple,
        api_key=_api_key(parameters.get("api_key")),
        url_path=_url_path(reader, parameters.get("url_path")),
        observations=observations,
        actions=actions,
        action_mask=_action_mask(reader, document, observations, discrete),
        model_path=_model_path(reader, document.get("model")),
        serving=_serving(reader, document.get("serving")),
        experience=_experience(reader, document.get("experience"), path),
        recurrent=_recurrent(reader, document.get("recurrent")),
    )
    _check_mask_length(spec)
    return spec


def _read_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        documents = [doc for doc in yaml.load_all(_quote_list_types(text), Loader=_SchemaLoader) if doc is not None]
    except _RefusedYaml as refused:
        raise ConfigError(path, refused.key, refused.problem, refused.fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, "yaml", f"not valid YAML at {where}: {problem}", "fix the indentation or quoting there") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ConfigError(path, "yaml", "must hold one mapping with a 'parameters' key", "see examples/mouse_and_cheese/schema.yaml")
    return documents[0]


# Far beyond any real schema (the largest here has ~110 nodes and 5 levels), far below
# what hangs: a "billion laughs" of 1 KB (aliases of aliases of ...) expands to ~10^9 nodes.
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _RefusedYaml(Exception):
    """Valid YAML the schema reader does not take: the `ConfigError`'s key, problem and fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem, self.fix = key, problem, fix


def _too_deep(where: str) -> _RefusedYaml:
    return _RefusedYaml("yaml", f"nested deeper than {MAX_YAML_DEPTH} levels {where}", "no schema needs that: flatten it")


class _SchemaLoader(yaml.SafeLoader):
    """`yaml.safe_load`, refusing what would hang start-up or silently change the schema: nesting
    deeper than MAX_YAML_DEPTH (the composer recurses), aliases that expand the document beyond
    MAX_YAML_NODES or MAX_YAML_DEPTH, and a key given twice in one mapping (YAML keeps the last
    one without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _too_deep(f"at line {self.peek_event().start_mark.line + 1}")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        document = super().compose_document()
        if document is not None:
            _expanded_shape(document, 1, {})
            self._refuse_repeated_keys(document, "")
        return document

    def _refuse_repeated_keys(self, node: yaml.Node, where: str) -> None:
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_repeated_keys(item, f"{where}[{index}]")
        elif isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue  # a merge ('<<: *defaults') is meant to be overridden
                key = self.construct_object(key_node)
                name = f"{where}.{key}" if where else str(key)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise _RefusedYaml(name, f"defined twice (lines {lines[key]} and {line})", "remove or rename one of them")
                lines[key] = line
                self._refuse_repeated_keys(value_node, name)


def _expanded_shape(node: yaml.Node, depth: int, shapes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(nodes, levels) of `node` once every alias is replaced by a copy of its anchor, as found at
    `depth`; measured once per node, so in time linear in the text, and refused beyond the limits
    (an alias inside its own anchor is endlessly deep)."""
    if depth > MAX_YAML_DEPTH:
        raise _too_deep("once its aliases (*name) are expanded")
    if id(node) not in shapes:
        if isinstance(node, yaml.ScalarNode):
            shapes[id(node)] = (1, 1)
        else:
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
            measured = [_expanded_shape(child, depth + 1, shapes) for child in children]
            shapes[id(node)] = (1 + sum(size for size, _ in measured), 1 + max((levels for _, levels in measured), default=0))
    size, levels = shapes[id(node)]
    if size > MAX_YAML_NODES:
        raise _RefusedYaml(
            "yaml",
            f"its aliases (*name) expand it beyond {MAX_YAML_NODES} values",
            "write the schema out without nesting aliases in aliases",
        )
    if depth - 1 + levels > MAX_YAML_DEPTH:
        raise _too_deep("once its aliases (*name) are expanded")
    return size, levels


def _quote_list_types(text: str) -> str:
    """`{type: List[bool]}` is invalid YAML (a '[' inside a flow mapping), yet it is how people
    write a one-line observation, DESIGN.md's example included: quote such type strings."""
    return _UNQUOTED_LIST_TYPE.sub(r'\1"\2"', text)


class _Reader:
    """Type checks that name the file and the key of whatever is wrong."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.path, key, problem, fix)

    def known_keys(self, mapping: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
                raise self.fail(f"{where}.{key}" if where else str(key), "unknown key", hint)

    def mapping(self, value: Any, key: str, required: bool = False) -> dict[str, Any]:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping of keys to values", f"indent the entries of '{key}' under it")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}", f"write '{key.rsplit('.', 1)[-1]}: true' or false")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {value!r}", "write a plain number such as 0 or 1.5")
        return float(value)

    def count(self, value: Any, key: str, smallest: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise self.fail(
                key, f"must be a whole number ≥ {smallest}, not {value!r}", f"write e.g. '{key.rsplit('.', 1)[-1]}: {max(smallest, 4)}'"
            )
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value).strip() == "":
            raise self.fail(key, f"must be a non-empty string, not {value!r}", "quote the text")
        return str(value)


def _parse_type(reader: _Reader, raw: Any, key: str) -> tuple[ScalarKind, bool]:
    allowed = ", ".join(ALLOWED_TYPES)
    if not isinstance(raw, str):
        raise reader.fail(key, f"{raw!r} is not a type", f"use one of {allowed}")
    compact = raw.replace(" ", "")
    if compact in SCALAR_KINDS:
        return compact, False  # type: ignore[return-value]
    match = _LIST_TYPE.match(compact)
    if match:
        return match.group(1).lower(), True  # type: ignore[return-value]
    raise reader.fail(key, f"unknown type {raw!r}", f"use one of {allowed}")


def _observations(reader: _Reader, raw: Any) -> tuple[ObservationField, ...] | None:
    if raw is None:
        return None
    section = reader.mapping(raw, "observations")
    if not section:
        raise reader.fail("observations", "is empty", "declare at least one observation, or remove the key to serve /predict_raw only")
    return tuple(_observation(reader, str(name), spec) for name, spec in section.items())


def _observation(reader: _Reader, name: str, raw: Any) -> ObservationField:
    key = f"observations.{name}"
    entry = reader.mapping(raw, key, required=True)
    reader.known_keys(entry, key, ("type", "min_items", "max_items", "minimum", "maximum", "description"))
    if "type" not in entry:
        raise reader.fail(f"{key}.type", "is missing", f"add 'type:' with one of {', '.join(ALLOWED_TYPES)}")
    kind, is_list = _parse_type(reader, entry["type"], f"{key}.type")
    min_items = _optional(entry, "min_items", lambda v, k: reader.count(v, k), key)
    max_items = _optional(entry, "max_items", lambda v, k: reader.count(v, k, smallest=1), key)
    minimum = _optional(entry, "minimum", reader.number, key)
    maximum = _optional(entry, "maximum", reader.number, key)
    if not is_list and (min_items is not None or max_items is not None):
        raise reader.fail(
            f"{key}.min_items", f"only lists have item counts, and this is a {kind}", f"use type List[{kind}] or remove min_items/max_items"
        )
    if kind == "bool" and (minimum is not None or maximum is not None):
        raise reader.fail(f"{key}.minimum", "booleans have no bounds", "remove minimum/maximum")
    if min_items is not None and max_items is not None and min_items > max_items:
        raise reader.fail(f"{key}.min_items", f"{min_items} is above max_items {max_items}", "make min_items ≤ max_items")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise reader.fail(f"{key}.minimum", f"{minimum} is above maximum {maximum}", "make minimum ≤ maximum")
    description = entry.get("description")
    return ObservationField(
        name=name,
        kind=kind,
        is_list=is_list,
        min_items=min_items,
        max_items=max_items,
        minimum=minimum,
        maximum=maximum,
        description=None if description is None else reader.text(description, f"{key}.description"),
    )


def _optional(entry: Mapping[str, Any], name: str, read: Any, key: str) -> Any:
    return read(entry[name], f"{key}.{name}") if entry.get(name) is not None else None


def _actions(reader: _Reader, raw: Any, discrete: bool, is_tuple: bool) -> tuple[Head, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise reader.fail("actions", "must be a non-empty list of heads", "write '- {name: move, n: 4}' per head")
    heads = tuple(_head(reader, index, entry) for index, entry in enumerate(raw))
    names = [head.name for head in heads]
    if len(set(names)) != len(names):
        raise reader.fail("actions", f"head names repeat: {names}", "give every head its own name")
    for index, head in enumerate(heads):
        if isinstance(head, DiscreteHead) != discrete:
            kind = "discrete (n)" if isinstance(head, DiscreteHead) else "continuous (size)"
            raise reader.fail(
                f"actions[{index}]",
                f"head '{head.name}' is {kind} but parameters.discrete is {str(discrete).lower()}",
                "make the heads and parameters.discrete agree",
            )
    if not is_tuple and len(heads) > 1:
        raise reader.fail("actions", f"{len(heads)} heads but parameters.tuple is false", "set 'tuple: true' or declare one head")
    return heads


def _head(reader: _Reader, index: int, raw: Any) -> Head:
    key = f"actions[{index}]"
    entry = reader.mapping(raw, key, required=True)
    reader.known_keys(entry, key, ("name", "n", "labels", "size", "low", "high"))
    name = reader.text(entry.get("name", f"action_{index}"), f"{key}.name")
    if ("n" in entry) == ("size" in entry):
        raise reader.fail(key, "needs exactly one of 'n' (discrete choices) or 'size' (continuous values)", "write 'n: 4' or 'size: 2'")
    if "n" in entry:
        if "low" in entry or "high" in entry:
            raise reader.fail(f"{key}.low", "a discrete head has no bounds", "remove low/high, or use 'size' for a continuous head")
        n = reader.count(entry["n"], f"{key}.n", smallest=1)
        labels = entry.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or len(labels) != n:
                raise reader.fail(f"{key}.labels", f"must list {n} labels, one per action", f"write {n} labels in a list")
            labels = tuple(reader.text(label, f"{key}.labels") for label in labels)
            if len(set(labels)) != n:
                raise reader.fail(f"{key}.labels", "labels repeat", "give every action its own label")
        return DiscreteHead(name=name, n=n, labels=labels)
    if "labels" in entry:
        raise reader.fail(f"{key}.labels", "a continuous head has no labels", "remove labels, or use 'n' for a discrete head")
    size = reader.count(entry["size"], f"{key}.size", smallest=1)
    low, high = (_bound(reader, entry.get(side), size, f"{key}.{side}") for side in ("low", "high"))
    if low is not None and high is not None and any(lo > hi for lo, hi in zip(low, high, strict=True)):
        raise reader.fail(f"{key}.low", "is above high", "make low ≤ high for every value")
    return ContinuousHead(name=name, size=size, low=low, high=high)


def _bound(reader: _Reader, raw: Any, size: int, key: str) -> tuple[float, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, list):
        if len(raw) != size:
            raise reader.fail(key, f"has {len(raw)} values for a head of size {size}", f"give one number, or {size}")
        return tuple(reader.number(value, key) for value in raw)
    return (reader.number(raw, key),) * size


def _name(reader: _Reader, raw: Any, path: Path) -> str:
    if raw is None:  # the folder the schema is in, e.g. examples/mouse_and_cheese, made plain
        folder = re.sub(r"[^A-Za-z0-9_-]+", "_", path.resolve().parent.name).strip("_-")
        return folder if _NAME.match(folder) else "policy"
    name = reader.text(raw, "name").strip()
    if not _NAME.match(name):
        raise reader.fail("name", f"{name!r} is not a plain name", "use letters, digits, '_' and '-', starting with a letter")
    return name


def _api_key(raw: Any) -> str | None:
    # YAML reads an unquoted 1234567 as a number; the key is its text either way.
    return None if raw is None or str(raw) == "" else str(raw)


def _url_path(reader: _Reader, raw: Any) -> str | None:
    if raw is None:
        return None
    text = reader.text(raw, "parameters.url_path").strip("/")
    if not _URL_PATH.match(text):
        raise reader.fail("parameters.url_path", f"{raw!r} is not a URL path", "write e.g. 'url_path: api/v1'")
    return "/" + text


def _action_mask(
    reader: _Reader, document: Mapping[str, Any], observations: tuple[ObservationField, ...] | None, discrete: bool
) -> str | None:
    names = {obs.name: obs for obs in observations or ()}
    declared = document.get("action_mask")
    if declared is None:
        # Pathmind's convention: an observation named actionMask is the mask.
        return "actionMask" if "actionMask" in names and discrete else None
    name = reader.text(declared, "action_mask")
    if name not in names:
        raise reader.fail(
            "action_mask", f"names '{name}', which is not an observation", f"use one of: {', '.join(names) or '(no observations declared)'}"
        )
    if not discrete:
        raise reader.fail("action_mask", "masks need discrete actions", "remove action_mask, or set parameters.discrete: true")
    return name


def _check_mask_length(spec: PolicySpec) -> None:
    if spec.action_mask is None:
        return
    mask = next(obs for obs in spec.observations or () if obs.name == spec.action_mask)
    if mask.type_name != "List[bool]":
        raise ConfigError(
            spec.path,
            f"observations.{mask.name}.type",
            f"the action mask must be List[bool], not {mask.type_name}",
            "declare it as 'type: List[bool]'",
        )
    if spec.columns_of(mask.name) is None:
        raise ConfigError(
            spec.path,
            f"observations.{mask.name}",
            "the mask's place in the input varies (it or a list before it has no fixed length)",
            "give it and every list before it equal min_items and max_items",
        )
    if spec.actions is not None:
        total = sum(head.n for head in spec.actions if isinstance(head, DiscreteHead))
        if mask.width != total:
            raise ConfigError(
                spec.path,
                f"observations.{mask.name}.max_items",
                f"the mask has {mask.width} entries but the heads have {total} actions",
                f"set min_items and max_items to {total}",
            )


def _model_path(reader: _Reader, raw: Any) -> Path | None:
    section = reader.mapping(raw, "model")
    reader.known_keys(section, "model", ("path",))
    return None if section.get("path") is None else Path(reader.text(section["path"], "model.path"))


def _serving(reader: _Reader, raw: Any) -> Serving:
    section = reader.mapping(raw, "serving")
    reader.known_keys(section, "serving", ("backend", "max_batch_size", "batch_wait_ms", "replicas", "num_gpus", "version"))
    defaults = Serving()
    backend = str(section.get("backend", defaults.backend))
    if backend not in BACKENDS:
        raise reader.fail("serving.backend", f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    num_gpus: float | Literal["auto"] = section.get("num_gpus", defaults.num_gpus)
    if num_gpus != "auto":
        num_gpus = reader.number(num_gpus, "serving.num_gpus")
    wait = reader.number(section.get("batch_wait_ms", defaults.batch_wait_ms), "serving.batch_wait_ms")
    if wait < 0:
        raise reader.fail("serving.batch_wait_ms", "must not be negative", "write 0 to send each batch as soon as possible")
    return Serving(
        backend=backend,
        max_batch_size=reader.count(section.get("max_batch_size", defaults.max_batch_size), "serving.max_batch_size", smallest=1),
        batch_wait_ms=wait,
        replicas=reader.count(section.get("replicas", defaults.replicas), "serving.replicas", smallest=1),
        num_gpus=num_gpus,
        version=_pinned_version(reader, section.get("version")),
    )


_EXPERIENCE_NUMBERS = (("flush_s", "flush_seconds"), ("rotate_mb", "rotate_mb"), ("rotate_minutes", "rotate_minutes"))


def _experience(reader: _Reader, raw: Any, path: Path) -> Experience | None:
    if raw is None:
        return None
    section = reader.mapping(raw, "experience")
    reader.known_keys(section, "experience", ("dir", *(key for _, key in _EXPERIENCE_NUMBERS), "max_pending_rows"))
    if section.get("dir") is None:
        raise reader.fail("experience.dir", "is missing", "name the directory the log goes to, e.g. 'experience: {dir: experience}'")
    defaults = Experience(Path())
    numbers = {}
    for name, key in _EXPERIENCE_NUMBERS:
        numbers[name] = reader.number(section.get(key, getattr(defaults, name)), f"experience.{key}")
        if not 0 < numbers[name] < float("inf"):
            raise reader.fail(f"experience.{key}", "must be a positive number", f"write e.g. '{key}: {getattr(defaults, name)}'")
    pending = reader.count(section.get("max_pending_rows", defaults.max_pending_rows), "experience.max_pending_rows", smallest=1)
    directory = path.resolve().parent / reader.text(section["dir"], "experience.dir")
    return Experience(directory, max_pending_rows=pending, **numbers)


def _pinned_version(reader: _Reader, raw: Any) -> str | None:
    if raw is None:
        return None
    text = str(raw).strip()
    if not text.isdigit():
        raise reader.fail(
            "serving.version", f"{raw!r} is not a version number", "write the number of a folder in models/, e.g. 'version: 2'"
        )
    return str(int(text))


def _recurrent(reader: _Reader, raw: Any) -> Recurrent | None:
    if raw is None:
        return None
    section = reader.mapping(raw, "recurrent")
    reader.known_keys(section, "recurrent", ("state", "idle_expiry_seconds", "max_episodes"))
    entries = section.get("state")
    example = "'state: [{name: h, shape: [1, 64]}, {name: c, shape: [1, 64]}]'"
    if not isinstance(entries, list) or not entries:
        raise reader.fail("recurrent.state", "must list the model's state tensors", f"write e.g. {example}")
    state = tuple(_state_tensor(reader, index, entry, example) for index, entry in enumerate(entries))
    names = [tensor.name for tensor in state]
    if len(set(names)) != len(names):
        raise reader.fail("recurrent.state", f"names repeat ({', '.join(names)})", "give every state tensor its own name")
    defaults = Recurrent(state)
    expiry = reader.number(section.get("idle_expiry_seconds", defaults.idle_expiry_s), "recurrent.idle_expiry_seconds")
    if not 0 < expiry < float("inf"):
        raise reader.fail("recurrent.idle_expiry_seconds", "must be a positive number", "write e.g. 'idle_expiry_seconds: 900'")
    episodes = reader.count(section.get("max_episodes", defaults.max_episodes), "recurrent.max_episodes", smallest=1)
    return Recurrent(state, expiry, episodes)


def _state_tensor(reader: _Reader, index: int, raw: Any, example: str) -> StateTensor:
    key = f"recurrent.state[{index}]"
    entry = reader.mapping(raw, key, required=True)
    reader.known_keys(entry, key, ("name", "shape"))
    if "name" not in entry or "shape" not in entry:
        raise reader.fail(key, "needs a name and a shape (without the batch dimension)", f"write e.g. {example}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not shape:
        raise reader.fail(f"{key}.shape", f"must be a list of sizes, not {shape!r}", "write e.g. 'shape: [1, 64]' (no batch dimension)")
    return StateTensor(reader.text(entry["name"], f"{key}.name"), tuple(reader.count(size, f"{key}.shape", smallest=1) for size in shape))
