"""Every policy served, and the life of its versions: loaded at start, watched, switched, retired.

The `Registry` holds one `ServedPolicy` per policy and makes what is served follow what is on
disk (`repository.scan`) or what an operator asks. A version is loaded beside the active one by
its executor (`Executor.switch`): only once it answers does it become active, in one step, so no
request fails or waits for a load. A version that fails stays `failed` with its reason and is
tried again only when its files change; the active one serves on. Files are loaded once two
scans in a row saw them unchanged, so a file still being written is never loaded.

The HTTP layer learns what to route through a `RouteTable`: a policy's routes appear, change
(a new schema) or go.
"""

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from policy_server.admission import Admission
from policy_server.errors import ConfigError, first_line
from policy_server.executors import Executor
from policy_server.loading import ModelVersion
from policy_server.metrics import Metrics, PolicyMetrics
from policy_server.recurrent.states import EpisodeStates
from policy_server.repository import FileStamp, PolicySource, Snapshot, VersionSource, read_policy, scan
from policy_server.schema import PolicySpec

logger = logging.getLogger("policy_server")

RETIRE_GRACE_S = 1.0
SETTLE_S = 0.25  # an operator's reload looks twice this far apart: a file still growing is not loaded


class VersionState(enum.StrEnum):
    AVAILABLE = "available"  # on disk, not loaded
    LOADING = "loading"
    READY = "ready"  # the active version
    FAILED = "failed"
    RETIRED = "retired"  # was active, replaced


@dataclass
class VersionStatus:
    """What `/policies` says of one version."""

    version: str
    state: VersionState = VersionState.AVAILABLE
    sha256: str | None = None
    loaded_at: float | None = None
    error: str | None = None
    failed_on: tuple[FileStamp, FileStamp] | None = None  # the files it failed on: tried again once they change


@dataclass(frozen=True)
class Unservable:
    """A policy on disk that cannot be served: why, and the files it was tried on."""

    reason: str
    files: tuple[FileStamp, ...]


class VersionRejected(Exception):
    """A version that cannot be served (it does not load, or fails its checks); the reason is one line."""


class UnknownVersion(Exception):
    pass


class ExecutorFactory(Protocol):
    def __call__(self, version: ModelVersion, metrics: PolicyMetrics | None) -> Executor:
        """An executor for `version`, not yet started (`local` loads the model here: blocking)."""


class RouteTable(Protocol):
    def install(self, policy: "ServedPolicy") -> None:
        """Route the policy's requests (again, if its schema changed)."""

    def remove(self, name: str) -> None: ...


@dataclass
class ServedPolicy:
    """One policy being served: its active version's schema and executor, and every version's status."""

    source: PolicySource
    spec: PolicySpec
    executor: Executor
    admission: Admission
    active: str
    active_files: tuple[FileStamp, FileStamp]
    metrics: PolicyMetrics | None = None
    versions: dict[str, VersionStatus] = field(default_factory=dict)
    chosen: str | None = None  # by an operator (PUT /policies/{name}/active): overrides the highest
    last_error: str | None = None
    memory: EpisodeStates | None = None  # a recurrent policy's episodes' states (shared by its root and named routes)

    @property
    def name(self) -> str:
        return self.spec.name

    def status(self, label: str) -> VersionStatus:
        return self.versions.setdefault(label, VersionStatus(label))

    def note_versions_on_disk(self, source: PolicySource) -> None:
        """Versions new on disk are `available`; those gone are forgotten (not the active one)."""
        on_disk = {version.label for version in source.versions}
        for label in on_disk:
            self.status(label)
        for label in [label for label in self.versions if label not in on_disk and label != self.active]:
            del self.versions[label]


