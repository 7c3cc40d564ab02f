"""The `ray` executor: tasks go through a Ray Serve `DeploymentHandle` to `PolicyDeployment` replicas.

For GPUs, many replicas and many machines (DESIGN.md §5). The replicas load the model and run the
same `Policy.run` as `local`, so answers are identical for the same observation and seed; this
process only moves tasks and never loads the model.

Ray: started here (a local instance, node address `POLICY_SERVER_RAY_NODE_IP`, its metrics on
`POLICY_SERVER_RAY_METRICS_PORT`) or joined (`RAY_ADDRESS`). Serve runs without its HTTP proxy:
the FastAPI app is the only way in. On stop, a Ray we started is shut down with Serve; a cluster
we joined keeps running, less our application.

Tasks are coalesced here as in `local` (coalescing.py): what arrives while calls are in flight
leaves as the next call, its tasks' rows stacked in one `Parcel`, up to `max_batch_size` rows; a
few calls are in flight per running replica. A replica's `@serve.batch` joins the calls that
arrive together (from several API processes too) and answers them in forward passes of at most
`max_batch_size` rows; each task gets its own answer or error.

Each policy is its own Serve application, named as the policy. A version switch first loads the
new version in a one-off Ray task (a version that does not fit its schema never reaches the
application), then redeploys the application with it: Serve's rolling update, which with a surge
starts new replicas and stops an old one only once a new one runs (DESIGN.md §10).
"""

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

# Serve's throughput mode (Ray >= 2.56: gRPC between handle and replicas, user code on the
# replica's own loop, ...): read when ray.serve is imported, here and in the Ray processes we
# start, which inherit this environment. A user's own setting wins. Without its direct ingress:
# Serve's HTTP is off here, and with it on, Serve's shutdown waits its full 30 s timeout. Nor
# with its logging changes: a failed request's error id and traceback must reach the replica's
# log (stderr too) at once, not after 1,000 more records.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
os.environ.setdefault("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1")
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "1")

import ray
import ray._private.ray_constants as ray_constants
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import ProxyLocation
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from policy_server.errors import ConfigError, InputError, PolicyFailure
from policy_server.executors import ray_workers, run_isolating_failures
from policy_server.executors.coalescing import Coalescer, Pending
from policy_server.loading import ModelVersion, load_policy_spec, load_version
from policy_server.policy import Decisions, Distributions, Kind, Result, Task
from policy_server.runtimes import gpu_memory
from policy_server.settings import Settings

logger = logging.getLogger("policy_server")

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # policy_server/

# How often the replicas are asked to describe themselves again, for /info.
DESCRIBE_EVERY_S = 5.0
# Routing picks replicas at random, so one describe call per replica may miss some.
DESCRIBE_CALLS_PER_REPLICA = 4
DESCRIBE_AGAIN_AFTER_S = 0.2  # after a switch, while some new replica has not answered yet
# Handle calls this process keeps in flight: per running replica, one being computed and one
# waiting, so that no replica idles while another call's answers travel back.
CALLS_IN_FLIGHT_PER_REPLICA = 2
MIN_CALLS_IN_FLIGHT = 2
# Handle calls (from this and other API processes) a replica answers together, at most.
CALLS_PER_REPLICA_BATCH = 16
# Ray's and Serve's connections are per process, and setting them up is not thread-safe.
_SETUP_LOCK = threading.Lock()
# Extra replicas a rolling update may start beyond `serving.replicas` (rounded up, so at least one):
# an old replica leaves only once a new one runs. Serve updates 20% of the replicas at a time.
ROLLING_SURGE_PERCENT = 20


