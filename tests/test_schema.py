"""schema.yaml rules (DESIGN.md §3): types, bounds, item counts, extensions, and one-line errors."""

import json
import textwrap
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from policy_server.errors import ConfigError, InputError
from policy_server.observations import RowEncoder, observation_model
from policy_server.schema import ContinuousHead, DiscreteHead, PolicySpec, Serving, load_spec

PARAMS = "parameters:\n  discrete: true\n  api_key: '1234567asdfgh'\n"


def write(tmp_path: Path, text: str, name: str = "schema.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def spec_of(tmp_path: Path, text: str) -> PolicySpec:
    return load_spec(write(tmp_path, text))


def model_of(tmp_path: Path, observations: str) -> TypeAdapter[Any]:
    """The /predict body's validator (FastAPI validates with the same TypeAdapter)."""
    return TypeAdapter(
        observation_model(spec_of(tmp_path, PARAMS + "observations:\n" + textwrap.indent(textwrap.dedent(observations), "  ")))
    )


def assert_one_line_error(error: ConfigError, path: Path, key: str) -> str:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(str(path)), message
    assert f": {key}: " in message, message
    assert error.key == key
    assert "fix: " in message and error.fix, message
    return message


# --- the six types ------------------------------------------------------------------------------

SIX_TYPES = """\
a_int: {type: int}
b_float: {type: float}
c_bool: {type: bool}
d_ints: {type: "List[int]"}
e_floats: {type: "List[float]"}
f_bools: {type: "List[bool]"}
"""


def test_all_six_types_parse(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, PARAMS + "observations:\n" + textwrap.indent(SIX_TYPES, "  "))
    assert spec.observations is not None
    parsed = [(o.name, o.kind, o.is_list, o.type_name) for o in spec.observations]
    assert parsed == [
        ("a_int", "int", False, "int"),
        ("b_float", "float", False, "float"),
        ("c_bool", "bool", False, "bool"),
        ("d_ints", "int", True, "List[int]"),
        ("e_floats", "float", True, "List[float]"),
        ("f_bools", "bool", True, "List[bool]"),
    ]


def test_six_types_become_typed_fields(tmp_path: Path) -> None:
    observation = observation_model(spec_of(tmp_path, PARAMS + "observations:\n" + textwrap.indent(SIX_TYPES, "  ")))
    hints = get_type_hints(observation)
    assert list(hints) == ["a_int", "b_float", "c_bool", "d_ints", "e_floats", "f_bools"]
    assert list(hints.values()) == [int, float, bool, list[int], list[float], list[bool]]
    good = {"f_bools": [True, False], "e_floats": [0.5], "d_ints": [1, 2], "c_bool": True, "b_float": 2.5, "a_int": 3}
    values = TypeAdapter(observation).validate_python(good)
    assert list(values.items()) == [
        ("a_int", 3),
        ("b_float", 2.5),
        ("c_bool", True),
        ("d_ints", [1, 2]),
        ("e_floats", [0.5]),
        ("f_bools", [True, False]),
    ]


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("a_int", 1.5),
        ("a_int", "three"),
        ("b_float", "x"),
        ("c_bool", 7),
        ("c_bool", [True]),
        ("d_ints", [1, 2.5]),
        ("d_ints", 3),
        ("e_floats", ["a"]),
        ("f_bools", [2]),
    ],
)
def test_wrong_value_types_are_refused(tmp_path: Path, key: str, bad: Any) -> None:
    model = model_of(tmp_path, SIX_TYPES)
    body = {"a_int": 3, "b_float": 2.5, "c_bool": True, "d_ints": [1, 2], "e_floats": [0.5], "f_bools": [True]}
    with pytest.raises(ValidationError) as info:
        model.validate_python(body | {key: bad})
    assert info.value.errors()[0]["loc"][0] == key


@pytest.mark.parametrize("spelling", ["List[int]", "List[ int ]", "list[int]"])
def test_list_spellings(tmp_path: Path, spelling: str) -> None:
    spec = spec_of(tmp_path, PARAMS + f"observations:\n  a: {{type: '{spelling}'}}\n")
    assert spec.observations is not None and spec.observations[0].type_name == "List[int]"


