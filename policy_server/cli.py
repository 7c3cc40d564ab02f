"""The `python generate.py COMMAND` commands (made into a CLI by `fire`)."""

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

from pydantic import TypeAdapter

from policy_server.clients import LANGUAGES, ClientSDKError, write_clients
from policy_server.errors import ConfigError, first_line
from policy_server.loading import SCHEMA_FILE, ModelVersion, load_policy, load_policy_spec, load_version, model_file
from policy_server.observations import RowEncoder, example_observation, observation_model
from policy_server.policy import Kind, Task
from policy_server.repository import MODELS_DIR, PolicySource, Snapshot, VersionSource, scan
from policy_server.runtimes import MODEL_SUFFIXES
from policy_server.settings import Settings

GENERATED = ("clients", "openapi.json")
WORKER_HEALTHCHECK_S = 60


class Commands:
    """Policy Server: serve a trained RL policy from schema.yaml + models/ as a REST API."""

    def copy_server_files(self, source: str, target: str = ".") -> None:
        """Put an example's (or any policy folder's) schema.yaml and model in place to be served.

        Args:
            source: a folder with schema.yaml and models/, e.g. examples/mouse_and_cheese
            target: where to put them (default: here, which `make serve` serves)
        """
        src, dst = Path(source), Path(target)
        if not (src / "models").is_dir():
            _fail(f"{src}: no models/ folder; fix: name a folder holding schema.yaml and models/ (e.g. examples/mouse_and_cheese)")
        _remove_policy_files(dst)
        (dst / "models").mkdir(parents=True, exist_ok=True)
        for model in _model_files(src / "models"):
            shutil.copy2(model, dst / "models" / model.name)
        if (src / SCHEMA_FILE).is_file():
            shutil.copy2(src / SCHEMA_FILE, dst / SCHEMA_FILE)
        print(f"copied {src}'s schema.yaml and models/ to {dst.resolve()}")

    def clean(self, target: str = ".") -> None:
        """Remove the served policy (schema.yaml, models/) and generated files (clients/, openapi.json)."""
        root = Path(target)
        _remove_policy_files(root)
        for name in GENERATED:
            path = root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"removed the policy files and generated files from {root.resolve()}")

    def validate(self, directory: str = ".") -> None:
        """Check a policy folder, or a repository of them, as the server would; print each one's input size, heads and model format.

        In a repository (or a policy with numbered versions, models/1/, models/2/, ...) every policy and
        every version is checked, and each policy says which version it would serve. One line per problem;
        exit code 1 if any.

        Args:
            directory: the folder with schema.yaml and models/, or a folder of such folders (default: here)
        """
        root = Path(directory)
        try:
            snapshot = _policies_in(root)
        except ConfigError as error:
            _fail(f"invalid: {error}")
        problems = 0
        for source in snapshot.policies.values():
            headed = not snapshot.single or len(source.versions) > 1
            problems += _validate_policy(source, headed)
        if problems:
            raise SystemExit(1)

    def import_sb3(
        self,
        agent_zip: str,
        directory: str,
        name: str | None = None,
        names: str | Sequence[str] | None = None,
        vecnormalize: str | None = None,
    ) -> None:
        """Turn a Stable-Baselines3 save into a policy folder (models/model.pt + schema.yaml), then validate it.

        PPO and A2C (Discrete, MultiDiscrete or Box actions), DQN (Discrete), SAC and TD3 (Box), with
        Box observations. Deterministic actions equal model.predict(obs, deterministic=True).

        Args:
            agent_zip: the .zip written by model.save()
            directory: the folder to write; a policy already there is replaced
            name: the policy's name (default: the folder's)
            names: one name per observation value, comma-separated: scalar fields instead of one list 'obs'
            vecnormalize: the file written by VecNormalize.save(); its observation normalisation is baked into the model
        """
        try:
            from policy_server.sb3 import convert_sb3
        except ImportError as error:
            _fail(f"import_sb3 needs {error.name}; fix: pip install stable-baselines3")
        target = Path(directory)
        try:
            converted = convert_sb3(
                Path(agent_zip), target, name, _comma_list(names) if names else None, Path(vecnormalize) if vecnormalize else None
            )
        except ConfigError as error:
            _fail(f"invalid: {error}")
        _remove_policy_files(target)
        model_path, schema_path = converted.write(target)
        baked = " with its VecNormalize statistics" if converted.normalized else ""
        print(f"wrote {model_path} ({converted.policy_class}{baked}) and {schema_path} (its api_key is new: keep it or change it)")
        self.validate(directory)

    def export_onnx(self, directory: str = ".", out: str | None = None) -> None:
        """Convert the policy's .pt2 or .pt model to ONNX, served with onnxruntime (pip install .[onnx]).

        The export is checked against the source model on random rows.

        Args:
            directory: the folder with schema.yaml and models/ (default: here)
            out: the file to write (default: DIRECTORY/models/model.onnx)
        """
        from policy_server.onnx_export import export_onnx

        root = Path(directory)
        target = Path(out) if out else root / "models" / "model.onnx"
        try:
            spec = load_policy_spec(root)
            source = model_file(root, spec)
            difference = export_onnx(source, target, load_policy(root, spec).input_size)
        except ConfigError as error:
            _fail(f"invalid: {error}")
        print(f"wrote {target} from {source} (largest difference of their outputs on random rows: {difference:.2g})")
        if target.resolve().parent == source.resolve().parent:
            print(f"to serve it, add 'model: {{path: models/{target.name}}}' to schema.yaml, or move {source.name} out of models/")

    def export_minari(
        self,
        dataset_id: str,
        directory: str = ".",
        policy: str | None = None,
        version: str | None = None,
        since: str | None = None,
        until: str | None = None,
        include_unfinished: bool = False,
    ) -> None:
        """Turn a policy's experience log (Parquet) into a Minari dataset that minari.load_dataset(DATASET_ID) opens.

        One Minari episode per episode and agent, in the order of their first steps; episodes still
        running are left out unless --include_unfinished. The dataset goes where Minari keeps them
        (MINARI_DATASETS_PATH, else ~/.minari/datasets) and never replaces one.

        Args:
            dataset_id: the new dataset's id, (namespace/)name-vN, e.g. mouse/served-v0
            directory: the policy folder, or a folder of them, whose schema names the log (experience.dir; POLICY_SERVER_EXPERIENCE_DIR overrides it)
            policy: which policy's log (default: the only one that logs)
            version: only episodes whose first step this model version decided
            since: only episodes whose first step is at or after this ISO 8601 time (UTC if it names no timezone)
            until: only episodes whose first step is before this ISO 8601 time
            include_unfinished: add episodes no outcome ended, truncated before their last step
        """
        from policy_server.experience.export import ExportRequest, export_minari, parse_time

        try:
            request = ExportRequest(
                dataset_id=str(dataset_id),
                policy=None if policy is None else str(policy),
                version=None if version is None else _version_label(version),
                since=None if since is None else parse_time(since, "--since"),
                until=None if until is None else parse_time(until, "--until"),
                include_unfinished=bool(include_unfinished),
            )
            summary = export_minari(_policies_in(Path(directory)), request, os.environ)
        except ConfigError as error:
            _fail(f"cannot export: {error}")
        print("\n".join(summary.lines()))

    def openapi(self, directory: str = ".", out: str = "openapi.json") -> None:
        """Write the OpenAPI spec of the policy in `directory` to `out`."""
        spec, _ = _openapi(directory)
        Path(out).write_text(json.dumps(spec, indent=2) + "\n")
        print(f"wrote {out}")

    def clients(self, languages: str | Sequence[str] = ",".join(LANGUAGES), out: str = "clients", directory: str = ".") -> None:
        """Generate the client SDKs of the policy in `directory` (what GET /clients serves), offline.

        Needs a Java runtime (JRE 11+). Each language becomes a folder and a zip in `out`.

        Args:
            languages: comma-separated, of python,java,r (default: all three)
            out: the folder to write them to (default: clients/)
            directory: the folder with schema.yaml and models/ (default: here)
        """
        chosen = _comma_list(languages)
        unknown = [name for name in chosen if name not in LANGUAGES]
        if unknown or not chosen:
            _fail(f"unknown language(s) {', '.join(unknown)}; fix: choose from {','.join(LANGUAGES)}")
        spec, name = _openapi(directory)
        try:
            folders = write_clients(spec, name, chosen, Path(out))
        except ClientSDKError as error:
            _fail(str(error))
        for folder in folders:
            print(f"wrote {folder}/ and {folder}.zip")

    def serve(
        self,
        directory: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        workers: int = 1,
        backend: str | None = None,
        log_level: str = "info",
    ) -> None:
        """Serve the policy in `directory`: `uvicorn app:app` from anywhere, with the hardened HTTP
        protocol (request timeouts, a connection bound, h2c upgrade requests answered whole).

        Args:
            directory: the policy folder (default: POLICY_SERVER_DIR, else here)
            workers: uvicorn worker processes; with more than one, /metrics sums them all, with
                backend ray they share one Ray and one Serve application per policy, and an
                experience log's outcomes find their episode whichever worker served it
        """
        import uvicorn

        from policy_server.executors.ray_workers import shared_ray
        from policy_server.protocol import HardenedHTTP, raise_descriptor_limit

        if directory is not None:  # else POLICY_SERVER_DIR, else the working directory
            os.environ["POLICY_SERVER_DIR"] = str(Path(directory).resolve())
        if backend is not None:
            os.environ["POLICY_SERVER_BACKEND"] = backend
        if workers > 1:
            os.environ["POLICY_SERVER_WORKERS"] = str(workers)  # the experience logs share their episodes
        raise_descriptor_limit()
        if workers > 1:
            _refuse_recurrent_policies(Settings.from_env())
        # Several workers with backend ray share one Ray and one application per policy (ray_workers.py).
        shared = workers > 1 and _serves_with_ray(Settings.from_env())
        with ExitStack() as stack:
            if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # the workers' metric files, removed at the stop
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="policy-server-metrics-"))
            if shared:
                stack.enter_context(shared_ray(Settings.from_env()))
            uvicorn.run(
                "policy_server.server:app_from_environment",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_level=log_level,
                http=HardenedHTTP,
                # A worker importing torch and loading its model holds the GIL for seconds; on a
                # busy machine its health-check thread answered uvicorn's ping too late (5 s by
                # default) and the worker was killed and started again, forever.
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            )