@dataclass(frozen=True)
class Answer:
    """A replica's answer to one task, as it crosses processes.

    Errors travel as their fields: `InputError` needs its constructor arguments, which pickling
    an exception does not keep. `batch` (rows, seconds of a forward pass) is set on the first
    task of each forward pass only, so the app's metrics count every pass once.
    """

    decisions: Decisions | Distributions | None = None
    input_error: tuple[tuple[str | int, ...], str, str] | None = None  # loc, msg, kind
    failure_id: str | None = None
    batch: tuple[int, float] | None = None

    @classmethod
    def of(cls, result: Result, batch: tuple[int, float] | None) -> "Answer":
        if isinstance(result, InputError):
            return cls(input_error=(result.loc, result.msg, result.kind), batch=batch)
        if isinstance(result, PolicyFailure):
            return cls(failure_id=result.error_id, batch=batch)
        return cls(decisions=result, batch=batch)

    def result(self) -> Result:
        """The result, or the error as in the local executor (a 422 or a 500)."""
        if self.input_error is not None:
            return InputError(*self.input_error)
        if self.failure_id is not None:
            return PolicyFailure(self.failure_id)
        assert self.decisions is not None
        return self.decisions


@dataclass(frozen=True)
class Parcel:
    """The tasks of one handle call, as they cross processes: their rows stacked into one array
    (pickled as one buffer, not one object per task), with each task's row count, kind and seed;
    a recurrent policy's states stacked likewise (the replicas keep none)."""

    rows: np.ndarray
    sizes: tuple[int, ...]
    kinds: tuple[Kind, ...]
    seeds: tuple[int | None, ...]
    state: np.ndarray | None = None  # [rows, width]: every task's, as the routes send a recurrent policy's tasks

    @classmethod
    def of(cls, tasks: Sequence[Task]) -> "Parcel":
        rows = tasks[0].rows if len(tasks) == 1 else np.concatenate([task.rows for task in tasks])
        states = [task.state for task in tasks if task.state is not None]
        assert not states or len(states) == len(tasks), "a recurrent policy's tasks all carry their state"
        state = None if not states else states[0] if len(states) == 1 else np.concatenate(states)
        sizes, kinds, seeds = (
            tuple(len(task.rows) for task in tasks),
            tuple(task.kind for task in tasks),
            tuple(task.seed for task in tasks),
        )
        return cls(rows, sizes, kinds, seeds, state)

    def tasks(self) -> list[Task]:
        """The tasks again. Ray hands arrays over read-only (zero-copy), which torch warns on: one copy."""
        rows = self.rows if self.rows.flags.writeable else self.rows.copy()
        state = self.state if self.state is None or self.state.flags.writeable else self.state.copy()
        ends = np.cumsum(self.sizes).tolist()
        starts = [0, *ends[:-1]]
        return [
            Task(rows[start:end], kind, seed, None if state is None else state[start:end])
            for start, end, kind, seed in zip(starts, ends, self.kinds, self.seeds, strict=True)
        ]


def forward_batches(tasks: list[Task], max_rows: int) -> Iterator[list[Task]]:
    """The tasks in order, cut into batches of at most `max_rows` rows (a larger task alone)."""
    batch: list[Task] = []
    rows = 0
    for task in tasks:
        if batch and rows + len(task.rows) > max_rows:
            yield batch
            batch, rows = [], 0
        batch.append(task)
        rows += len(task.rows)
    if batch:
        yield batch


