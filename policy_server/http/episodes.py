"""The episode a prediction request names, read from its query (and, for a batch, its body)."""

from typing import Annotated

from fastapi import Query

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

EpisodeStart = Annotated[
    bool,
    Query(description="A recurrent policy: the episode begins here, from zero state (its memory so far is dropped)."),
]


def one_agent(episode_id: str | None, agent_id: str | None) -> list[AgentRef] | None:
    """The agent a decision is for; None when no episode is named (an agent_id alone is ignored)."""
    return None if episode_id is None else [AgentRef(episode_id, agent_id or SINGLE_AGENT)]


def batch_agents(count: int, episode_id: str | None, named: list[tuple[str | None, str | None]] | None) -> list[AgentRef | None] | None:
    """The agent of each observation: its own `episode_id` (else the query's) and `agent_id`; None
    for an observation of no episode (not logged), and None for a batch that names none.
    Observations of one agent (none named, say) are its consecutive steps, in order."""
    pairs = named or [(None, None)] * count
    refs = [
        None if not (episode or episode_id) else AgentRef(episode or episode_id or "", agent or SINGLE_AGENT) for episode, agent in pairs
    ]
    return refs if any(refs) else None
