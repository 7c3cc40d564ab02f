"""The experience logs' series, read from the logs at each scrape (nothing per request)."""

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from policy_server.experience.logs import ExperienceLogs


class ExperienceCollector(Collector):
    def __init__(self, logs: ExperienceLogs) -> None:
        self.logs = logs

    def collect(self) -> Iterator[Metric]:
        written = CounterMetricFamily("policy_server_experience_rows_written", "Steps and outcomes written to Parquet.", labels=["policy"])
        pending = GaugeMetricFamily(
            "policy_server_experience_rows_pending", "Steps and outcomes accepted, not yet on disk.", labels=["policy"]
        )
        refused = CounterMetricFamily(
            "policy_server_experience_refused_requests",
            "Requests naming an episode refused with 503: the log could not keep up or write.",
            labels=["policy"],
        )
        failing = GaugeMetricFamily(
            "policy_server_experience_failing", "1 while the log's last write failed (/info says why).", labels=["policy"]
        )
        held = GaugeMetricFamily(
            "policy_server_experience_episodes_held", "Agents of episodes this process keeps track of.", labels=["policy"]
        )
        for log in self.logs.logs.values():
            state = log.writer.state
            labels = [log.policy]
            written.add_metric(labels, state.written_rows)
            pending.add_metric(labels, state.pending_rows)
            refused.add_metric(labels, log.refused)
            failing.add_metric(labels, 1 if state.error else 0)
            held.add_metric(labels, len(log.book))
        yield from (written, pending, refused, failing, held)