@pytest.mark.parametrize(
    "type_string",
    [
        "str",
        "List[str]",
        "Dict[str, int]",
        "double",
        "List[List[int]]",
        "typing.List[int]",
        "int ; import os",
        "__import__('os').system('x')",
    ],
)
def test_unknown_types_fail_and_name_the_allowed_ones(tmp_path: Path, type_string: str) -> None:
    path = write(tmp_path, PARAMS + f'observations:\n  speed: {{type: "{type_string}"}}\n')
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = assert_one_line_error(info.value, path, "observations.speed.type")
    for allowed in ("int", "float", "bool", "List[int]", "List[float]", "List[bool]"):
        assert allowed in message


def test_type_strings_are_never_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "evaluated"
    payloads = [
        f"__import__('pathlib').Path('{marker}').touch()",
        f"List[__import__('pathlib').Path('{marker}').touch()]",
        f"exec(\"open('{marker}', 'w')\")",
    ]
    for payload in payloads:
        path = write(tmp_path, PARAMS + f"observations:\n  x: {json.dumps({'type': payload})}\n")
        with pytest.raises(ConfigError) as info:
            load_spec(path)
        assert info.value.key == "observations.x.type"
        assert not marker.exists(), f"{payload!r} was evaluated"


def test_a_non_string_type_fails(tmp_path: Path) -> None:
    path = write(tmp_path, PARAMS + "observations:\n  x: {type: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, "observations.x.type")


# --- item counts and bounds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "too_few", "ok", "too_many"),
    [
        ("min_items: 2", [1], [[1, 2], [1, 2, 3, 4, 5, 6, 7, 8]], None),
        ("max_items: 3", None, [[], [1, 2, 3]], [1, 2, 3, 4]),
        ("min_items: 2, max_items: 3", [1], [[1, 2], [1, 2, 3]], [1, 2, 3, 4]),
    ],
    ids=["min_items-alone", "max_items-alone", "both"],
)
def test_item_counts_are_each_enforced(
    tmp_path: Path, counts: str, too_few: list[int] | None, ok: list[list[int]], too_many: list[int] | None
) -> None:
    model = model_of(tmp_path, f"xs: {{type: 'List[int]', {counts}}}\n")
    for value in ok:
        assert model.validate_python({"xs": value})["xs"] == value
    if too_few is not None:
        with pytest.raises(ValidationError) as info:
            model.validate_python({"xs": too_few})
        assert info.value.errors()[0]["type"] == "too_short"
    if too_many is not None:
        with pytest.raises(ValidationError) as info:
            model.validate_python({"xs": too_many})
        assert info.value.errors()[0]["type"] == "too_long"


def test_list_width_is_fixed_only_by_equal_counts(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        PARAMS
        + "observations:\n  a: {type: float}\n  b: {type: 'List[float]', min_items: 3, max_items: 3}\n  c: {type: 'List[bool]', min_items: 2, max_items: 2}\n",
    )
    assert spec.input_size == 6
    assert spec.columns_of("c") == slice(4, 6)
    varied = spec_of(tmp_path, PARAMS + "observations:\n  a: {type: float}\n  b: {type: 'List[float]', min_items: 3}\n")
    assert varied.input_size is None


@pytest.mark.parametrize("kind", ["int", "float"])
def test_scalar_bounds_are_enforced(tmp_path: Path, kind: str) -> None:
    model = model_of(
        tmp_path,
        f"low: {{type: {kind}, minimum: 0}}\nhigh: {{type: {kind}, maximum: 4}}\nboth: {{type: {kind}, minimum: -2, maximum: 2}}\n",
    )
    good = {"low": 0, "high": 4, "both": -2}
    model.validate_python(good)
    model.validate_python({"low": 1000, "high": -1000, "both": 2})
    for key, bad in [("low", -1), ("high", 5), ("both", -3), ("both", 3)]:
        with pytest.raises(ValidationError) as info:
            model.validate_python(good | {key: bad})
        assert info.value.errors()[0]["loc"][0] == key
        assert info.value.errors()[0]["type"] in ("greater_than_equal", "less_than_equal")