class Registry:
    """The policies served, kept in step with the repository on disk and the operator's choices."""

    def __init__(
        self,
        root: Path,
        build_executor: ExecutorFactory,
        max_queue: int,
        metrics: Metrics | None = None,
        default: str | None = None,
        admit: Callable[[PolicySpec], None] = lambda spec: None,
    ) -> None:
        self.root = root
        self.build_executor = build_executor
        self.admit = admit  # raises ConfigError for a schema the server will not serve (no api key, say)
        self.max_queue = max_queue
        self.metrics = metrics
        self.requested_default = default
        self.policies: dict[str, ServedPolicy] = {}
        self.unservable: dict[str, Unservable] = {}  # policies on disk that cannot be served, and why
        self.routes: RouteTable | None = None
        self.single = True
        self._seen: Snapshot | None = None
        self._only_at_start: str | None = None
        self._lock = asyncio.Lock()
        self._watching: asyncio.Task[None] | None = None

    # --- start-up (blocking: before the server opens its port) ---------------------------------

    def load(self) -> None:
        """Read the repository and build an executor for every policy's version.

        A user's mistake in the one policy, or in the default one, is a `ConfigError` (the server
        does not start); another policy that cannot be served is listed with its error."""
        snapshot = scan(self.root)
        self.single = snapshot.single
        self._seen = snapshot
        self._only_at_start = next(iter(snapshot.policies)) if len(snapshot.policies) == 1 else None
        if not snapshot.policies:
            raise ConfigError(
                self.root,
                "POLICY_SERVER_DIR",
                "holds no schema.yaml, nor folders with one",
                "point it at a policy folder or a folder of them",
            )
        if self.requested_default is not None and self.requested_default not in snapshot.policies:
            names = ", ".join(sorted(snapshot.policies))
            raise ConfigError(
                "environment", "POLICY_SERVER_DEFAULT", f"no policy is named {self.requested_default!r}", f"use one of {names}"
            )
        for source in snapshot.policies.values():
            try:
                self.policies[source.name] = self._build(source)
            except ConfigError as error:
                if snapshot.single or source.name == self.default_name or len(snapshot.policies) == 1:
                    raise
                self._unservable(source, str(error))

    @property
    def default_name(self) -> str | None:
        """The policy the root routes serve: POLICY_SERVER_DEFAULT, else the only one on disk at
        start (for one policy folder: the one it is now, renamed or not)."""
        if self.requested_default is not None:
            return self.requested_default
        if self.single and self._seen is not None:
            return next(iter(self._seen.policies), None)
        return self._only_at_start

    @property
    def default(self) -> ServedPolicy | None:
        name = self.default_name
        return self.policies.get(name) if name is not None else None

    def _build(self, source: PolicySource) -> ServedPolicy:
        if source.error is not None:
            raise source.error
        wanted = source.wanted
        assert source.spec is not None
        if wanted is None:
            pinned = source.spec.serving.version
            if pinned is None:
                raise ConfigError(
                    source.folder / "models", "model", "no version folder holds a model file yet", "put the model in models/1/"
                )
            raise ConfigError(source.spec.path, "serving.version", f"no version {pinned} in models/", "pin a version that models/ holds")
        if wanted.error is not None:
            raise wanted.error
        self.admit(source.spec)
        metrics = self.metrics.for_policy(source.name) if self.metrics is not None else None
        executor = self.build_executor(_model_version(source, wanted), metrics)
        admission = Admission(executor, self.max_queue, metrics.count_shed if metrics is not None else None)
        served = ServedPolicy(source, source.spec, executor, admission, wanted.label, source.stamps(wanted.label), metrics)
        served.memory = _memory_for(served, source.spec)
        served.note_versions_on_disk(source)
        served.status(wanted.label).state = VersionState.LOADING
        return served

    # --- while serving -------------------------------------------------------------------------

    def attach(self, routes: RouteTable) -> None:
        """Route every policy served, and from now on every change."""
        self.routes = routes
        for served in self.policies.values():
            routes.install(served)

    async def start(self) -> None:
        """Start every policy's executor (each returns once its policy answers)."""
        await asyncio.gather(*(self._start(served) for served in self.policies.values()))

    async def _start(self, served: ServedPolicy) -> None:
        await served.executor.start()
        self._mark_active(served, served.active)
        if served.metrics is not None:
            served.metrics.watch_queue(served.admission)

    def watch(self, every_s: float) -> None:
        self._watching = asyncio.create_task(self._watch(every_s))

    async def _watch(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.sync()
            except Exception:
                logger.exception("the repository could not be read; serving on as before")

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.wait([self._watching])
        await asyncio.gather(*(served.executor.stop() for served in self.policies.values()))

    @property
    def ready(self) -> bool:
        return bool(self.policies) and all(served.executor.ready for served in self.policies.values())

    async def sync(self, settle: bool = False) -> None:
        """Make what is served follow the disk. `settle`: look twice, SETTLE_S apart, rather than
        comparing with the previous scan (an operator's reload)."""
        async with self._lock:
            if settle:
                self._seen = await asyncio.to_thread(scan, self.root)
                await asyncio.sleep(SETTLE_S)
            snapshot = await asyncio.to_thread(scan, self.root)
            previous, self._seen = self._seen, snapshot
            served_folders = {served.source.folder: served for served in self.policies.values()}
            for source in snapshot.policies.values():
                unreadable_served = served_folders.get(source.folder) if source.error is not None else None
                if unreadable_served is not None:  # its schema cannot be read now: the loaded version serves on
                    unreadable_served.last_error = str(source.error)
                elif previous is None or _settled(source, previous):
                    await self._follow(source)
            await self._retire_missing(snapshot)

    async def _retire_missing(self, snapshot: Snapshot) -> None:
        """Retire the policies whose folder is gone (or whose schema now names another policy)."""
        unreadable = {source.folder for source in snapshot.policies.values() if source.error is not None}
        for name in [name for name in self.policies if name not in snapshot.policies]:
            if self.policies[name].source.folder not in unreadable:
                await self._retire(name)

    async def activate(self, name: str, label: str) -> None:
        """Serve `label` from now on (the rollback); raises VersionRejected if it cannot load."""
        async with self._lock:
            served = self.policies[name]
            source = await asyncio.to_thread(read_policy, served.source.folder)  # as it is now, watched or not
            version = source.version(label)
            if version is None:
                raise UnknownVersion(
                    f"policy {name!r} has no version {label!r}: its versions are {', '.join(v.label for v in source.versions)}"
                )
            if label != served.active:
                await self._switch(served, source, version)
            served.chosen = label  # the watcher keeps it, even when a higher version appears

    async def _follow(self, source: PolicySource) -> None:
        served = self.policies.get(source.name)
        if served is None:
            tried = self.unservable.get(source.name)
            if tried is None or tried.files != _files(source):
                await self._add(source)
            return
        if source.error is not None:
            served.last_error = str(source.error)  # models/ as it is now: the loaded version serves on
            return
        served.note_versions_on_disk(source)
        served.source = source
        label = served.chosen if served.chosen is not None and source.version(served.chosen) else None
        version = source.version(label) if label is not None else source.wanted
        if version is None or (version.label == served.active and source.stamps(version.label) == served.active_files):
            return
        if served.status(version.label).failed_on == source.stamps(version.label):
            return  # failed on these very files: wait for them to change
        if version.error is not None:
            self._failed(served, version.label, str(version.error), source.stamps(version.label))
            return
        with contextlib.suppress(VersionRejected):  # logged, listed, counted: the active version serves on
            await self._switch(served, source, version)

    async def _switch(self, served: ServedPolicy, source: PolicySource, version: VersionSource) -> None:
        assert source.spec is not None
        status = served.status(version.label)
        status.state, status.error = VersionState.LOADING, None
        try:
            await served.executor.switch(_model_version(source, version))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConfigError) else f"{version.model_file}: does not load ({first_line(exc)})"
            self._failed(served, version.label, reason, source.stamps(version.label))
            raise VersionRejected(reason) from None
        schema_changed = source.spec != served.spec
        served.source, served.spec = source, source.spec
        if schema_changed:
            served.memory = _memory_for(served, source.spec)
        served.active_files = source.stamps(version.label)
        self._mark_active(served, version.label)
        logger.info("policy %s: version %s is active (%s)", served.name, version.label, version.model_file)
        if schema_changed and self.routes is not None:
            self.routes.install(served)

    def _mark_active(self, served: ServedPolicy, label: str) -> None:
        if served.active != label:
            served.status(served.active).state = VersionState.RETIRED
        served.active = label
        status = served.status(label)
        status.state, status.error, status.failed_on = VersionState.READY, None, None
        status.loaded_at = time.time()
        status.sha256 = served.executor.describe().get("sha256")
        if served.metrics is not None:
            served.metrics.describe_model(served.executor.describe())

    def _failed(self, served: ServedPolicy, label: str, reason: str, files: tuple[FileStamp, FileStamp]) -> None:
        status = served.status(label)
        status.state, status.error, status.failed_on = VersionState.FAILED, reason, files
        served.last_error = reason
        logger.error("policy %s: version %s cannot be served, version %s serves on: %s", served.name, label, served.active, reason)
        if served.metrics is not None:
            served.metrics.count_failed_version(label)

    def _unservable(self, source: PolicySource, reason: str) -> None:
        logger.error("policy %s cannot be served: %s", source.name, reason)
        self.unservable[source.name] = Unservable(reason, _files(source))

    async def _add(self, source: PolicySource) -> None:
        try:
            served = await asyncio.to_thread(self._build, source)
            await self._start(served)
        except Exception as error:
            reason = str(error) if isinstance(error, ConfigError) else f"{source.folder}: does not load ({first_line(error)})"
            self._unservable(source, reason)
            return
        self.unservable.pop(source.name, None)
        self.policies[source.name] = served
        assert self.routes is not None
        self.routes.install(served)
        logger.info("policy %s: served, version %s", served.name, served.active)

    async def _retire(self, name: str) -> None:
        """Stop routing the policy, then stop its executor once what it accepted is answered."""
        served = self.policies.pop(name)
        if self.routes is not None:
            self.routes.remove(name)
        await asyncio.sleep(RETIRE_GRACE_S)  # requests routed just before reach the executor, which answers them
        await served.executor.stop()
        logger.info("policy %s: retired (its folder is gone)", name)


