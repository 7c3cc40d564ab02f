"""The streamlit page: the sidebar (server, policy, key, status, start and stop), the observation form
made from `/schema`, the answer with a chart per head and the version that computed it, and the
session's history.

A server of one policy is asked at its root routes, as in wave 1; a server of several (`GET
/policies`) gets a choice of policy, whose routes are then asked under `/policies/NAME` with that
policy's own key. Streamlit reruns this script top to bottom on every click; what must outlive a run
(the last answer, the history, a start failure, each policy's key) is in `st.session_state`, every
widget's value too (keyed by the policy's name, so another policy at the same URL gets its own form).
"""

import os
import random
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from policy_server.demo import launcher
from policy_server.demo.answers import (
    ALLOWED,
    CHOSEN,
    MASKED,
    Answer,
    HeadView,
    answered_by,
    head_views,
    history_csv,
    history_row,
    logged_as,
)
from policy_server.demo.client import Listing, PolicyClient, ServerError, Unreachable
from policy_server.demo.form import Field, Scalar, Value, Widget, example_value, fields, format_list, parse_list, random_value
from policy_server.errors import ConfigError
from policy_server.schema import load_spec

if TYPE_CHECKING:
    import altair as alt

DEFAULT_URL = "http://127.0.0.1:8000"
HISTORY_ROWS = 50
GRID_COLUMNS = 3
ROUTES = {"predict": "Predict (sampled)", "predict_deterministic": "Deterministic", "distribution": "Distribution"}
COLORS = {CHOSEN: "#e4572e", ALLOWED: "#4c78a8", MASKED: "#c7c7c7"}


def main() -> None:
    st.set_page_config(page_title="Policy Server demo", layout="wide")
    client, info = _sidebar()
    if info is None:
        st.title("Policy Server demo")
        st.info("No policy to ask yet: the sidebar says why. Point it at a running server, or start one from a schema there.")
        if (failure := st.session_state.get("launch_failure")) and failure[1]:
            st.caption("The end of the log of the server this page tried to start:")
            st.code(failure[1], language=None, wrap_lines=True)
        return
    try:
        schema = client.get("/schema")
    except (ServerError, Unreachable) as exc:
        st.error(str(exc))
        return
    st.title(f"{schema['name']} policy")
    _episode_controls(info)
    has_observations = bool(schema.get("observations"))
    tabs = st.tabs((["Observation"] if has_observations else []) + ["Raw observation"])
    if has_observations:
        with tabs[0]:
            _observation_tab(client, schema)
    with tabs[-1]:
        _raw_tab(client, schema)
    _show_answer()
    _show_history()


# --- the sidebar -------------------------------------------------------------------------------


def _sidebar() -> tuple[PolicyClient, dict[str, Any] | None]:
    """The client for the URL, policy and key chosen, and `/info` if that policy is ready to answer."""
    st.session_state.setdefault("url", DEFAULT_URL)
    st.session_state.setdefault("api_key", os.environ.get("POLICY_SERVER_API_KEY", ""))
    with st.sidebar:
        st.header("Policy Server")
        url = st.text_input("Server URL", key="url")
        listing = _listing(url)
        name = _choose_policy(listing)
        api_key = st.text_input("API key", key="api_key", type="password", help="Sent as the header access-token.")
        client = PolicyClient(url, api_key, prefix="" if name is None else f"/policies/{name}")
        answering, info = _status(client, listing)
        _launch_controls(client.url, answering)
    return client, info


def _listing(url: str) -> Listing | Unreachable:
    """The policies served at `url` (`GET /policies`, which no key guards), or why nothing answers there."""
    try:
        return Listing.of(PolicyClient(url, "").get("/policies"))
    except Unreachable as exc:
        return exc
    except ServerError:
        return Listing([], None)  # no list of policies: one policy, at the root routes; /info says more


def _choose_policy(listing: Listing | Unreachable) -> str | None:
    """The policy chosen, defaulting to the server's default; None (no choice shown) for one policy: the root routes."""
    if isinstance(listing, Unreachable) or listing.one_policy:
        _hold_key_of(None)
        return None
    if st.session_state.get("policy") not in listing.names:  # first seen, or another server at the URL now
        st.session_state["policy"] = listing.default if listing.default in listing.names else listing.names[0]
    name: str = st.selectbox("Policy", listing.names, key="policy", help="The policies this server serves; each opens to its own key.")
    _hold_key_of(name)
    return name