@pytest.mark.parametrize("kind", ["int", "float"])
def test_list_element_bounds_are_enforced(tmp_path: Path, kind: str) -> None:
    model = model_of(tmp_path, f"xs: {{type: 'List[{kind}]', minimum: 0, maximum: 9}}\n")
    assert model.validate_python({"xs": [0, 9, 4]})["xs"] == [0, 9, 4]
    for bad in ([0, 10], [-1], [3, 4, 5, 100]):
        with pytest.raises(ValidationError) as info:
            model.validate_python({"xs": bad})
        assert info.value.errors()[0]["loc"][:2] == ("xs", bad.index(next(v for v in bad if not 0 <= v <= 9)))


def test_nan_and_infinity_are_refused(tmp_path: Path) -> None:
    model = model_of(tmp_path, "x: {type: float}\nxs: {type: 'List[float]'}\n")
    for bad in ({"x": float("nan"), "xs": []}, {"x": float("inf"), "xs": []}, {"x": 0, "xs": [float("-inf")]}):
        with pytest.raises(ValidationError):
            model.validate_python(bad)


def test_unknown_request_keys_are_ignored(tmp_path: Path) -> None:
    model = model_of(tmp_path, "x: {type: float}\n")
    assert model.validate_python({"x": 1, "y": 2, "reward": [1, 2]}) == {"x": 1.0}


def test_odd_observation_names_work(tmp_path: Path) -> None:
    model = model_of(tmp_path, "model_config: {type: float}\nmax-speed: {type: int}\nf1: {type: bool}\n")
    values = model.validate_python({"model_config": 1.5, "max-speed": 3, "f1": True})
    assert values == {"model_config": 1.5, "max-speed": 3, "f1": True}


def test_descriptions_appear_in_the_json_schema(tmp_path: Path) -> None:
    text = PARAMS + textwrap.dedent("""\
        observations:
          actionMask: {type: "List[bool]", min_items: 4, max_items: 4}
          mouse_row: {type: float, minimum: 0, maximum: 9, description: "row of the mouse"}
          cells: {type: "List[int]", min_items: 2, max_items: 3, description: "free cells"}
          plain: {type: int}
        """)
    properties = TypeAdapter(observation_model(spec_of(tmp_path, text))).json_schema()["properties"]
    assert properties["mouse_row"]["description"] == "row of the mouse"
    assert properties["mouse_row"]["minimum"] == 0 and properties["mouse_row"]["maximum"] == 9
    assert properties["cells"]["description"] == "free cells"
    assert properties["cells"]["minItems"] == 2 and properties["cells"]["maxItems"] == 3
    assert "mask" in properties["actionMask"]["description"].lower()
    assert "description" not in properties["plain"]


def test_boolean_bounds_and_scalar_item_counts_are_refused(tmp_path: Path) -> None:
    for observation, key in [
        ("x: {type: bool, minimum: 0}", "observations.x.minimum"),
        ("x: {type: 'List[bool]', maximum: 1}", "observations.x.minimum"),
        ("x: {type: float, min_items: 2}", "observations.x.min_items"),
        ("x: {type: int, max_items: 2}", "observations.x.min_items"),
    ]:
        path = write(tmp_path, PARAMS + "observations:\n  " + observation + "\n")
        with pytest.raises(ConfigError) as info:
            load_spec(path)
        assert_one_line_error(info.value, path, key)


# --- parameters and extensions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("api/v1", "/api/v1"), ("/api/v1", "/api/v1"), ("/api/v1/", "/api/v1"), ("api/v1/", "/api/v1"), ("v2", "/v2")],
)
def test_url_path_is_normalised(tmp_path: Path, raw: str, normalised: str) -> None:
    assert spec_of(tmp_path, PARAMS + f"  url_path: '{raw}'\n").url_path == normalised


def test_parameter_defaults(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "parameters: {discrete: false}\n")
    assert (spec.discrete, spec.is_tuple, spec.url_path, spec.api_key, spec.observations, spec.actions) == (
        False,
        False,
        None,
        None,
        None,
        None,
    )
    assert spec.action_mask is None and spec.model_path is None
    assert spec.serving == Serving()
    assert spec.name == tmp_path.name  # the schema's folder names the policy when `name` is absent