def _serves_with_ray(settings: Settings) -> bool:
    """Whether any policy `serve` would serve chooses backend ray (a policy that cannot load fails later, in the workers)."""
    from policy_server.server import choose_backend

    try:
        specs = [source.spec for source in scan(settings.policy_dir).policies.values() if source.spec is not None]
        return any(choose_backend(spec, settings) == "ray" for spec in specs)
    except ConfigError:
        return False


def _refuse_recurrent_policies(settings: Settings) -> None:
    """Exit 1 with one line before any worker starts: each would refuse a recurrent policy (and be started again)."""
    from policy_server.server import refuse_recurrent_with_workers

    for source in scan(settings.policy_dir).policies.values():
        if source.spec is not None:
            try:
                refuse_recurrent_with_workers(source.spec, settings)
            except ConfigError as error:
                _fail(f"policy-server: cannot start: {error}")


def _openapi(directory: str) -> tuple[dict[str, Any], str]:
    """The OpenAPI spec of the app serving `directory`, and the policy's name; exit 1 with one line if the folder is invalid."""
    from policy_server.server import build_app

    settings = _settings(directory)
    try:
        app = build_app(settings)
        name = load_policy_spec(settings.policy_dir).name
    except ConfigError as error:
        _fail(f"invalid: {error}")
    return app.openapi(), name


