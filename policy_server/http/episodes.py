"""The episode a prediction request names, read from its query (and, for a batch, its body)."""

from typing import Annotated

from fastapi import Query

from policy_server.errors import InputError
from policy_server.experience.episodes import ID_PATTERN, ID_RULE, SINGLE_AGENT, AgentRef

EpisodeId = Annotated[
    str | None,
    Query(
        pattern=ID_PATTERN,
        description=f"Logs this decision as a step of the named episode (when the policy logs experience); {ID_RULE}.",
    ),
]
AgentId = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description=f"The agent of the episode this decision is for, when it has several; {ID_RULE}."),
]


def one_agent(episode_id: str | None, agent_id: str | None) -> list[AgentRef] | None:
    if episode_id is None:
        if agent_id is not None:
            raise InputError(("query", "agent_id"), "agent_id needs the episode_id it belongs to", "missing_episode_id")
        return None
    return [AgentRef(episode_id, agent_id or SINGLE_AGENT)]


def batch_agents(count: int, episode_id: str | None, episode_ids: list[str] | None, agent_ids: list[str] | None) -> list[AgentRef] | None:
    """One ref per observation: `?episode_id=E` with `agent_ids` (one per observation) for many
    agents of one episode, or `episode_ids` (one per observation, with `agent_ids` if some share
    an episode). None when the batch names no episode."""
    for name, ids in (("episode_ids", episode_ids), ("agent_ids", agent_ids)):
        if ids is not None and len(ids) != count:
            raise InputError(("body", name), f"gives {len(ids)} ids for {count} observations: one per observation", "ids_length")
    if episode_id is not None and episode_ids is not None:
        raise InputError(("body", "episode_ids"), "name the episode in the query or per observation, not both", "episode_twice")
    if episode_id is None and episode_ids is None:
        if agent_ids is not None:
            raise InputError(
                ("body", "agent_ids"), "agent_ids need the episode they belong to (?episode_id= or episode_ids)", "missing_episode_id"
            )
        return None
    episodes = episode_ids if episode_ids is not None else [episode_id or ""] * count
    refs = [AgentRef(episode, agent) for episode, agent in zip(episodes, agent_ids or [SINGLE_AGENT] * count, strict=True)]
    seen: set[AgentRef] = set()
    for index, ref in enumerate(refs):
        if ref in seen:
            raise InputError(
                ("body", "agent_ids" if agent_ids is not None else "observations", index),
                f"{ref} has two observations in this batch: one decision per agent per call",
                "agent_twice",
            )
        seen.add(ref)
    return refs