def test_unquoted_api_key_is_text(tmp_path: Path) -> None:
    assert spec_of(tmp_path, "parameters: {discrete: true, api_key: 1234567asdfgh}\n").api_key == "1234567asdfgh"
    assert spec_of(tmp_path, "parameters: {discrete: true, api_key: 1234567}\n").api_key == "1234567"


def test_extensions_are_parsed(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        name: grid-mouse
        parameters: {discrete: true, tuple: true, api_key: k}
        observations:
          pos: {type: float}
          allowed: {type: "List[bool]", min_items: 6, max_items: 6}
        actions:
          - {name: move, n: 4, labels: [up, down, left, right]}
          - {name: jump, n: 2}
        action_mask: allowed
        model: {path: models/other.pt}
        serving: {backend: local, max_batch_size: 8, batch_wait_ms: 2.5, replicas: 3, num_gpus: 0.5}
        """)
    spec = spec_of(tmp_path, text)
    assert spec.name == "grid-mouse"
    assert spec.actions == (DiscreteHead("move", 4, ("up", "down", "left", "right")), DiscreteHead("jump", 2, None))
    assert spec.action_mask == "allowed"
    assert spec.model_path == Path("models/other.pt")
    assert spec.serving == Serving(backend="local", max_batch_size=8, batch_wait_ms=2.5, replicas=3, num_gpus=0.5)
    assert spec.input_size == 7


def test_continuous_heads_are_parsed(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        parameters: {discrete: false, tuple: true}
        actions:
          - {name: throttle, size: 2, low: -1.0, high: 1}
          - {name: steer, size: 3, low: [-1, -2, -3], high: [1, 2, 3]}
          - {name: free, size: 1}
        serving: {backend: ray, num_gpus: auto}
        """)
    spec = spec_of(tmp_path, text)
    assert spec.actions == (
        ContinuousHead("throttle", 2, (-1.0, -1.0), (1.0, 1.0)),
        ContinuousHead("steer", 3, (-1.0, -2.0, -3.0), (1.0, 2.0, 3.0)),
        ContinuousHead("free", 1, None, None),
    )
    assert spec.serving.backend == "ray" and spec.serving.num_gpus == "auto"


def test_action_mask_defaults_to_an_observation_named_actionMask(tmp_path: Path) -> None:
    text = PARAMS + "observations:\n  actionMask: {type: 'List[bool]', min_items: 3, max_items: 3}\n  x: {type: float}\n"
    assert spec_of(tmp_path, text).action_mask == "actionMask"
    assert spec_of(tmp_path, PARAMS + "observations:\n  x: {type: float}\n").action_mask is None