def _policies_in(root: Path) -> Snapshot:
    """What the server would find in `root`: one policy folder, or the policy folders in it."""
    snapshot = scan(root)
    if not snapshot.policies:
        raise ConfigError(
            root / SCHEMA_FILE,
            "file",
            "not found, nor in any of its sub-folders",
            "run in the policy's folder (or a folder of policy folders), or: python generate.py copy_server_files examples/mouse_and_cheese",
        )
    return snapshot


def _validate_policy(source: PolicySource, headed: bool) -> int:
    """Check every version of the policy, printing each one's description or its one-line problem;
    `headed`: under a line naming the policy and the version it would serve. The number of problems."""
    if source.error is not None:
        return _invalid(source.error)
    assert source.spec is not None
    problems = 0
    if headed:
        print(f"policy {source.name} ({source.folder}): {_serving_line(source)}")
    if source.wanted is None:
        problems += _invalid(_no_version_to_serve(source))
    for version in source.versions:
        try:
            lines = _check_version(source, version, headed)
        except ConfigError as error:
            problems += _invalid(error)
            continue
        indent = "  " if headed else ""
        print("\n".join(f"{indent}{line}" for line in lines))
    return problems


def _serving_line(source: PolicySource) -> str:
    labels = ", ".join(version.label for version in source.versions) or "none"
    wanted = source.wanted
    if wanted is None:
        return f"versions {labels}; none to serve"
    why = "pinned by serving.version" if source.spec is not None and source.spec.serving.version is not None else "the highest"
    return f"versions {labels}; would serve version {wanted.label} ({why})"