def _hold_key_of(name: str | None) -> None:
    """Keep the key field on the chosen policy's key (before the field is drawn): the key it had when
    another was chosen, or the one its schema.yaml names if this page started the server; a policy
    not met yet keeps what the field holds. `None`: one policy, whose key is the field, as in wave 1."""
    keys: dict[str, str] = st.session_state.setdefault("policy_keys", {})
    owner = st.session_state.get("key_owner")
    if owner == name:
        return
    if owner is not None:
        keys[owner] = st.session_state["api_key"]
    if name is not None and name in keys:
        st.session_state["api_key"] = keys[name]
    st.session_state["key_owner"] = name


def _status(client: PolicyClient, listing: Listing | Unreachable) -> tuple[bool, dict[str, Any] | None]:
    """Show whether the policy answers at the URL; (something answers, `/info` if the policy is ready)."""
    if isinstance(listing, Unreachable):
        st.error(str(listing))
        return False, None
    for name, reason in listing.unservable.items():
        st.warning(f"**{name}** cannot be served: {reason}")
    try:
        info = client.get("/info")
    except Unreachable as exc:
        st.error(str(exc))
        return False, None
    except ServerError as exc:
        st.warning(f"The server at {client.url} answers, but: {exc}")
        return True, None
    if not info.get("ready"):
        st.warning(f"**{info.get('name')}** is loading its policy; retry in a moment.")
        return True, None
    version = f" version {info['policy_version']}" if info.get("policy_version") else ""
    st.success(
        f"**{info['name']}**{version} answers: model `{info['model']}` ({info['format']}), backend {info['backend']}, device {info['device']}"
    )
    return True, info


def _launch_controls(url: str, answering: bool) -> None:
    """Stop for a server this page started; Start (from a schema) when nothing answers."""
    child = launcher.started_here(url)
    if child is not None and child.running:
        st.caption(f"Started here: {child.label} (pid {child.process.pid})")
        if st.button("Stop", key="stop", help="Ends the server this page started, and nothing else."):
            launcher.stop(url)
            st.rerun()
        return
    if child is not None:
        st.session_state["launch_failure"] = (f"The server started here exited with code {child.process.returncode}.", child.log_tail())
        launcher.stop(url)
    if not answering:
        folders = launcher.policy_folders()
        label = st.selectbox("Policy to serve", list(folders), key="policy_folder")
        if launcher.is_repository(folders[label]):
            st.caption("Each policy answers to its schema's key; one without, to this page's API key (else a new random one).")
        else:
            st.caption("It answers to this page's API key; if the field is empty, to its schema's key (else a new random one).")
        if st.button("Start the server from schema", key="start", type="primary", on_click=_fill_missing_key, args=(folders[label],)):
            _start(url, label, folders[label])
        if failure := st.session_state.get("launch_failure"):
            st.error(failure[0])  # and the log's tail in the main area, where it has room


def _fill_missing_key(folder: Path) -> None:
    """Before the run that starts a server (callbacks may still change widgets): the key it will
    answer to. The schema's own, which its README's curl examples use; else a new random one.
    A repository: each policy's key is its schema's, the field's key (else a new random one) that
    of the policies whose schema names none, as the server takes POLICY_SERVER_API_KEY."""
    if not launcher.is_repository(folder):
        if not st.session_state["api_key"]:
            st.session_state["api_key"] = _schema_key(folder / launcher.SCHEMA_FILE) or secrets.token_urlsafe(16)
        return
    fallback = st.session_state["api_key"] or secrets.token_urlsafe(16)
    st.session_state["api_key"] = fallback
    st.session_state["policy_keys"] = {name: _schema_key(schema) or fallback for name, schema in launcher.policy_schemas(folder).items()}
    st.session_state["key_owner"] = None


def _schema_key(schema: Path) -> str | None:
    """The key in a schema.yaml, read by `schema` alone: `loading`, which also finds models, imports
    torch, and the page must stay light to show fast."""
    try:
        return load_spec(schema).api_key
    except ConfigError:
        return None  # the server will not serve it either; its log or /policies will say why


def _start(url: str, label: str, folder: Path) -> None:
    st.session_state.pop("launch_failure", None)
    with st.status(f"Starting {label}…", expanded=True) as status:
        progress = st.empty()
        try:
            child = launcher.start(url, label, folder, st.session_state["api_key"])
            launcher.wait_until_ready(child, lambda elapsed, line: progress.caption(f"{elapsed:.0f} s, waiting for /ready. {line}"))
        except launcher.LaunchError as exc:
            st.session_state["launch_failure"] = (str(exc), exc.log_tail)
            status.update(state="error")
    st.rerun()


# --- the episode ----------------------------------------------------------------------------