def test_head_name_defaults_to_its_index(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, PARAMS + "actions:\n  - {n: 3}\n")
    assert spec.actions == (DiscreteHead("action_0", 3, None),)


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("paramters: {discrete: true}\n", "paramters", "parameters"),
        (PARAMS + "observation:\n  x: {type: float}\n", "observation", "observations"),
        ("parameters: {discrete: true, tupel: true}\n", "parameters.tupel", "tuple"),
        ("parameters: {discrete: true, apikey: x}\n", "parameters.apikey", "api_key"),
        (PARAMS + "observations:\n  x: {type: float, max_item: 3}\n", "observations.x.max_item", "max_items"),
        (PARAMS + "observations:\n  x: {typ: float}\n", "observations.x.typ", "type"),
        (PARAMS + "actions:\n  - {name: a, n: 2, label: [p, q]}\n", "actions[0].label", "labels"),
        (PARAMS + "serving: {max_batchsize: 3}\n", "serving.max_batchsize", "max_batch_size"),
        (PARAMS + "model: {pth: m.pt}\n", "model.pth", "path"),
    ],
)
def test_unknown_keys_are_refused_with_a_hint(tmp_path: Path, text: str, key: str, hint: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = assert_one_line_error(info.value, path, key)
    assert f"did you mean '{hint}'?" in message


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, PARAMS + "zzzzzz: 1\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = assert_one_line_error(info.value, path, "zzzzzz")
    assert "parameters" in message and "observations" in message


# --- malformed schemas: one line naming the file, the key and the fix --------------------------

MASK_SCHEMA = "observations:\n  actionMask: {type: 'List[bool]', min_items: 3, max_items: 3}\nactions:\n  - {name: move, n: 4}\n"

MALFORMED = [
    ("yaml-syntax", "parameters:\n  discrete: true\n  tuple: [1, 2\n", "yaml"),
    ("yaml-bad-indent", "parameters:\n  discrete: true\n tuple: false\n", "yaml"),
    ("yaml-tab", "parameters:\n\tdiscrete: true\n", "yaml"),
    ("empty-file", "", "yaml"),
    ("two-documents", "parameters: {discrete: true}\n---\nparameters: {discrete: false}\n", "yaml"),
    ("top-level-list", "- parameters\n", "yaml"),
    ("no-parameters", "observations:\n  x: {type: float}\n", "parameters"),
    ("missing-discrete", "parameters: {tuple: false, api_key: k}\n", "parameters.discrete"),
    ("discrete-not-bool", "parameters: {discrete: yes please}\n", "parameters.discrete"),
    ("tuple-not-bool", "parameters: {discrete: true, tuple: 1}\n", "parameters.tuple"),
    ("parameters-list", "parameters: [discrete, true]\n", "parameters"),
    ("parameters-text", "parameters: discrete\n", "parameters"),
    ("url-path-bad", "parameters: {discrete: true, url_path: 'api v1?'}\n", "parameters.url_path"),
    ("url-path-slash", "parameters: {discrete: true, url_path: '/'}\n", "parameters.url_path"),
    ("name-bad", "name: 'my policy!'\n" + PARAMS, "name"),
    ("observations-list", PARAMS + "observations: [x, y]\n", "observations"),
    ("observations-empty", PARAMS + "observations: {}\n", "observations"),
    ("observation-not-mapping", PARAMS + "observations:\n  x: float\n", "observations.x"),
    ("type-missing", PARAMS + "observations:\n  x: {minimum: 0}\n", "observations.x.type"),
    ("unknown-type", PARAMS + "observations:\n  x: {type: str}\n", "observations.x.type"),
    ("min-above-max-items", PARAMS + "observations:\n  x: {type: 'List[int]', min_items: 5, max_items: 3}\n", "observations.x.min_items"),
    ("negative-min-items", PARAMS + "observations:\n  x: {type: 'List[int]', min_items: -1}\n", "observations.x.min_items"),
    ("zero-max-items", PARAMS + "observations:\n  x: {type: 'List[int]', max_items: 0}\n", "observations.x.max_items"),
    ("text-min-items", PARAMS + "observations:\n  x: {type: 'List[int]', min_items: three}\n", "observations.x.min_items"),
    ("minimum-above-maximum", PARAMS + "observations:\n  x: {type: float, minimum: 3, maximum: 1}\n", "observations.x.minimum"),
    ("minimum-text", PARAMS + "observations:\n  x: {type: float, minimum: low}\n", "observations.x.minimum"),
    ("description-list", PARAMS + "observations:\n  x: {type: float, description: [a]}\n", "observations.x.description"),
    (
        "mask-not-bool-list",
        PARAMS + "observations:\n  m: {type: 'List[float]', min_items: 2, max_items: 2}\naction_mask: m\n",
        "observations.m.type",
    ),
    (
        "default-mask-not-bool-list",
        PARAMS + "observations:\n  actionMask: {type: 'List[int]', min_items: 2, max_items: 2}\n",
        "observations.actionMask.type",
    ),
    ("mask-scalar", PARAMS + "observations:\n  m: {type: bool}\naction_mask: m\n", "observations.m.type"),
    ("mask-length-vs-actions", PARAMS + MASK_SCHEMA, "observations.actionMask.max_items"),
    (
        "mask-place-varies",
        PARAMS + "observations:\n  xs: {type: 'List[float]'}\n  actionMask: {type: 'List[bool]', min_items: 2, max_items: 2}\n",
        "observations.actionMask",
    ),
    ("mask-unfixed-length", PARAMS + "observations:\n  actionMask: {type: 'List[bool]', min_items: 2}\n", "observations.actionMask"),
    ("mask-unknown-observation", PARAMS + "observations:\n  x: {type: float}\naction_mask: mask\n", "action_mask"),
    (
        "mask-continuous",
        "parameters: {discrete: false}\nobservations:\n  m: {type: 'List[bool]', min_items: 2, max_items: 2}\naction_mask: m\n",
        "action_mask",
    ),
    ("actions-not-list", PARAMS + "actions: {name: a, n: 2}\n", "actions"),
    ("actions-empty", PARAMS + "actions: []\n", "actions"),
    ("head-not-mapping", PARAMS + "actions:\n  - move\n", "actions[0]"),
    ("discrete-head-under-continuous", "parameters: {discrete: false}\nactions:\n  - {name: a, n: 3}\n", "actions[0]"),
    ("continuous-head-under-discrete", PARAMS + "actions:\n  - {name: a, n: 3}\n  - {name: b, size: 2}\n", "actions[1]"),
    ("two-heads-tuple-false", PARAMS + "actions:\n  - {name: a, n: 2}\n  - {name: b, n: 2}\n", "actions"),
    ("head-names-repeat", "parameters: {discrete: true, tuple: true}\nactions:\n  - {name: a, n: 2}\n  - {name: a, n: 3}\n", "actions"),
    ("head-n-and-size", PARAMS + "actions:\n  - {name: a, n: 2, size: 2}\n", "actions[0]"),
    ("head-neither-n-nor-size", PARAMS + "actions:\n  - {name: a}\n", "actions[0]"),
    ("head-n-zero", PARAMS + "actions:\n  - {name: a, n: 0}\n", "actions[0].n"),
    ("head-n-float", PARAMS + "actions:\n  - {name: a, n: 2.5}\n", "actions[0].n"),
    ("labels-count", PARAMS + "actions:\n  - {name: a, n: 3, labels: [x, y]}\n", "actions[0].labels"),
    ("labels-repeat", PARAMS + "actions:\n  - {name: a, n: 2, labels: [x, x]}\n", "actions[0].labels"),
    ("labels-not-list", PARAMS + "actions:\n  - {name: a, n: 1, labels: x}\n", "actions[0].labels"),
    ("discrete-head-bounds", PARAMS + "actions:\n  - {name: a, n: 2, low: 0}\n", "actions[0].low"),
    ("continuous-head-labels", "parameters: {discrete: false}\nactions:\n  - {name: a, size: 2, labels: [x, y]}\n", "actions[0].labels"),
    ("continuous-low-above-high", "parameters: {discrete: false}\nactions:\n  - {name: a, size: 1, low: 2, high: 1}\n", "actions[0].low"),
    ("continuous-bound-length", "parameters: {discrete: false}\nactions:\n  - {name: a, size: 2, high: [1, 2, 3]}\n", "actions[0].high"),
    ("continuous-size-zero", "parameters: {discrete: false}\nactions:\n  - {name: a, size: 0}\n", "actions[0].size"),
    ("model-not-mapping", PARAMS + "model: models/model.pt\n", "model"),
    ("model-path-list", PARAMS + "model: {path: [a]}\n", "model.path"),
    ("serving-not-mapping", PARAMS + "serving: local\n", "serving"),
    ("bad-backend", PARAMS + "serving: {backend: kubernetes}\n", "serving.backend"),
    ("negative-batch-wait", PARAMS + "serving: {batch_wait_ms: -1}\n", "serving.batch_wait_ms"),
    ("text-batch-wait", PARAMS + "serving: {batch_wait_ms: soon}\n", "serving.batch_wait_ms"),
    ("zero-batch-size", PARAMS + "serving: {max_batch_size: 0}\n", "serving.max_batch_size"),
    ("zero-replicas", PARAMS + "serving: {replicas: 0}\n", "serving.replicas"),
    ("num-gpus-text", PARAMS + "serving: {num_gpus: many}\n", "serving.num_gpus"),
]


@pytest.mark.parametrize(("text", "key"), [(text, key) for _, text, key in MALFORMED], ids=[case for case, _, _ in MALFORMED])
def test_malformed_schema_is_one_line_naming_file_key_and_fix(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, key)


def test_yaml_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "parameters:\n  discrete: true\nobservations:\n  x: {type: float\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = assert_one_line_error(info.value, path, "yaml")
    assert "line " in message


def test_unreadable_schema_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "schema.yaml"
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, "file")


