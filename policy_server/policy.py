"""Raw model outputs → heads → distributions → actions and probabilities.

All model math lives here, for every route and every backend: executors only move `Task`s in and
results out. One forward pass serves a whole batch of tasks; the distribution math is vectorised
over the batch (numpy, float64 so probabilities sum to 1 and masked ones are exactly 0).

A recurrent policy's tasks carry their episodes' state (flat: [rows, width], every state tensor's
values in the schema's order), which is cut into the model's state tensors and stacked with the
other tasks' like the rows; each decision carries its row's new state back. The policy keeps none.
"""

import enum
import logging
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from policy_server.errors import ConfigError, InputError, PolicyFailure, model_error_line
from policy_server.observations import RowEncoder, example_observation
from policy_server.schema import ContinuousHead, DiscreteHead, Head, PolicySpec, Recurrent

logger = logging.getLogger("policy_server")

Model = Callable[..., list[np.ndarray]]  # rows (then a recurrent model's state tensors) → outputs [B, k] each
_HUGE = 1e300
# A model whose file does not declare its input size is tried on zero rows of a few sizes.
MAX_PROBES = 16
MAX_PROBED_SIZE = 1 << 20
# exp() of a log-std above ~709 overflows; a std of e^20 (5e8) already means "anything goes".
LOG_STD_RANGE = (-20.0, 20.0)


class Kind(enum.Enum):
    SAMPLE = "sample"
    DETERMINISTIC = "deterministic"
    DISTRIBUTION = "distribution"


@dataclass(frozen=True)
class Task:
    """One request's rows and what it asks of them. `seed` makes sampling reproducible. `state`:
    a recurrent policy's state of each row's episode, [rows, width] float32 (None: all zeros)."""

    rows: np.ndarray
    kind: Kind
    seed: int | None = None
    state: np.ndarray | None = None


@dataclass(frozen=True)
class Decisions:
    actions: list[list[Any]]  # per row: one int per discrete head, all values of each continuous head
    probabilities: list[float | None]
    version: str = "1"  # of the policy that decided: the answer's X-Policy-Version
    # [rows, heads], for the experience log: each head's probability of its action (NaN for a
    # continuous head: a density is no probability) and log-probability (a continuous head's
    # density at the value before clipping to its bounds, as policy-gradient methods count it;
    # NaN without a std). Arrays, so the answer does not pay for them in Python objects; left out
    # of ==, which they follow from (the experience tests compare them as logged).
    head_probabilities: np.ndarray | None = field(default=None, compare=False)
    head_log_probabilities: np.ndarray | None = field(default=None, compare=False)
    # `actions` as one [rows, values] array, for the experience log: its steps wait for a flush
    # (up to a second), and a list per row would be one more object for every collection to scan.
    action_values: np.ndarray | None = field(default=None, compare=False)
    # A recurrent policy's new state of each row's episode, [rows, width] float32.
    state: np.ndarray | None = field(default=None, compare=False)

    def take(self, rows: Sequence[int]) -> "Decisions":
        """The decisions of these rows only."""
        index = list(rows)
        head_p, head_logp = self.head_probabilities, self.head_log_probabilities
        return Decisions(
            [self.actions[i] for i in index],
            [self.probabilities[i] for i in index],
            self.version,
            None if head_p is None else head_p[index],
            None if head_logp is None else head_logp[index],
            None if self.action_values is None else self.action_values[index],
            None if self.state is None else self.state[index],
        )


@dataclass(frozen=True)
class HeadParameters:
    """One head's distribution for a batch of rows: probabilities [B, n], or mean and std [B, d]."""

    head: Head
    probabilities: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


@dataclass(frozen=True)
class Distributions:
    rows: list[list[dict[str, Any]]]  # per row, per head: the /distribution entries
    version: str = "1"


Result = Decisions | Distributions | InputError | PolicyFailure


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for /info, /schema and the metrics."""

    path: str
    format: str
    device: str = "cpu"
    declared_input_size: int | None = None  # what the file itself says it takes
    candidate_input_sizes: tuple[int, ...] = ()  # when it says nothing: sizes worth trying on it
    sha256: str = ""
    version: str = "1"  # of the policy: which models/N/ it came from
    declared_state_shapes: tuple[tuple[int | None, ...], ...] | None = None  # the inputs after the rows, if the file says

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class OutputSlot:
    """Where a head's raw values sit: which model output, which columns, log-stds or not."""

    output: int
    start: int
    width: int
    has_log_std: bool = False