@serve.deployment(name="PolicyDeployment", logging_config={"enable_access_log": False})
class PolicyDeployment:
    """One replica: the policy on this replica's device, answering batches of tasks."""

    def __init__(self, version: ModelVersion, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.policy = load_version(version, device)
        self.policy.warm_up()
        self.max_rows = version.spec.serving.max_batch_size
        self.rows_answered = 0
        self.calls_answered = 0
        self.run.set_max_batch_size(CALLS_PER_REPLICA_BATCH)
        self.run.set_batch_wait_timeout_s(version.spec.serving.batch_wait_ms / 1000)

    @serve.batch  # the wait comes from the schema, set in __init__
    async def run(self, parcels: list[Parcel]) -> list[list[Answer]]:
        """The handle calls that arrived together (from one API process or several), their tasks
        answered in forward passes of at most max_batch_size rows; a task whose input makes the
        model fail fails alone. One list of answers per call."""
        tasks = [task for parcel in parcels for task in parcel.tasks()]
        answers: list[Answer] = []
        for batch in forward_batches(tasks, self.max_rows):
            results, passes = run_isolating_failures(self.policy, batch)
            self.rows_answered += sum(forward_pass.rows for forward_pass in passes)
            batches = {forward_pass.first_task: (forward_pass.rows, forward_pass.seconds) for forward_pass in passes}
            answers += [Answer.of(result, batches.get(i)) for i, result in enumerate(results)]
        self.calls_answered += len(parcels)
        ends = np.cumsum([len(parcel.sizes) for parcel in parcels]).tolist()
        return [answers[end - len(parcel.sizes) : end] for parcel, end in zip(parcels, ends, strict=True)]

    def describe(self) -> dict[str, Any]:
        """The policy as `Policy.describe`, and which replica, where, and how busy it has been."""
        info = self.policy.describe()
        return info | {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpu_memory": gpu_memory(info["device"]),
            "rows_answered": self.rows_answered,
            "calls_answered": self.calls_answered,
        }


def policy_application(version: ModelVersion, settings: Settings) -> serve.Application:
    """The deployment of `version`, as its schema.yaml's serving section says; `num_gpus: auto` is 1
    per replica if the cluster has GPUs."""
    serving = version.spec.serving
    num_gpus = serving.num_gpus
    if num_gpus == "auto":
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return PolicyDeployment.options(
        num_replicas=serving.replicas,
        # room for one batch being computed and the next one filling
        max_ongoing_requests=2 * serving.max_batch_size,
        max_surge_percent=ROLLING_SURGE_PERCENT,
        ray_actor_options={"num_cpus": settings.ray_replica_cpus, "num_gpus": num_gpus},
    ).bind(_located(version), settings.torch_threads)


def _located(version: ModelVersion) -> ModelVersion:
    """`version` with absolute paths: replicas and tasks have their own working folder."""
    return replace(version, folder=version.folder.resolve(), model_file=version.model_file.resolve())


def app_builder(args: dict[str, str]) -> serve.Application:
    """For Serve config files, e.g. a KubeRay RayService (deploy/kuberay-rayservice.yaml):
    `import_path: policy_server.executors.ray:app_builder`, `args: {policy_dir: DIR}`, the application
    named as the schema. `uvicorn app:app` with RAY_ADDRESS then uses it rather than deploying its own."""
    settings = Settings.from_env()
    if args.get("policy_dir"):
        settings = replace(settings, policy_dir=Path(args["policy_dir"]))
    return policy_application(ModelVersion.of_folder(settings.policy_dir, load_policy_spec(settings.policy_dir)), settings)


def _load_problem(version: ModelVersion) -> tuple[str, str, str, str] | None:
    """Run as a Ray task: None if `version` loads and fits its schema, else the ConfigError's fields
    (an exception crosses processes as its message only, and ConfigError is built from its fields)."""
    try:
        load_version(version)
    except ConfigError as error:
        return error.path, error.key, error.problem, error.fix
    return None


class DeploymentFailed(RuntimeError):
    """Serve could not start the replicas; the message ends with the replicas' own error."""


class RayMode(Enum):
    STARTED = "started"  # we started a local Ray: shut it down on stop
    JOINED = "joined"  # we connected to RAY_ADDRESS: disconnect, leave the cluster running
    INHERITED = "inherited"  # this process was already connected: leave the connection alone


def connect(settings: Settings) -> RayMode:
    """Start or join Ray as `settings` say (or keep this process's connection).

    Calling ray.init off the main thread also keeps uvicorn's SIGTERM handler: Ray would put its own."""
    if ray.is_initialized():
        return RayMode.INHERITED
    # Ray's C++ handler for SIGTERM makes the ray.shutdown() that follows abort the process
    # (ray-project/ray#37288): uvicorn handles SIGTERM, and stop() shuts Ray down after it.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    common: dict[str, Any] = {
        "_node_ip_address": settings.ray_node_ip,
        "configure_logging": False,
        # Ray ships this package, as this process has it, to every replica (Serve takes the job's
        # runtime_env as the deployment's): the nodes need its dependencies, not the package.
        "runtime_env": {"py_modules": [PACKAGE_DIR]},
    }
    if settings.ray_address:
        ray.init(address=settings.ray_address, **common)
        return RayMode.JOINED
    ray.init(num_cpus=settings.ray_cpus, include_dashboard=False, _metrics_export_port=settings.ray_metrics_port, **common)
    return RayMode.STARTED