def test_schema_not_in_utf8_is_a_config_error(tmp_path: Path) -> None:
    # e.g. saved as Latin-1 by an editor: a user's mistake, so one line, not a UnicodeDecodeError traceback
    path = tmp_path / "schema.yaml"
    path.write_bytes(b'parameters: {discrete: true}\nobservations:\n  x: {type: float, description: "caf\xe9"}\n')
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, info.value.key)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_bytes(b"\xef\xbb\xbfparameters: {discrete: true}\n")
    assert load_spec(path).discrete is True


def test_pathmind_style_documents_and_capitalised_booleans(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "---\nobservations:\n  x:\n    type: int\n\nparameters:\n  discrete: True\n  tuple: False\n")
    assert spec.discrete is True and spec.is_tuple is False
    assert spec.observations is not None and spec.observations[0].kind == "int"


def billion_laughs(levels: int = 9) -> str:
    """A schema whose name is 9 aliases of 9 aliases of ... of 9 words: ~600 bytes, 9^9 words."""
    anchors = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, levels)]
    return PARAMS + "observations:\n  x: {type: float}\nname: [" + ", ".join(anchors) + "]\n"


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, billion_laughs())
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = assert_one_line_error(info.value, path, "yaml")
    assert "aliases" in message


@pytest.mark.timeout(30)
def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, PARAMS + "name: &loop [*loop]\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, "yaml")


