"""What the page shows for an answer of the server: each head's choice, its bars, the history row.
Plain functions of the server's JSON; no streamlit here."""

import csv
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from policy_server.demo.form import head_labels

CHOSEN, ALLOWED, MASKED = "chosen", "allowed", "masked (0)"
HISTORY_COLUMNS = ("time", "route", "policy", "version", "action", "probability", "episode", "step", "observation")


@dataclass(frozen=True)
class Answer:
    """One press of a button: what was sent where, and what came back.

    `heads` are `/schema`'s `actions` when it was asked (the answer is shown with them even if the server
    changes); `actions`/`probability` are the decision (None for /distribution alone, whose most likely
    actions are shown instead); `distribution` is /distribution's heads for the same observation (None for
    raw rows); `mask` the action mask sent, if any; `policy` and `version` what the server says answered;
    `episode` the episode the decision was sent as a step of, and `step` its index if the server logged it."""

    route: str
    sent: dict[str, Any]
    heads: list[dict[str, Any]]
    actions: list[Any] | None
    probability: float | None
    distribution: list[dict[str, Any]] | None
    mask: list[bool] | None = None
    policy: str | None = None
    version: str | None = None
    episode: str | None = None
    step: int | None = None
    at: str = field(default_factory=lambda: time.strftime("%H:%M:%S"))


@dataclass(frozen=True)
class HeadView:
    name: str
    choice: str  # a label, or the values of a continuous head
    detail: str  # the chosen action's probability, or mean ± std
    bars: list[dict[str, Any]]  # discrete heads with a distribution: label, probability, status, text


def head_views(answer: Answer) -> list[HeadView]:
    """One view per head, in order."""
    heads = answer.heads
    actions = iter(answer.actions) if answer.actions is not None else None
    distributions = answer.distribution or [None] * len(heads)
    masks = _split_mask(answer.mask, heads)
    return [
        _discrete_view(head, actions, distribution, next(masks))
        if head["kind"] == "discrete"
        else _continuous_view(head, actions, distribution)
        for head, distribution in zip(heads, distributions, strict=True)
    ]


def _split_mask(mask: list[bool] | None, heads: Sequence[dict[str, Any]]) -> Iterator[list[bool] | None]:
    """The mask covers the discrete heads' actions concatenated: each discrete head's part, in order."""
    start = 0
    for head in heads:
        if head["kind"] == "discrete":
            yield None if mask is None else mask[start : start + head["n"]]
            start += head["n"]


def _discrete_view(
    head: dict[str, Any], actions: Iterator[Any] | None, distribution: dict[str, Any] | None, mask: list[bool] | None
) -> HeadView:
    labels = head_labels(head)
    probabilities: list[float] | None = distribution["probabilities"] if distribution else None
    if actions is not None:
        chosen = int(next(actions))
    else:
        assert probabilities is not None, "an answer has actions, a distribution, or both"
        chosen = max(range(len(probabilities)), key=probabilities.__getitem__)
    if probabilities is None:
        return HeadView(head["name"], labels[chosen], "", [])
    detail = f"p = {probabilities[chosen]:.4g}" + ("" if actions is not None else " (most likely)")
    return HeadView(head["name"], labels[chosen], detail, _bars(labels, probabilities, chosen, mask))


def _bars(labels: list[str], probabilities: list[float], chosen: int, mask: list[bool] | None) -> list[dict[str, Any]]:
    def status(index: int) -> str:
        if index == chosen:
            return CHOSEN
        return MASKED if mask is not None and not mask[index] else ALLOWED

    return [
        {"label": label, "probability": p, "status": status(i), "text": "masked" if status(i) == MASKED else f"{p:.2f}"}
        for i, (label, p) in enumerate(zip(labels, probabilities, strict=True))
    ]


def _continuous_view(head: dict[str, Any], actions: Iterator[Any] | None, distribution: dict[str, Any] | None) -> HeadView:
    mean: list[float] | None = distribution["mean"] if distribution else None
    std: list[float] | None = distribution["std"] if distribution else None
    values = [next(actions) for _ in range(head["size"])] if actions is not None else mean
    assert values is not None, "an answer has actions, a distribution, or both"
    detail = "" if mean is None else "mean " + ", ".join(_mean_std(m, None if std is None else std[i]) for i, m in enumerate(mean))
    return HeadView(head["name"], _numbers(values), detail, [])


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values)


def history_row(answer: Answer) -> dict[str, Any]:
    return {
        "time": answer.at,
        "route": answer.route,
        "policy": answer.policy,
        "version": answer.version,
        "action": "; ".join(f"{view.name}: {view.choice}" for view in head_views(answer)),
        "probability": answer.probability,
        "episode": answer.episode,
        "step": answer.step,
        "observation": json.dumps(answer.sent, separators=(",", ":")),
    }


def answered_by(answer: Answer) -> str:
    """Which policy and version computed the answer, as the server's headers say ("" if they do not)."""
    if answer.version is None:
        return ""
    return f"answered by {answer.policy} version {answer.version}" if answer.policy else f"answered by version {answer.version}"


def logged_as(answer: Answer) -> str:
    """Which step of which episode the server logged the decision as ("" if none was named)."""
    if answer.episode is None:
        return ""
    if answer.step is None:
        return f"episode {answer.episode}: not logged (this policy logs no experience)"
    return f"step {answer.step} of episode {answer.episode}"


def history_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
