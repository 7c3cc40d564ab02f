"""Which agents' episodes are running, shared by the API processes of one server (`--workers N`).

Each process keeps its own book (episodes.py); with several, a reward may reach a process that
never served the agent, so the episodes begun and ended are also kept in a SQLite file beside the
log, which every process reads and writes (WAL: readers never wait for a writer). Only a step
that begins an agent's episode, and every outcome, touch it, on a thread of its own: the event
loop never waits for the file. Entries not begun again for `RETAIN_S` are removed.
"""

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from policy_server.experience.episodes import AgentRef
from policy_server.experience.errors import ExperienceUnavailable

FILE_NAME = "_episodes.sqlite3"  # "_": not a file of the log to the readers of its Parquet
RETAIN_S = 86_400.0
PRUNE_EVERY = 10_000  # begins
_T = TypeVar("_T")


@dataclass(frozen=True)
class SharedState:
    ended: bool


class SharedEpisodes:
    def __init__(self, directory: Path, policy: str) -> None:
        self.path = directory / FILE_NAME
        self.policy = policy
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"episodes-{policy}")
        self._connection: sqlite3.Connection | None = None
        self._begins = 0

    async def begin(self, refs: list[AgentRef]) -> None:
        await self._call(self._begin, refs)

    async def end(self, ref: AgentRef) -> None:
        await self._call(self._end, ref)

    async def state(self, ref: AgentRef) -> SharedState | None:
        """The agent's episode as any process last told it; None if none began it."""
        return await self._call(self._state, ref)

    def close(self) -> None:
        self._thread.submit(self._close).result()
        self._thread.shutdown()

    async def _call(self, function: Any, *args: Any) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)
        except sqlite3.Error as exc:
            raise ExperienceUnavailable(f"the episodes shared by this server's processes cannot be read or written ({exc})", 1) from None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS agents (policy TEXT, episode TEXT, agent TEXT, ended INTEGER, updated REAL, "
                "PRIMARY KEY (policy, episode, agent))"
            )
            self._connection = connection
        return self._connection

    def _begin(self, refs: list[AgentRef]) -> None:
        now = time.time()
        rows = [(self.policy, ref.episode_id, ref.agent_id, now) for ref in refs]
        db = self._db()
        db.executemany("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, 0, ?)", rows)
        self._begins += len(refs)
        if self._begins >= PRUNE_EVERY:
            self._begins = 0
            db.execute("DELETE FROM agents WHERE updated < ?", (now - RETAIN_S,))

    def _end(self, ref: AgentRef) -> None:
        self._db().execute(
            "UPDATE agents SET ended = 1, updated = ? WHERE policy = ? AND episode = ? AND agent = ?",
            (time.time(), self.policy, ref.episode_id, ref.agent_id),
        )

    def _state(self, ref: AgentRef) -> SharedState | None:
        row = (
            self._db()
            .execute("SELECT ended FROM agents WHERE policy = ? AND episode = ? AND agent = ?", (self.policy, ref.episode_id, ref.agent_id))
            .fetchone()
        )
        return None if row is None else SharedState(bool(row[0]))

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