def test_aliases_and_merges_of_a_schemas_size_still_load(tmp_path: Path) -> None:
    spec = spec_of(
        tmp_path,
        PARAMS + "observations:\n  x: &unit {type: float, minimum: 0, maximum: 1}\n  y: *unit\n  z: {<<: *unit, maximum: 5}\n",
    )
    assert spec.observations is not None
    assert [(o.name, o.minimum, o.maximum) for o in spec.observations] == [("x", 0, 1), ("y", 0, 1), ("z", 0, 5)]


def deep_through_aliases(anchors: int = 300) -> str:
    """Each anchor 20 levels below the one before: shallow as written, 6000 levels once expanded."""
    nested = [f"&c{i} {'[' * 20}*c{i - 1}{']' * 20}" for i in range(1, anchors)]
    return PARAMS + "name: [" + ", ".join(["&c0 [x]", *nested]) + "]\n"


DEEP = {"brackets": PARAMS + "name: " + "[" * 5000 + "]" * 5000 + "\n", "aliases": deep_through_aliases()}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(DEEP))
def test_nesting_deeper_than_any_schema_is_one_line(tmp_path: Path, case: str) -> None:
    path = write(tmp_path, DEEP[case])
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, "yaml")


REPEATED_KEYS = [
    ("observation", PARAMS + "observations:\n  x: {type: float}\n  y: {type: int}\n  x: {type: bool}\n", "observations.x", 5, 7),
    ("parameter", PARAMS + "  discrete: false\n", "parameters.discrete", 2, 4),
    ("section", PARAMS + "observations:\n  x: {type: float}\nparameters: {discrete: false}\n", "parameters", 1, 6),
    ("head-key", PARAMS + "actions:\n  - {name: a, n: 2}\n  - {name: b, n: 2, n: 3}\n", "actions[1].n", 6, 6),
]