class Policy:
    """A model plus the heads read from its outputs."""

    def __init__(
        self,
        model: Model,
        info: ModelInfo,
        input_size: int,
        heads: Sequence[Head],
        slots: Sequence[OutputSlot],
        mask_columns: slice | None,
        recurrent: Recurrent | None = None,
    ) -> None:
        self.model = model
        self.recurrent = recurrent
        self.info = info
        self.input_size = input_size
        self.heads = tuple(heads)
        self.slots = tuple(slots)
        self.mask_columns = mask_columns
        self._head_offsets = np.cumsum([0] + [h.n for h in heads if isinstance(h, DiscreteHead)])
        self._rng = random.Random()

    def warm_up(self) -> None:
        """One forward pass, so the first request does not pay for lazy initialisation."""
        self.parameters(np.zeros((1, self.input_size), dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.info.name,
            "format": self.info.format,
            "sha256": self.info.sha256,
            "version": self.info.version,
            "device": self.info.device,
            "input_size": self.input_size,
            "heads": [describe_head(head) for head in self.heads],
            "state_size": None if self.recurrent is None else self.recurrent.width,
        }

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        """Answer every task with one forward pass; a task's own input error is its result."""
        results: list[Result | None] = [self._check_width(task) for task in tasks]
        valid = [i for i, r in enumerate(results) if r is None]
        if len(valid) == 1:  # the rows as they are: no concatenation, no slicing back
            (only,) = valid
            outputs, state = self._forward(tasks[only].rows, tasks[only].state)
            results[only] = self._answer(tasks[only], self._heads(outputs, tasks[only].rows), state)
        elif valid:
            rows = np.concatenate([tasks[i].rows for i in valid])
            outputs, state = self._forward(rows, self._stacked_state([tasks[i] for i in valid]))
            parameters = self._heads(outputs, rows)
            start = 0
            for i in valid:
                stop = start + len(tasks[i].rows)
                results[i] = self._answer(
                    tasks[i], [_rows(p, start, stop) for p in parameters], None if state is None else state[start:stop]
                )
                start = stop
        return results  # type: ignore[return-value]

    def _check_width(self, task: Task) -> InputError | None:
        width = task.rows.shape[1]
        if width != self.input_size:
            return InputError(("body",), f"the observation gives {width} values; the model takes {self.input_size}", "input_size")
        if task.state is not None and (self.recurrent is None or task.state.shape != (len(task.rows), self.recurrent.width)):
            held = task.state.shape[1]
            return InputError(
                ("query", "episode_id"),
                f"the episode's state holds {held} values per row, which version {self.info.version} does not take",
                "state_size",
            )
        return None

    def _stacked_state(self, tasks: Sequence[Task]) -> np.ndarray | None:
        if self.recurrent is None:
            return None
        width = self.recurrent.width
        return np.concatenate([task.state if task.state is not None else np.zeros((len(task.rows), width), np.float32) for task in tasks])

    def _forward(self, rows: np.ndarray, state: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The model's outputs for the rows and, for a recurrent policy, the new state [rows, width]."""
        if self.recurrent is None:
            return self.model(rows), None
        if state is None:
            state = np.zeros((len(rows), self.recurrent.width), np.float32)
        outputs = self.model(rows, *state_tensors(self.recurrent, state))
        count = len(self.recurrent.state)
        return outputs[:-count], np.concatenate(outputs[-count:], axis=1)

    def parameters(self, rows: np.ndarray, state: np.ndarray | None = None) -> list[HeadParameters]:
        return self._heads(self._forward(rows, state)[0], rows)

    def _heads(self, outputs: list[np.ndarray], rows: np.ndarray) -> list[HeadParameters]:
        mask = rows[:, self.mask_columns] > 0.5 if self.mask_columns is not None else None
        parameters = []
        discrete_index = 0
        for head, slot in zip(self.heads, self.slots, strict=True):
            values = outputs[slot.output][:, slot.start : slot.start + slot.width].astype(np.float64)
            if isinstance(head, DiscreteHead):
                head_mask = None if mask is None else mask[:, self._head_offsets[discrete_index] : self._head_offsets[discrete_index + 1]]
                parameters.append(HeadParameters(head, probabilities=masked_softmax(values, head_mask)))
                discrete_index += 1
            elif slot.has_log_std:
                log_std = np.clip(values[:, head.size :], *LOG_STD_RANGE)
                parameters.append(HeadParameters(head, mean=values[:, : head.size], std=np.exp(log_std)))
            else:
                parameters.append(HeadParameters(head, mean=values))
        return parameters

    def _answer(self, task: Task, parameters: list[HeadParameters], state: np.ndarray | None) -> Result:
        if not _all_finite(parameters) or (state is not None and not np.isfinite(state).all()):
            error_id = uuid.uuid4().hex[:12]
            logger.error("the model gave NaN or infinite outputs for rows %s (error id %s)", task.rows.tolist(), error_id)
            return PolicyFailure(error_id)
        blocked = _first_blocked_row(parameters) if self.mask_columns is not None else None  # only a mask blocks a row
        if blocked is not None:
            row, head = blocked
            loc: tuple[str | int, ...] = ("body", "observations", row) if len(task.rows) > 1 else ("body",)
            return InputError(loc, f"the action mask allows no action of head '{head}'", "no_allowed_action")
        if task.kind is Kind.DISTRIBUTION:
            return Distributions([[_describe(p, row) for p in parameters] for row in range(len(task.rows))], self.info.version)
        # random.Random: seeding numpy's Generator costs ~30 µs, more than the whole sampling.
        rng = random.Random(task.seed) if task.seed is not None else self._rng
        sample = task.kind is Kind.SAMPLE
        decisions = _decide(parameters, len(task.rows), rng if sample else None, self.info.version)
        return decisions if state is None else replace(decisions, state=state)


def state_tensors(recurrent: Recurrent, state: np.ndarray) -> list[np.ndarray]:
    """The flat state [B, width] as the model takes it: one [B, *shape] array per state tensor."""
    tensors, start = [], 0
    for tensor in recurrent.state:
        tensors.append(np.ascontiguousarray(state[:, start : start + tensor.width]).reshape(len(state), *tensor.shape))
        start += tensor.width
    return tensors


def _all_finite(parameters: list[HeadParameters]) -> bool:
    arrays = (a for p in parameters for a in (p.probabilities, p.mean, p.std) if a is not None)
    return all(np.isfinite(a).all() for a in arrays)


def masked_softmax(logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Softmax per row; masked actions get exactly 0. A row with nothing allowed is all 0; one
    with a NaN logit allowed stays NaN, a model failure rather than a row with nothing allowed."""
    logits = np.clip(logits, -_HUGE, _HUGE)  # a model's ±inf logit: certainty, not NaN (NaN stays NaN)
    if mask is None:  # every row has a finite peak: no guard needed
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return weights / weights.sum(axis=1, keepdims=True)
    logits = np.where(mask, logits, -np.inf)
    peak = logits.max(axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.exp(logits - peak)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)


def sample_discrete(probabilities: np.ndarray, rng: random.Random) -> np.ndarray:
    """One draw per row by inverse CDF; an action of probability 0 can never be drawn."""
    cdf = np.cumsum(probabilities, axis=1)
    u = uniforms(rng, len(probabilities)) * cdf[:, -1]
    return (u[:, None] >= cdf).sum(axis=1)


_FEW_DRAWS = 16  # below this, calling rng.random() per draw is the cheaper way to the same values


def uniforms(rng: random.Random, n: int) -> np.ndarray:
    """Exactly n successive `rng.random()` values, leaving `rng` where they would.

    `random()` makes a double of two 32-bit words of the generator (27 and 26 bits of them); for
    a large batch, the words come out in one `randbytes` call and are combined with numpy: the
    same doubles, without a Python call per row.
    """
    if n < _FEW_DRAWS:
        return np.array([rng.random() for _ in range(n)])
    words = np.frombuffer(rng.randbytes(8 * n), dtype="<u4")
    return ((words[0::2] >> 5) * 67108864.0 + (words[1::2] >> 6)) * (1.0 / 9007199254740992.0)


def _rows(parameters: HeadParameters, start: int, stop: int) -> HeadParameters:
    def cut(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[start:stop]

    return HeadParameters(parameters.head, cut(parameters.probabilities), cut(parameters.mean), cut(parameters.std))


def _first_blocked_row(parameters: list[HeadParameters]) -> tuple[int, str] | None:
    for p in parameters:
        if p.probabilities is not None:
            blocked = np.flatnonzero(p.probabilities.sum(axis=1) == 0)
            if blocked.size:
                return int(blocked[0]), p.head.name
    return None


def sample_gaussian(mean: np.ndarray, std: np.ndarray, rng: random.Random) -> np.ndarray:
    noise = np.array([rng.gauss(0.0, 1.0) for _ in range(mean.size)]).reshape(mean.shape)
    return mean + std * noise


def _decide(parameters: list[HeadParameters], batch: int, rng: random.Random | None, version: str) -> Decisions:
    """Actions per head (sampled with `rng`, else the most likely), their joint probability, and
    each head's probability and log-probability of its action."""
    columns: list[np.ndarray] = []
    head_probabilities = np.full((batch, len(parameters)), np.nan)
    head_log_probabilities = np.full((batch, len(parameters)), np.nan)
    for index, p in enumerate(parameters):
        if p.probabilities is not None:
            chosen = sample_discrete(p.probabilities, rng) if rng is not None else p.probabilities.argmax(axis=1)
            head_probabilities[:, index] = p.probabilities[np.arange(batch), chosen]
            with np.errstate(divide="ignore"):  # a certain action of probability 0 cannot be chosen; log(0) is -inf
                head_log_probabilities[:, index] = np.log(head_probabilities[:, index])
            columns.append(chosen[:, None])
        else:
            assert p.mean is not None and isinstance(p.head, ContinuousHead)
            values = p.mean if rng is None or p.std is None else sample_gaussian(p.mean, p.std, rng)
            if p.std is not None:
                head_log_probabilities[:, index] = gaussian_log_density(values, p.mean, p.std)
            columns.append(_clip(values, p.head))
    action_values = np.concatenate(columns, axis=1)
    discrete = parameters[0].probabilities is not None
    joint = head_probabilities.prod(axis=1).tolist() if discrete else [None] * batch
    return Decisions(action_values.tolist(), joint, version, head_probabilities, head_log_probabilities, action_values)


def gaussian_log_density(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per row, the log-density of `values` under independent normals (summed over the columns)."""
    z = (values - mean) / std
    return (-0.5 * z * z - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(axis=1)


def _clip(values: np.ndarray, head: ContinuousHead) -> np.ndarray:
    if head.low is None and head.high is None:
        return values
    return np.clip(values, head.low if head.low is not None else -np.inf, head.high if head.high is not None else np.inf)


def _describe(p: HeadParameters, row: int) -> dict[str, Any]:
    if p.probabilities is not None:
        labels = p.head.labels if isinstance(p.head, DiscreteHead) else None
        return {"name": p.head.name, "labels": None if labels is None else list(labels), "probabilities": p.probabilities[row].tolist()}
    assert p.mean is not None
    return {"name": p.head.name, "mean": p.mean[row].tolist(), "std": None if p.std is None else p.std[row].tolist()}


def describe_head(head: Head) -> dict[str, Any]:
    if isinstance(head, DiscreteHead):
        return {"name": head.name, "kind": "discrete", "n": head.n, "labels": None if head.labels is None else list(head.labels)}
    return {
        "name": head.name,
        "kind": "continuous",
        "size": head.size,
        "low": None if head.low is None else list(head.low),
        "high": None if head.high is None else list(head.high),
    }


# --- reading the heads from a model's outputs ------------------------------------------------


def build_policy(spec: PolicySpec, model: Model, info: ModelInfo) -> Policy:
    """Check the model against the schema (sizes, heads, mask, finite outputs) and read its heads.

    A mismatch is the user's to fix, so it is a `ConfigError` naming both sizes.
    """
    model_path = info.path
    _check_declared_state(spec, info)
    stateless = model if spec.recurrent is None else _from_zero_state(model, spec.recurrent)
    # The state is checked first when the input size is known: a state of the wrong shape would
    # otherwise fail the input size's probes, and be told as the wrong input size.
    known_size = info.declared_input_size or spec.input_size
    if spec.recurrent is not None and known_size is not None:
        _check_state_outputs(spec, spec.recurrent, model, info, known_size)
    input_size = _input_size(spec, stateless, info)
    if spec.recurrent is not None and known_size is None:
        _check_state_outputs(spec, spec.recurrent, model, info, input_size)
    try:
        outputs = stateless(np.zeros((2, input_size), dtype=np.float32))
    except Exception as exc:
        raise ConfigError(
            model_path,
            "model",
            f"fails on a batch of 2 rows of {input_size} values ({model_error_line(exc)})",
            "export it with forward(obs: float32[B, D]) and a dynamic batch dimension",
        ) from None
    heads, slots = _read_heads(spec, [o.shape[1] for o in outputs], model_path)
    mask_columns = _mask_columns(spec, heads)
    policy = Policy(model, info, input_size, heads, slots, mask_columns, spec.recurrent)
    _refuse_non_finite_outputs(policy, spec)
    return policy


_RECURRENT_CONTRACT = "export it as forward(obs[B, D], *state) -> (outputs..., *new_state), each state tensor [B, ...]"


def _from_zero_state(model: Model, recurrent: Recurrent) -> Model:
    """The model's outputs (less its new state) for rows of new episodes: what the checks probe."""

    def outputs(rows: np.ndarray) -> list[np.ndarray]:
        zeros = np.zeros((len(rows), recurrent.width), np.float32)
        return model(rows, *state_tensors(recurrent, zeros))[: -len(recurrent.state)]

    return outputs


def _check_declared_state(spec: PolicySpec, info: ModelInfo) -> None:
    """The state inputs the model file declares (.pt2, ONNX) against the schema's `recurrent.state`."""
    declared = info.declared_state_shapes
    if declared is None:
        return
    if spec.recurrent is None:
        if declared:
            raise ConfigError(
                spec.path,
                "recurrent",
                f"the model takes {len(declared)} input(s) after the rows (a recurrent policy's state?) and the schema has no recurrent section",
                "declare them, e.g. 'recurrent: {state: [{name: h, shape: [1, 64]}]}' (shapes without the batch dimension)",
            )
        return
    wanted = spec.recurrent.state
    if len(declared) != len(wanted):
        raise ConfigError(
            spec.path,
            "recurrent.state",
            f"lists {len(wanted)} state tensor(s); the model takes {len(declared)} input(s) after the rows",
            "list one entry per state input of the model, in its order",
        )
    for index, (tensor, shape) in enumerate(zip(wanted, declared, strict=True)):
        if len(shape) != len(tensor.shape) or any(
            size is not None and size != want for size, want in zip(shape, tensor.shape, strict=True)
        ):
            model_shape = [size if size is not None else "any" for size in shape]
            raise ConfigError(
                spec.path,
                f"recurrent.state[{index}].shape",
                f"is {list(tensor.shape)} for '{tensor.name}'; the model's input takes {model_shape} (less the batch dimension)",
                f"write the model's shape: 'shape: {model_shape}'",
            )


def _check_state_outputs(spec: PolicySpec, recurrent: Recurrent, model: Model, info: ModelInfo, input_size: int) -> None:
    """The model runs on zero state of the schema's shapes and returns a new state of those sizes."""
    shapes = ", ".join(f"{tensor.name} {list(tensor.shape)}" for tensor in recurrent.state)
    try:
        outputs = model(np.zeros((2, input_size), np.float32), *state_tensors(recurrent, np.zeros((2, recurrent.width), np.float32)))
    except Exception as exc:
        raise ConfigError(
            info.path,
            "model",
            f"fails on 2 rows of {input_size} values with zero state ({shapes}): {model_error_line(exc)}",
            _RECURRENT_CONTRACT,
        ) from None
    count = len(recurrent.state)
    if len(outputs) <= count:
        raise ConfigError(
            info.path,
            "model",
            f"returns {len(outputs)} tensor(s); a recurrent model returns its outputs, then its {count} new state tensor(s)",
            _RECURRENT_CONTRACT,
        )
    for index, (tensor, output) in enumerate(zip(recurrent.state, outputs[-count:], strict=True)):
        if output.shape[1] != tensor.width:
            raise ConfigError(
                spec.path,
                f"recurrent.state[{index}].shape",
                f"{list(tensor.shape)} holds {tensor.width} values per row; the model returns {output.shape[1]} for '{tensor.name}'",
                "write the shape of the state tensor the model returns (without the batch dimension)",
            )


def _input_size(spec: PolicySpec, model: Model, info: ModelInfo) -> int:
    """The model's input size: the one its file declares, checked against the schema's; else the
    schema's, if the model runs on it; else the one it runs on, found by trying its candidates."""
    expected, declared = spec.input_size, info.declared_input_size
    if declared is not None:
        if expected is not None and expected != declared:
            raise _size_mismatch(spec, info, [declared])
        return declared
    if expected is None:
        return _the_size_it_runs_on(spec, model, info)
    failure = _failure_on_a_row(model, expected)
    if failure is None:
        return expected
    accepted = _sizes_it_runs_on(model, [*info.candidate_input_sizes, *_sizes_named_in(failure)], expected)
    if accepted:
        raise _size_mismatch(spec, info, accepted)
    raise ConfigError(
        info.path,
        "model",
        f"fails on a row of {expected} input values, the size {spec.path.name} describes ({failure})",
        f"make the observations add up to the model's input size, or serve a model that runs on rows of {expected} values",
    )


def _size_mismatch(spec: PolicySpec, info: ModelInfo, sizes: Sequence[int]) -> ConfigError:
    return ConfigError(
        info.path,
        "model",
        f"takes {' or '.join(map(str, sizes))} input values but {spec.path.name} describes {spec.input_size}",
        "make the observations add up to the model's input size, or serve the matching model",
    )


def _the_size_it_runs_on(spec: PolicySpec, model: Model, info: ModelInfo) -> int:
    accepted = _sizes_it_runs_on(model, info.candidate_input_sizes)
    if len(accepted) == 1:
        return accepted[0]
    runs_on = f" (it runs on rows of {' or '.join(map(str, accepted))} values)" if accepted else ""
    raise ConfigError(
        spec.path,
        "observations",
        f"the model's input size cannot be read from its file{runs_on} and the schema does not fix it",
        "give every list equal min_items and max_items, or serve a .pt2, which declares its input size",
    )


def _sizes_it_runs_on(model: Model, candidates: Sequence[int], tried: int | None = None) -> list[int]:
    """Those of the first few candidates (bar `tried`) that the model runs a zero row of."""
    untried = [size for size in dict.fromkeys(candidates) if size != tried and 0 < size <= MAX_PROBED_SIZE][:MAX_PROBES]
    return sorted(size for size in untried if _failure_on_a_row(model, size) is None)


def _sizes_named_in(failure: str) -> list[int]:
    """The numbers of torch's error, e.g. "mat1 and mat2 shapes cannot be multiplied (1x5 and 6x4)":
    a weight that is neither parameter nor buffer (a TorchScript constant) is named only there."""
    return [int(number) for number in re.findall(r"\d+", failure)]


def _failure_on_a_row(model: Model, size: int) -> str | None:
    """torch's error line when the model fails on one zero row of `size` values, else None."""
    try:
        model(np.zeros((1, size), dtype=np.float32))
    except Exception as exc:  # a model may raise anything; the line is all the user needs
        return model_error_line(exc)
    return None


def _refuse_non_finite_outputs(policy: Policy, spec: PolicySpec) -> None:
    """A model of NaN weights passes every other check, then answers 500 to every request: refuse it
    now, on an all-zero row and on the schema's example observation (the middle of its bounds)."""
    probes = {"an all-zero input row": np.zeros((1, policy.input_size), dtype=np.float32)}
    if spec.observations is not None:
        example = RowEncoder(spec).encode([example_observation(spec)])
        if example.shape[1] == policy.input_size:  # lists of varying length: the example has 1 item each
            probes["the schema's example observation"] = example
    for rows_name, rows in probes.items():
        try:
            parameters = policy.parameters(rows)
        except Exception as exc:
            raise ConfigError(
                policy.info.path,
                "model",
                f"fails on {rows_name} ({model_error_line(exc)})",
                "make forward(obs: float32[B, D]) run on any batch of the observations the schema allows",
            ) from None
        if not _all_finite(parameters):
            raise ConfigError(
                policy.info.path,
                "model",
                f"gives NaN or infinite outputs for {rows_name}",
                "check the model's weights for NaN (a diverged training run?) and export it again",
            )


def _read_heads(spec: PolicySpec, widths: list[int], model_path: str) -> tuple[list[Head], list[OutputSlot]]:
    if not spec.is_tuple:
        widths = widths[:1]  # e.g. (logits, value): the first item is the policy's
    declared = spec.actions
    if spec.discrete:
        return _discrete_heads(spec, declared, widths, model_path)
    return _continuous_heads(declared, widths, model_path)


def _discrete_heads(
    spec: PolicySpec, declared: tuple[Head, ...] | None, widths: list[int], model_path: str
) -> tuple[list[Head], list[OutputSlot]]:
    if len(widths) > 1:  # one tensor per head: sizes come from the model
        if declared is not None and [h.n for h in declared if isinstance(h, DiscreteHead)] != widths:
            raise ConfigError(
                model_path,
                "actions",
                f"the model returns heads of sizes {widths}, schema.yaml declares {[h.n for h in declared if isinstance(h, DiscreteHead)]}",
                "make actions[*].n match the model's outputs",
            )
        heads: list[Head] = list(declared) if declared is not None else [DiscreteHead(f"action_{i}", n) for i, n in enumerate(widths)]
        return heads, [OutputSlot(i, 0, n) for i, n in enumerate(widths)]
    width = widths[0]
    if declared is None:
        if spec.is_tuple:
            raise ConfigError(
                spec.path,
                "actions",
                f"a tuple policy whose model returns one tensor of {width} logits: the head sizes cannot be known",
                "list the heads under actions (e.g. '- {name: a, n: 2}'), or return one tensor per head",
            )
        return [DiscreteHead("action", width)], [OutputSlot(0, 0, width)]
    sizes = [h.n for h in declared if isinstance(h, DiscreteHead)]
    if sum(sizes) != width:
        raise ConfigError(
            model_path,
            "actions",
            f"the model returns {width} logits, schema.yaml's heads add up to {sum(sizes)} ({sizes})",
            "make actions[*].n add up to the model's output size",
        )
    starts = np.cumsum([0, *sizes])
    return list(declared), [OutputSlot(0, int(starts[i]), n) for i, n in enumerate(sizes)]


def _continuous_heads(declared: tuple[Head, ...] | None, widths: list[int], model_path: str) -> tuple[list[Head], list[OutputSlot]]:
    if declared is None:  # every output is a mean
        return [ContinuousHead(f"action_{i}" if len(widths) > 1 else "action", w) for i, w in enumerate(widths)], [
            OutputSlot(i, 0, w) for i, w in enumerate(widths)
        ]
    sizes = [h.size for h in declared if isinstance(h, ContinuousHead)]
    if len(widths) > 1:
        if len(widths) != len(sizes) or any(w not in (d, 2 * d) for w, d in zip(widths, sizes, strict=True)):
            raise ConfigError(
                model_path,
                "actions",
                f"the model returns outputs of widths {widths} for heads of sizes {sizes}",
                "each head's output must be its size (means) or twice it (means, then log-stds)",
            )
        return list(declared), [OutputSlot(i, 0, w, w == 2 * d) for i, (w, d) in enumerate(zip(widths, sizes, strict=True))]
    width, total = widths[0], sum(sizes)
    if width not in (total, 2 * total):
        raise ConfigError(
            model_path,
            "actions",
            f"the model returns {width} values, the heads need {total} (means) or {2 * total} (means, then log-stds)",
            "make actions[*].size match the model's output",
        )
    factor = width // total
    starts = np.cumsum([0] + [factor * d for d in sizes])
    return list(declared), [OutputSlot(0, int(starts[i]), factor * d, factor == 2) for i, d in enumerate(sizes)]


def _mask_columns(spec: PolicySpec, heads: list[Head]) -> slice | None:
    if spec.action_mask is None:
        return None
    columns = spec.columns_of(spec.action_mask)
    assert columns is not None  # schema.py refuses a mask without a fixed place
    total = sum(h.n for h in heads if isinstance(h, DiscreteHead))
    if columns.stop - columns.start != total:
        raise ConfigError(
            spec.path,
            f"observations.{spec.action_mask}",
            f"the mask has {columns.stop - columns.start} entries but the model's heads have {total} actions",
            f"set its min_items and max_items to {total}",
        )
    return columns
