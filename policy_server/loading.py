"""A policy directory (schema.yaml + models/) → a checked `PolicySpec` and, where it computes, a `Policy`.

The one place that knows both the schema and the model files, so the API process (which may not
load the model, with the ray backend), the replicas and `generate.py validate` read a directory
the same way.
"""

from dataclasses import dataclass
from pathlib import Path

from policy_server.errors import ConfigError
from policy_server.policy import ModelInfo, Policy, build_policy
from policy_server.runtimes import bundle_schema, find_model_file, load_runtime
from policy_server.schema import PolicySpec, load_spec, parse_spec

SCHEMA_FILE = "schema.yaml"


@dataclass(frozen=True)
class ModelVersion:
    """One version of a policy to load: its folder, its schema, which model file, its label."""

    folder: Path
    spec: PolicySpec
    model_file: Path
    label: str = "1"

    @classmethod
    def of_folder(cls, folder: Path, spec: PolicySpec) -> "ModelVersion":
        """A wave-1 policy folder: its one model file, version "1"."""
        return cls(folder, spec, model_file(folder, spec))


def load_policy_spec(policy_dir: Path) -> PolicySpec:
    """schema.yaml of the directory, or the one inside models/saved_model.zip."""
    schema_path = policy_dir / SCHEMA_FILE
    if schema_path.is_file():
        return load_spec(schema_path)
    bundle = policy_dir / "models" / "saved_model.zip"
    if bundle.is_file():
        data = bundle_schema(bundle)
        if data is not None:
            return parse_spec(data, bundle / SCHEMA_FILE)
    raise ConfigError(
        schema_path,
        "file",
        "not found",
        "run in the policy's folder, set POLICY_SERVER_DIR, or: python generate.py copy_server_files examples/mouse_and_cheese",
    )


def model_file(policy_dir: Path, spec: PolicySpec) -> Path:
    return find_model_file(policy_dir, spec.model_path)


def load_policy(policy_dir: Path, spec: PolicySpec, device: str = "cpu", cache_dir: Path | None = None) -> Policy:
    """Load the folder's one model onto `device`, check it against the schema, and read its heads."""
    return load_version(ModelVersion.of_folder(policy_dir, spec), device, cache_dir)


def load_version(version: ModelVersion, device: str = "cpu", cache_dir: Path | None = None) -> Policy:
    """Load one version's model onto `device`, check it against the schema, and read its heads."""
    runtime = load_runtime(version.model_file, device, cache_dir)
    info = ModelInfo(
        path=str(runtime.path),
        format=runtime.format,
        device=runtime.device,
        declared_input_size=runtime.input_size,
        candidate_input_sizes=runtime.candidate_input_sizes,
        sha256=runtime.sha256,
        version=version.label,
        declared_state_shapes=runtime.state_shapes,
    )
    return build_policy(version.spec, runtime, info)