@pytest.mark.parametrize(("text", "key", "first", "second"), [c[1:] for c in REPEATED_KEYS], ids=[c[0] for c in REPEATED_KEYS])
def test_a_key_given_twice_is_named(tmp_path: Path, text: str, key: str, first: int, second: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert_one_line_error(info.value, path, key)
    assert info.value.problem == f"defined twice (lines {first} and {second})"


# --- observations → rows ------------------------------------------------------------------------

ENCODER_OBSERVATIONS = """\
a: {type: float}
b: {type: bool}
c: {type: "List[int]", min_items: 2, max_items: 2}
d: {type: "List[bool]", min_items: 2, max_items: 2}
e: {type: int}
f: {type: "List[float]", min_items: 1, max_items: 1}
"""


def encoder_and_model(tmp_path: Path, observations: str) -> tuple[RowEncoder, TypeAdapter[Any]]:
    spec = spec_of(tmp_path, PARAMS + "observations:\n" + textwrap.indent(observations, "  "))
    return RowEncoder(spec), TypeAdapter(observation_model(spec))


def test_rows_are_in_schema_order_with_bools_as_numbers(tmp_path: Path) -> None:
    encoder, model = encoder_and_model(tmp_path, ENCODER_OBSERVATIONS)
    # keys sent in reverse order, plus an unknown one: the row follows the schema
    first = model.validate_python({"zz": 9, "f": [-0.25], "e": 7, "d": [True, False], "c": [3, 4], "b": False, "a": 1.5})
    second = model.validate_python({"a": -2, "b": True, "c": [0, -1], "d": [False, True], "e": 0, "f": [8]})
    rows = encoder.encode([first, second])
    assert rows.dtype == np.float32
    expected = np.array([[1.5, 0, 3, 4, 1, 0, 7, -0.25], [-2, 1, 0, -1, 0, 1, 0, 8]], dtype=np.float32)
    np.testing.assert_array_equal(rows, expected)


def test_rows_of_scalars_only(tmp_path: Path) -> None:
    encoder, model = encoder_and_model(tmp_path, "x: {type: int}\ny: {type: bool}\nz: {type: float}\n")
    rows = encoder.encode([model.validate_python({"z": 0.5, "y": True, "x": 3})])
    np.testing.assert_array_equal(rows, np.array([[3, 1, 0.5]], dtype=np.float32))
    assert rows.dtype == np.float32


def test_variable_lists_flatten_and_must_agree_within_a_batch(tmp_path: Path) -> None:
    encoder, model = encoder_and_model(tmp_path, "xs: {type: 'List[float]'}\nflag: {type: bool}\n")
    one = encoder.encode([model.validate_python({"xs": [1, 2, 3], "flag": True})])
    np.testing.assert_array_equal(one, np.array([[1, 2, 3, 1]], dtype=np.float32))
    with pytest.raises(InputError) as info:
        encoder.encode([model.validate_python({"xs": [1], "flag": True}), model.validate_python({"xs": [1, 2], "flag": True})])
    assert info.value.kind == "list_lengths"


@pytest.mark.parametrize(
    ("observations", "body"),
    [
        ("x: {type: float}\n", {"x": 1e39}),
        ("x: {type: float}\n", {"x": -1e39}),
        ("x: {type: int}\n", {"x": 10**39}),
        ("x: {type: int}\n", {"x": 10**400}),
        ("xs: {type: 'List[float]'}\n", {"xs": [0.0, 1e39]}),
    ],
)
def test_float32_overflow_is_an_input_error(tmp_path: Path, observations: str, body: dict[str, Any]) -> None:
    encoder, model = encoder_and_model(tmp_path, observations)
    with pytest.raises(InputError) as info:
        encoder.encode([model.validate_python(body)])
    assert info.value.kind == "out_of_range"
    assert info.value.as_detail()[0]["type"] == "out_of_range"


def test_largest_float32_still_encodes(tmp_path: Path) -> None:
    encoder, model = encoder_and_model(tmp_path, "x: {type: float}\n")
    assert encoder.encode([model.validate_python({"x": 3.0e38})])[0, 0] == np.float32(3.0e38)


# --- the api key never leaves ------------------------------------------------------------------


def test_public_dict_never_contains_the_api_key(tmp_path: Path) -> None:
    secret = "s3cr3t-Key-9f8e7d"
    text = textwrap.dedent(f"""\
        parameters: {{discrete: true, tuple: false, api_key: "{secret}", url_path: api/v1}}
        observations:
          x: {{type: float, description: "position"}}
          actionMask: {{type: "List[bool]", min_items: 2, max_items: 2}}
        actions:
          - {{name: go, n: 2}}
        """)
    spec = spec_of(tmp_path, text)
    assert spec.api_key == secret
    public = spec.public_dict()
    dumped = json.dumps(public)
    assert secret not in dumped and "api_key" not in dumped
    assert secret not in repr(spec)
    assert public["parameters"] == {"discrete": True, "tuple": False, "url_path": "/api/v1"}
    assert public["observations"]["x"] == {"type": "float", "description": "position"}
    assert public["action_mask"] == "actionMask"