def shut_down_ray(mode: RayMode | None) -> None:
    """Serve and Ray shut down if we started them; a cluster we joined, disconnected from."""
    if mode is RayMode.STARTED:
        serve.shutdown()
        # Waiting lets the raylet end gracefully before this process does: killed with it,
        # its agents would linger for a minute trying to report the death to a dead GCS.
        ray.shutdown(wait_for_processes=True)
    elif mode is RayMode.JOINED:
        ray.shutdown()


class RayExecutor:
    backend = "ray"
    starts_in_background = True  # Ray takes many seconds to start: serve /health and /ready meanwhile

    def __init__(self, version: ModelVersion, settings: Settings, observe_batch: Callable[[int, float], None] | None = None) -> None:
        self.version = version  # the one deployed, or being deployed
        self.settings = settings
        self.observe_batch = observe_batch
        self.app_name = version.spec.name
        self._mode: RayMode | None = None
        self._handle: DeploymentHandle | None = None
        self._deployed = False  # by us; False also when the application was running already
        self._started = asyncio.Event()  # set once start() ended, deployed or not
        self._ready = False
        self._running = 0  # replicas, as Serve counts them
        self._replicas: dict[str, dict[str, Any]] = {}  # replica id → its latest describe(), as far as seen
        self._describing: asyncio.Task[None] | None = None
        self._batches: Coalescer[DeploymentHandle] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._shared = ray_workers.shared_dir()  # set in the workers of `generate.py serve --workers N`

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Start or join Ray, deploy, and return once a replica has described itself."""
        try:
            await asyncio.to_thread(self._deploy)
            self._handle = self._loop_handle()
            self._batches = Coalescer(asyncio.get_running_loop(), self._launch, self.version.spec.serving.max_batch_size)
            await self._describe_replicas()
            self._describing = asyncio.create_task(self._keep_describing())
            self._ready = True
        finally:
            self._started.set()

    async def switch(self, version: ModelVersion) -> None:
        """Check that `version` loads, then roll the application onto it; return once every replica runs it.

        Requests go on meanwhile, through the same handle; each answer names the version of the
        replica that computed it. A version that does not fit its schema raises the loader's
        `ConfigError` and never reaches the application. If its replicas fail all the same (a
        GPU out of memory, say), the application is rolled back to the active version and
        `DeploymentFailed` raised: the replicas that survived serve meanwhile.
        """
        await self._started.wait()
        if self._handle is None:
            raise DeploymentFailed(f"the application {self.app_name!r} did not start: there is no version to switch from")
        if not self._deployed:
            raise ConfigError(
                self.version.spec.path,
                "version",
                f"the Ray Serve application {self.app_name!r} was deployed from a Serve config file, not by this server",
                "change the version in that Serve config (its args.policy_dir)",
            )
        await self._check_loads(version)
        try:
            await asyncio.to_thread(self._roll_to, version)
        except DeploymentFailed as failure:
            logger.error("version %s failed on the replicas (%s): rolling back to version %s", version.label, failure, self.version.label)
            await asyncio.to_thread(self._roll_to, self.version)
            await self._describe_replicas(forget_earlier=True)
            raise
        self.version = version
        await self._describe_replicas(forget_earlier=True)

    def _loop_handle(self) -> DeploymentHandle:
        """A handle of our own (not Serve's cached one) that routes on this event loop rather than
        on a thread of its own: a thread hop less per call. stop() shuts its router down."""
        handle: DeploymentHandle = DeploymentHandle(PolicyDeployment.name, self.app_name)
        handle._init(_run_router_in_separate_loop=False)
        return handle

    async def _check_loads(self, version: ModelVersion) -> None:
        """Load `version` in a one-off Ray task, off the replicas: its ConfigError if it does not fit its schema."""
        check = ray.remote(num_cpus=self.settings.ray_replica_cpus, max_retries=0)(_load_problem)
        problem = await check.remote(_located(version))
        if problem is not None:
            raise ConfigError(*problem)

    async def stop(self) -> None:
        """Answer the calls in flight, then delete our deployment (with Serve and Ray too, if we started them)."""
        self._ready = False
        if self._batches is not None:
            await self._batches.idle()
        if self._handle is not None:
            await self._handle.shutdown_async()
        if self._describing is not None:
            self._describing.cancel()
            await asyncio.wait([self._describing])
        await asyncio.to_thread(self._tear_down)

    async def run(self, task: Task) -> Result:
        await self._started.wait()
        if self._handle is None or self._batches is None:
            error_id = uuid.uuid4().hex[:12]
            logger.error("a request came before the deployment, which failed to start (error id %s)", error_id)
            raise PolicyFailure(error_id)
        return await self._batches.submit(task, self._handle)

    def _launch(self, batch: list[Pending[DeploymentHandle]], rows: int) -> None:
        """Send the batch as one handle call (on the event loop); its answers are delivered when back."""
        call = asyncio.create_task(self._call(batch))
        self._calls.add(call)  # the loop holds tasks weakly
        call.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[Pending[DeploymentHandle]]) -> None:
        answers = await self._send(batch[0].on, [item.task for item in batch])
        results: list[Result] = []
        for answer in answers:
            if answer.batch is not None and self.observe_batch is not None:
                self.observe_batch(*answer.batch)
            results.append(answer.result())
        assert self._batches is not None
        self._batches.deliver(batch, results)

    def describe(self) -> dict[str, Any]:
        """What the replicas said of themselves, at most DESCRIBE_EVERY_S ago."""
        replicas = sorted(self._replicas.values(), key=lambda replica: replica["replica"])
        first = replicas[0] if replicas else {}
        policy = {
            key: first[key]
            for key in ("model", "format", "sha256", "version", "device", "input_size", "heads", "state_size", "gpu_memory")
            if key in first
        }
        details = [
            {
                key: replica[key]
                for key in ("replica", "node_id", "pid", "version", "device", "gpu_memory", "rows_answered", "calls_answered")
            }
            for replica in replicas
        ]
        return policy | {"backend": self.backend, "replicas": self._running, "replica_details": details}

    async def _send(self, handle: DeploymentHandle, tasks: list[Task]) -> list[Answer]:
        """The replica's answer to each task, sent as one call; once more if the replica died
        meanwhile (Serve replaces it). Any other failure: one PolicyFailure for all of them."""
        parcel = Parcel.of(tasks)
        try:
            try:
                return await handle.run.remote(parcel)
            except RayActorError as exc:
                logger.warning(
                    "a replica died with a call of %d request(s) in flight (%s); sending it again", len(tasks), type(exc).__name__
                )
                return await handle.run.remote(parcel)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("the deployment failed on a call of %d request(s) (error id %s)", len(tasks), error_id)
            return [Answer(failure_id=error_id)] * len(tasks)

    def _deploy(self) -> None:
        """Blocking (in a thread): Ray, Serve without its HTTP proxy, then our application, unless
        one of that name runs already (declared by a Serve config file, say): then that one."""
        with _SETUP_LOCK, self._application_lock():
            self._mode = connect(self.settings)
            serve.start(proxy_location=ProxyLocation.Disabled)
            if self._shared is not None:
                self._deployed = True  # shared by the workers: any of them deploys and switches it
                if not ray_workers.runs(self._shared, self.app_name, self.version):
                    self._run_application(self.version)
                return
            running = serve.status().applications.get(self.app_name)
            if running is not None and running.status == ApplicationStatus.RUNNING:
                logger.info("the application %r runs on the cluster already: using it", self.app_name)
                return
            self._deployed = True
            self._run_application(self.version)

    def _roll_to(self, version: ModelVersion) -> None:
        """Blocking (in a thread): our application onto `version`, by Serve's rolling update,
        unless another worker sharing it did that already."""
        with _SETUP_LOCK, self._application_lock():
            if self._shared is None or not ray_workers.runs(self._shared, self.app_name, version):
                self._run_application(version)

    def _application_lock(self) -> AbstractContextManager[None]:
        """Across the workers sharing the application; nothing to hold for a lone server."""
        return ray_workers.application_lock(self._shared, self.app_name) if self._shared is not None else nullcontext()

    def _run_application(self, version: ModelVersion) -> None:
        """Deploy `version` as our application, or roll the application onto it; return once all
        its replicas run it. The caller holds _SETUP_LOCK (serve.run connects to Serve)."""
        try:
            serve.run(policy_application(version, self.settings), name=self.app_name, route_prefix=None)
        except RuntimeError as exc:
            raise DeploymentFailed(f"{exc} {self._failure_reason()}") from None
        if self._shared is not None:
            ray_workers.record(self._shared, self.app_name, version)

    def _failure_reason(self) -> str:
        """The last line of Serve's message on our deployment: the replicas' error, e.g. a ConfigError."""
        application = serve.status().applications.get(self.app_name)
        deployment = application.deployments.get(PolicyDeployment.name) if application is not None else None
        lines = deployment.message.strip().splitlines() if deployment is not None else []
        return lines[-1] if lines else "(Serve gave no reason: see the replicas' log above)"

    async def _keep_describing(self) -> None:
        while True:
            await asyncio.sleep(DESCRIBE_EVERY_S)
            try:
                await self._describe_replicas()
            except Exception as exc:  # a replica being replaced, say: /info keeps what it had
                logger.warning("the replicas could not describe themselves: %s", exc)

    async def _describe_replicas(self, forget_earlier: bool = False) -> None:
        """Ask every running replica (as far as routing reaches) to describe itself.

        `forget_earlier` after a switch: the replicas seen before are gone, and the handle learns
        of the new ones a moment after Serve reports them running, so ask again until every one
        answered (for DESCRIBE_EVERY_S at most; the periodic describe sees the rest)."""
        self._running = running = await asyncio.to_thread(self._running_replicas)
        if self._batches is not None:
            self._batches.max_in_flight = max(MIN_CALLS_IN_FLIGHT, CALLS_IN_FLIGHT_PER_REPLICA * running)
        seen = await self._ask_replicas(running)
        deadline = time.monotonic() + DESCRIBE_EVERY_S
        while forget_earlier and len(seen) < running and time.monotonic() < deadline:
            await asyncio.sleep(DESCRIBE_AGAIN_AFTER_S)
            seen |= await self._ask_replicas(running)
        replicas = seen if forget_earlier else {**self._replicas, **seen}
        # the `running` most recently seen: a replica that died is no longer seen once replaced
        latest = sorted(replicas.values(), key=lambda replica: replica["seen"], reverse=True)[: max(1, running)]
        self._replicas = {replica["replica"]: replica for replica in latest}

    async def _ask_replicas(self, running: int) -> dict[str, dict[str, Any]]:
        """Replica id → its describe(), of those DESCRIBE_CALLS_PER_REPLICA calls per replica reached."""
        assert self._handle is not None
        calls = max(1, running) * DESCRIBE_CALLS_PER_REPLICA
        answers = await asyncio.gather(*(self._handle.describe.remote() for _ in range(calls)))
        return {answer["replica"]: answer | {"seen": time.monotonic()} for answer in answers}

    def _running_replicas(self) -> int:
        application = serve.status().applications[self.app_name]
        deployment = application.deployments[PolicyDeployment.name]
        return deployment.replica_states.get("RUNNING", 0)

    def _tear_down(self) -> None:
        """Our application deleted (unless Ray goes with it, or other workers share it), then Ray."""
        with _SETUP_LOCK:
            if self._deployed and self._mode is not RayMode.STARTED and self._shared is None:
                serve.delete(self.app_name)
            shut_down_ray(self._mode)