def _episode_controls(info: dict[str, Any]) -> None:
    """The "episode" toggle: on, every decision asked is sent as the next step of one episode
    (`?episode_id=`), which a policy that logs experience writes to its log."""
    with st.container(horizontal=True):
        on = st.toggle("Episode", key="episode_on", help="Send each decision as a step of one episode, for the experience log.")
        if on:
            st.session_state.setdefault("episode_id", _new_episode_id())
            st.caption(f"episode **{st.session_state['episode_id']}**")
            st.button("New episode", key="new_episode", on_click=lambda: st.session_state.update(episode_id=_new_episode_id()))
    if on and info.get("experience") is None:
        st.caption("This policy logs no experience (no `experience:` in its schema.yaml): the steps are not kept.")


def _new_episode_id() -> str:
    return f"demo-{secrets.token_hex(4)}"


def _episode() -> str | None:
    return st.session_state.get("episode_id") if st.session_state.get("episode_on") else None


# --- the observation form ------------------------------------------------------------------


def _observation_tab(client: PolicyClient, schema: dict[str, Any]) -> None:
    form_fields = fields(schema)
    prefix = f"obs:{schema['name']}:"
    for field in form_fields:
        for key, value in _widget_values(prefix, field, example_value(field)).items():
            st.session_state.setdefault(key, value)
    st.button("Random observation", key="random", on_click=_randomise, args=(prefix, form_fields))
    observation, problems = _inputs(prefix, form_fields)
    mask = observation.get(schema.get("action_mask") or "")
    asked = None
    with st.container(horizontal=True):
        for route, label in ROUTES.items():
            if st.button(label, key=f"ask:{route}", disabled=bool(problems), type="primary" if route == "predict" else "secondary"):
                asked = route
    if asked:
        _ask(client, asked, observation, schema["actions"], [bool(v) for v in mask] if isinstance(mask, list) else None)


def _widget_values(prefix: str, field: Field, value: Value) -> dict[str, Any]:
    """The widget states that show `value`: one widget, one per element, or the text of a text area."""
    key = prefix + field.name
    if field.widget is Widget.TEXT:
        assert isinstance(value, list)
        return {key: format_list(value)}
    if isinstance(value, list):
        return {f"{key}[{i}]": element for i, element in enumerate(value)}
    return {key: value}


def _randomise(prefix: str, form_fields: list[Field]) -> None:
    rng = random.Random()
    for field in form_fields:
        st.session_state.update(_widget_values(prefix, field, random_value(field, rng)))


def _inputs(prefix: str, form_fields: list[Field]) -> tuple[dict[str, Value], list[str]]:
    """Draw the inputs (scalars in a grid, then one row per list); the observation and its problems."""
    observation: dict[str, Value] = {}
    problems: list[str] = []
    scalars = [field for field in form_fields if field.widget is Widget.SCALAR]
    for start in range(0, len(scalars), GRID_COLUMNS):
        for column, field in zip(st.columns(GRID_COLUMNS), scalars[start : start + GRID_COLUMNS], strict=False):
            with column:
                observation[field.name] = _scalar_input(prefix + field.name, field.name, field, field.description)
    for field in form_fields:
        if field.widget is not Widget.SCALAR:
            observation[field.name], field_problems = _list_input(prefix, field)
            problems.extend(field_problems)
    return observation, problems


def _scalar_input(key: str, label: str, field: Field, help: str | None = None) -> Scalar:
    """A checkbox, or a number input with the field's bounds; `field` is a scalar or a list (its elements)."""
    if field.element == "bool":
        return st.checkbox(label, key=key, help=help)
    low, high = field.bounds()
    step = 1 if field.element == "int" else None
    return st.number_input(label, min_value=low, max_value=high, step=step, key=key, help=help)


def _list_input(prefix: str, field: Field) -> tuple[list[Scalar], list[str]]:
    key = prefix + field.name
    if field.widget is Widget.TEXT:
        text = st.text_area(f"{field.name}: {_length_text(field)}, separated by commas", key=key, help=field.description)
        values, problems = parse_list(field, text)
        if problems:
            st.error("Not sent until fixed: " + "; ".join(problems))
        return values, problems
    caption = "the action mask: unchecked actions are not allowed" if field.widget is Widget.MASK else field.description
    st.markdown(f"**{field.name}**" + (f" ({caption})" if caption else ""))
    labels = field.labels or tuple(f"{field.name}[{i}]" for i in range(field.length))
    with st.container(horizontal=True):
        return [_scalar_input(f"{key}[{i}]", label, field) for i, label in enumerate(labels)], []