def _memory_for(served: ServedPolicy, spec: PolicySpec) -> EpisodeStates | None:
    """The store of a recurrent policy's episodes: kept across a switch to a version of the same
    state (its episodes then answer 409, pinned to their version), new for a new recurrent section."""
    if spec.recurrent is None:
        return None
    if served.memory is not None and served.memory.recurrent == spec.recurrent:
        return served.memory
    store = EpisodeStates(spec.recurrent, spec.name)
    if served.metrics is not None:
        served.metrics.watch_episodes(store)
    return store


def _model_version(source: PolicySource, version: VersionSource) -> ModelVersion:
    assert source.spec is not None and version.model_file is not None
    return ModelVersion(source.folder, source.spec, version.model_file, version.label)


def _files(source: PolicySource) -> tuple[FileStamp, ...]:
    """Every file a policy's serving depends on, as stamped by the scan."""
    return (source.schema_stamp, *(version.stamp for version in source.versions))


def _settled(source: PolicySource, previous: Snapshot) -> bool:
    """The schema and the version to serve look as they did in the previous scan."""
    before = previous.policies.get(source.name)
    if before is None or before.schema_stamp != source.schema_stamp:
        return False
    wanted = source.wanted
    return wanted is None or before.stamps(wanted.label) == source.stamps(wanted.label)
