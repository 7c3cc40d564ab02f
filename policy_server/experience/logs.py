"""Every policy's experience log, made when its routes are built. Importing this module does not
import pyarrow: a server that logs nothing does not pay for it (in memory or start-up)."""

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from policy_server.schema import Experience, PolicySpec

if TYPE_CHECKING:
    from policy_server.experience.log import ExperienceLog


class ExperienceLogs:
    """Every policy's log, made when its routes are (for a schema that asks for one, or for every
    policy with POLICY_SERVER_EXPERIENCE_DIR) and kept while the server runs."""

    def __init__(self, override_dir: Path | None = None, shared: bool = False) -> None:
        self.override_dir = override_dir
        self.shared = shared  # several API processes: the logs share their episodes (shared.py)
        self.logs: dict[tuple[str, Experience], ExperienceLog] = {}

    def for_policy(self, spec: PolicySpec) -> "ExperienceLog | None":
        config = self._config(spec)
        if config is None:
            return None
        log = self.logs.get((spec.name, config))
        if log is None:
            from policy_server.experience.log import ExperienceLog

            log = self.logs[spec.name, config] = ExperienceLog(config, spec.name, self.shared)
            log.start()
        return log

    def close(self) -> None:
        """Write what every log holds, then stop their threads (blocks: call off the loop)."""
        for log in self.logs.values():
            log.close()

    def _config(self, spec: PolicySpec) -> Experience | None:
        if self.override_dir is None:
            return spec.experience
        return replace(spec.experience or Experience(self.override_dir), dir=self.override_dir)