def _length_text(field: Field) -> str:
    noun = {"bool": "true/false values", "int": "whole numbers"}.get(field.element, "numbers")
    if field.min_items is not None and field.min_items == field.max_items:
        return f"{field.min_items} {noun}"
    return f"{field.min_items or 0} to {field.max_items if field.max_items is not None else 'any number of'} {noun}"


# --- the raw tab ---------------------------------------------------------------------------


def _raw_tab(client: PolicyClient, schema: dict[str, Any]) -> None:
    size: int = schema["input_size"]
    row = Field(name="obs", element="float", widget=Widget.TEXT, is_list=True, min_items=size, max_items=size)
    key = f"raw:{schema['name']}"
    st.session_state.setdefault(key, format_list([0.0] * size))
    st.caption("The model's input row as it is: the observations concatenated in schema order, bools as 1 or 0.")
    text = st.text_area(f"obs: {size} numbers, separated by commas", key=key)
    values, problems = parse_list(row, text)
    if problems:
        st.error("Not sent until fixed: " + "; ".join(problems))
    if st.button("Predict raw (sampled)", key="ask:predict_raw", disabled=bool(problems), type="primary"):
        _ask(client, "predict_raw", {"obs": values}, schema["actions"], None)


# --- asking, and showing the answers -------------------------------------------------------


def _ask(client: PolicyClient, route: str, body: dict[str, Any], heads: list[dict[str, Any]], mask: list[bool] | None) -> None:
    """Ask `route` (and /distribution, for the chart, unless the body is a raw row); keep the answer or the error.
    A decision is a step of the episode, when the toggle is on."""
    episode = None if route == "distribution" else _episode()
    try:
        decision = None if route == "distribution" else client.ask(f"/{route}", body, {"episode_id": episode} if episode else None)
        distribution = None if route == "predict_raw" else client.ask("/distribution", body)
    except (ServerError, Unreachable) as exc:
        st.session_state["answer"] = None
        st.session_state["error"] = str(exc)
        return
    answered = decision or distribution
    assert answered is not None, "every route asks the decision, the distribution or both"
    answer = Answer(
        route=route,
        sent=body,
        heads=heads,
        actions=None if decision is None else decision.body["actions"],
        probability=None if decision is None else decision.body["probability"],
        distribution=None if distribution is None else distribution.body["heads"],
        mask=mask,
        policy=answered.policy,
        version=answered.version,
        episode=episode,
        step=None if decision is None else decision.step,
    )
    st.session_state["answer"] = answer
    st.session_state["error"] = None
    st.session_state["history"] = [*st.session_state.get("history", []), history_row(answer)][-HISTORY_ROWS:]


def _show_answer() -> None:
    st.subheader("Answer")
    if error := st.session_state.get("error"):
        st.error(error)
        return
    answer: Answer | None = st.session_state.get("answer")
    if answer is None:
        st.caption("Press a button to ask the policy.")
        return
    views = head_views(answer)
    columns = st.columns(len(views) + 1)
    for column, view in zip(columns, views, strict=False):
        column.metric(view.name, view.choice)
        column.caption(view.detail)
    if answer.probability is not None:
        columns[-1].metric("probability", f"{answer.probability:.4g}")
    st.caption(
        ", ".join(filter(None, (f"{ROUTES.get(answer.route, answer.route)} at {answer.at}", answered_by(answer), logged_as(answer))))
    )
    charted = [view for view in views if view.bars]
    for column, view in zip(st.columns(len(charted)) if charted else [], charted, strict=True):
        column.altair_chart(_chart(view), width="stretch")


def _chart(view: HeadView) -> "alt.LayerChart":
    """The head's probabilities in label order, the chosen action highlighted, masked ones marked at 0.
    altair is imported here, at the first answer, not with the page: the first render needs no chart."""
    import altair as alt

    base = alt.Chart(alt.Data(values=view.bars)).encode(
        x=alt.X("label:N", sort=None, title=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"),
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "status:N", scale=alt.Scale(domain=list(COLORS), range=list(COLORS.values())), legend=alt.Legend(orient="bottom", title=None)
        )
    )
    return (bars + base.mark_text(dy=-8).encode(text="text:N")).properties(title=f"{view.name}: /distribution", height=260)


def _show_history() -> None:
    rows = st.session_state.get("history")
    if not rows:
        return
    st.subheader("History")
    st.dataframe(rows[::-1], hide_index=True)
    st.download_button("Download CSV", history_csv(rows), file_name="decisions.csv", mime="text/csv")