def _no_version_to_serve(source: PolicySource) -> ConfigError:
    assert source.spec is not None
    pinned = source.spec.serving.version
    if pinned is None:
        return ConfigError(source.folder / MODELS_DIR, "model", "no version folder holds a model file", "put one model file in models/1/")
    held = ", ".join(version.label for version in source.versions)
    return ConfigError(source.spec.path, "serving.version", f"pins version {pinned}; models/ holds {held}", "pin a version models/ holds")


def _check_version(source: PolicySource, version: VersionSource, named: bool) -> list[str]:
    """Load the version as the server would and run the example observation: what it is, as lines
    (the first naming the version and its file if `named`, else the schema as for one policy)."""
    if version.error is not None:
        raise version.error
    spec, model = source.spec, version.model_file
    assert spec is not None and model is not None
    policy = load_version(ModelVersion(source.folder, spec, model, version.label))
    info = policy.describe()
    title = f"{spec.name} version {version.label} from {model}" if named else f"{spec.name} from {spec.path}"
    lines = [f"ok: {title}", f"model: {info['model']} ({info['format']}), input size {info['input_size']}"]
    for head in info["heads"]:
        shape = f"{head['n']} actions" if head["kind"] == "discrete" else f"{head['size']} value(s)"
        labels = f" {head['labels']}" if head.get("labels") else ""
        lines.append(f"head {head['name']}: {head['kind']}, {shape}{labels}")
    if spec.observations is not None:
        example = example_observation(spec)
        observation = TypeAdapter(observation_model(spec)).validate_python(example)
        decisions = policy.run([Task(RowEncoder(spec).encode([observation]), Kind.DETERMINISTIC)])[0]
        if isinstance(decisions, Exception):
            raise ConfigError(model, "model", f"fails on the example observation ({first_line(decisions)})", "check the model on it")
        lines.append(f"example observation {json.dumps(example)}")
        lines.append(f"→ deterministic actions {decisions.actions[0]}, probability {decisions.probabilities[0]}")
    return lines


def _version_label(value: object) -> str:
    """`--version 2` (fire hands over the int 2) or "02": the partition's label, "2"."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _invalid(error: ConfigError) -> int:
    print(f"invalid: {error}", file=sys.stderr)
    return 1


def _comma_list(value: str | Sequence[str]) -> list[str]:
    """`--flag a,b,c`, which fire may hand over already split."""
    return [item.strip() for item in value.split(",")] if isinstance(value, str) else [str(item) for item in value]


def _settings(directory: str) -> Settings:
    return Settings.from_env(dict(os.environ, POLICY_SERVER_DIR=str(Path(directory).resolve())))


def _remove_policy_files(root: Path) -> None:
    (root / SCHEMA_FILE).unlink(missing_ok=True)
    for model in _model_files(root / "models"):
        model.unlink()


def _model_files(models: Path) -> list[Path]:
    """Model files, and the `model.onnx.data` weights torch's ONNX exporter writes beside one."""
    if not models.is_dir():
        return []
    return [path for path in models.iterdir() if path.is_file() and (path.suffix in MODEL_SUFFIXES or path.name.endswith(".onnx.data"))]


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(1)
