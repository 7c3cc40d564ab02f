"""The `ray` executor: tasks go through a Ray Serve `DeploymentHandle` to `PolicyDeployment` replicas.

For GPUs, many replicas and many machines (DESIGN.md §5). The replicas load the model and run the
same `Policy.run` as `local`, so answers are identical for the same observation and seed; this
process only moves tasks and never loads the model.

Ray: started here (a local instance, node address `POLICY_SERVER_RAY_NODE_IP`, its metrics on
`POLICY_SERVER_RAY_METRICS_PORT`) or joined (`RAY_ADDRESS`). Serve runs without its HTTP proxy:
the FastAPI app is the only way in. On stop, a Ray we started is shut down with Serve; a cluster
we joined keeps running, less our application.

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
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import ProxyLocation
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from policy_server.errors import ConfigError, InputError, PolicyFailure
from policy_server.executors import run_isolating_failures
from policy_server.loading import ModelVersion, load_policy_spec, load_version
from policy_server.policy import Decisions, Distributions, Result, Task
from policy_server.runtimes import gpu_memory
from policy_server.settings import Settings

logger = logging.getLogger("policy_server")

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # policy_server/

# How often the replicas are asked to describe themselves again, for /info.
DESCRIBE_EVERY_S = 5.0
# Routing picks replicas at random, so one describe call per replica may miss some.
DESCRIBE_CALLS_PER_REPLICA = 4
DESCRIBE_AGAIN_AFTER_S = 0.2  # after a switch, while some new replica has not answered yet
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

    result: Decisions | Distributions | None = None
    input_error: tuple[tuple[str | int, ...], str, str] | None = None  # loc, msg, kind
    failure_id: str | None = None
    batch: tuple[int, float] | None = None

    @classmethod
    def of(cls, result: Result, batch: tuple[int, float] | None) -> "Answer":
        if isinstance(result, InputError):
            return cls(input_error=(result.loc, result.msg, result.kind), batch=batch)
        if isinstance(result, PolicyFailure):
            return cls(failure_id=result.error_id, batch=batch)
        return cls(result=result, batch=batch)

    def unwrap(self) -> Decisions | Distributions:
        """The result, or the error raised as in the local executor (422 or 500)."""
        if self.input_error is not None:
            raise InputError(*self.input_error)
        if self.failure_id is not None:
            raise PolicyFailure(self.failure_id)
        assert self.result is not None
        return self.result


@serve.deployment(name="PolicyDeployment", logging_config={"enable_access_log": False})
class PolicyDeployment:
    """One replica: the policy on this replica's device, answering batches of tasks."""

    def __init__(self, version: ModelVersion, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.policy = load_version(version, device)
        self.policy.warm_up()
        self.rows_answered = 0
        self.run.set_max_batch_size(version.spec.serving.max_batch_size)
        self.run.set_batch_wait_timeout_s(version.spec.serving.batch_wait_ms / 1000)

    @serve.batch  # sizes come from the schema, set in __init__
    async def run(self, tasks: list[Task]) -> list[Answer]:
        """One forward pass for every task of the batch; a task whose input makes the model fail fails alone."""
        results, passes = run_isolating_failures(self.policy, [_writable(task) for task in tasks])
        self.rows_answered += sum(forward_pass.rows for forward_pass in passes)
        batches = {forward_pass.first_task: (forward_pass.rows, forward_pass.seconds) for forward_pass in passes}
        return [Answer.of(result, batches.get(i)) for i, result in enumerate(results)]

    def describe(self) -> dict[str, Any]:
        """The policy as `Policy.describe`, and which replica, where, and how busy it has been."""
        info = self.policy.describe()
        return info | {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gpu_memory": gpu_memory(info["device"]),
            "rows_answered": self.rows_answered,
        }


def _writable(task: Task) -> Task:
    """Ray hands arrays over read-only (zero-copy); torch warns on those. Rows are small: copy."""
    return task if task.rows.flags.writeable else replace(task, rows=task.rows.copy())


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

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Start or join Ray, deploy, and return once a replica has described itself."""
        try:
            await asyncio.to_thread(self._deploy)
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

    async def _check_loads(self, version: ModelVersion) -> None:
        """Load `version` in a one-off Ray task, off the replicas: its ConfigError if it does not fit its schema."""
        check = ray.remote(num_cpus=self.settings.ray_replica_cpus, max_retries=0)(_load_problem)
        problem = await check.remote(_located(version))
        if problem is not None:
            raise ConfigError(*problem)

    async def stop(self) -> None:
        """Delete our deployment (with Serve and Ray too, if we started them)."""
        self._ready = False
        if self._describing is not None:
            self._describing.cancel()
            await asyncio.wait([self._describing])
        await asyncio.to_thread(self._tear_down)

    async def run(self, task: Task) -> Result:
        await self._started.wait()
        if self._handle is None:
            error_id = uuid.uuid4().hex[:12]
            logger.error("a request came before the deployment, which failed to start (error id %s)", error_id)
            raise PolicyFailure(error_id)
        answer = await self._send(self._handle, task)
        if answer.batch is not None and self.observe_batch is not None:
            self.observe_batch(*answer.batch)
        return answer.unwrap()

    def describe(self) -> dict[str, Any]:
        """What the replicas said of themselves, at most DESCRIBE_EVERY_S ago."""
        replicas = sorted(self._replicas.values(), key=lambda replica: replica["replica"])
        first = replicas[0] if replicas else {}
        policy = {
            key: first[key]
            for key in ("model", "format", "sha256", "version", "device", "input_size", "heads", "gpu_memory")
            if key in first
        }
        details = [
            {key: replica[key] for key in ("replica", "node_id", "pid", "version", "device", "gpu_memory", "rows_answered")}
            for replica in replicas
        ]
        return policy | {"backend": self.backend, "replicas": self._running, "replica_details": details}

    async def _send(self, handle: DeploymentHandle, task: Task) -> Answer:
        """The replica's answer; once more if the replica died meanwhile (Serve replaces it)."""
        try:
            try:
                return await handle.run.remote(task)
            except RayActorError as exc:
                logger.warning("a replica died with a request in flight (%s); sending it again", type(exc).__name__)
                return await handle.run.remote(task)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("the deployment failed on a request (error id %s)", error_id)
            raise PolicyFailure(error_id) from None

    def _deploy(self) -> None:
        """Blocking (in a thread): Ray, Serve without its HTTP proxy, then our application, unless
        one of that name runs already (declared by a Serve config file, say): then that one."""
        with _SETUP_LOCK:
            self._mode = self._connect()
            serve.start(proxy_location=ProxyLocation.Disabled)
            running = serve.status().applications.get(self.app_name)
            if running is not None and running.status == ApplicationStatus.RUNNING:
                logger.info("the application %r runs on the cluster already: using it", self.app_name)
                self._handle = serve.get_app_handle(self.app_name)
                return
            self._deployed = True
            self._handle = self._run_application(self.version)

    def _roll_to(self, version: ModelVersion) -> None:
        """Blocking (in a thread): our application onto `version`, by Serve's rolling update."""
        with _SETUP_LOCK:
            self._run_application(version)

    def _run_application(self, version: ModelVersion) -> DeploymentHandle:
        """Deploy `version` as our application, or roll the application onto it; return once all
        its replicas run it. The caller holds _SETUP_LOCK (serve.run connects to Serve)."""
        try:
            return serve.run(policy_application(version, self.settings), name=self.app_name, route_prefix=None)
        except RuntimeError as exc:
            raise DeploymentFailed(f"{exc} {self._failure_reason()}") from None

    def _failure_reason(self) -> str:
        """The last line of Serve's message on our deployment: the replicas' error, e.g. a ConfigError."""
        application = serve.status().applications.get(self.app_name)
        deployment = application.deployments.get(PolicyDeployment.name) if application is not None else None
        lines = deployment.message.strip().splitlines() if deployment is not None else []
        return lines[-1] if lines else "(Serve gave no reason: see the replicas' log above)"

    def _connect(self) -> RayMode:
        """Calling ray.init off the main thread also keeps uvicorn's SIGTERM handler: Ray would put its own."""
        if ray.is_initialized():
            return RayMode.INHERITED
        # Ray's C++ handler for SIGTERM makes the ray.shutdown() that follows abort the process
        # (ray-project/ray#37288): uvicorn handles SIGTERM, and stop() shuts Ray down after it.
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        common: dict[str, Any] = {
            "_node_ip_address": self.settings.ray_node_ip,
            "configure_logging": False,
            # Ray ships this package, as this process has it, to every replica (Serve takes the job's
            # runtime_env as the deployment's): the nodes need its dependencies, not the package.
            "runtime_env": {"py_modules": [PACKAGE_DIR]},
        }
        if self.settings.ray_address:
            ray.init(address=self.settings.ray_address, **common)
            return RayMode.JOINED
        ray.init(
            num_cpus=self.settings.ray_cpus,
            include_dashboard=False,
            _metrics_export_port=self.settings.ray_metrics_port,
            **common,
        )
        return RayMode.STARTED

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
        with _SETUP_LOCK:
            if self._mode is RayMode.STARTED:
                serve.shutdown()
                # Waiting lets the raylet end gracefully before this process does: killed with it,
                # its agents would linger for a minute trying to report the death to a dead GCS.
                ray.shutdown(wait_for_processes=True)
                return
            if self._deployed:
                serve.delete(self.app_name)
            if self._mode is RayMode.JOINED:
                ray.shutdown()
