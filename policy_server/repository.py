"""The policies on disk: one policy folder, or a repository folder of them, each with its versions.

Only reads the file system: nothing is loaded here (`lifecycle.py` loads what a scan finds).

- `POLICY_SERVER_DIR` with a `schema.yaml` (or a `models/saved_model.zip` carrying one) at its
  top is one policy, exactly as in wave 1. Otherwise every sub-folder holding one is a policy,
  named by its schema's `name` (else its folder).
- A policy's `models/` holds one model file (version "1"), or numbered folders `models/1/`,
  `models/2/`, ... with one model file each. `model.path` in the schema names the one version.
- A scan stamps every file it reads with its size and mtime: a file still being written changes
  stamp between two scans, so the watcher loads only what two scans in a row saw unchanged.
"""

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from policy_server.errors import ConfigError
from policy_server.loading import SCHEMA_FILE, load_policy_spec
from policy_server.runtimes import MODEL_SUFFIXES, find_model_file
from policy_server.schema import PolicySpec

MODELS_DIR = "models"
BUNDLE = Path(MODELS_DIR) / "saved_model.zip"


@dataclass(frozen=True)
class FileStamp:
    """What tells a changed or still-growing file: its size and modification time."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        try:
            status = path.stat()
        except OSError:
            return cls(-1, -1)
        return cls(status.st_size, status.st_mtime_ns)


@dataclass(frozen=True)
class VersionSource:
    """One version of a policy on disk: its model file, or why it cannot be served."""

    label: str
    model_file: Path | None
    stamp: FileStamp = FileStamp(-1, -1)
    error: ConfigError | None = None


@dataclass(frozen=True)
class PolicySource:
    """One policy folder: its schema (or why it cannot be read) and its versions, lowest first."""

    name: str
    folder: Path
    spec: PolicySpec | None
    schema_stamp: FileStamp
    versions: tuple[VersionSource, ...] = ()
    error: ConfigError | None = None

    def version(self, label: str) -> VersionSource | None:
        return next((version for version in self.versions if version.label == label), None)

    @property
    def wanted(self) -> VersionSource | None:
        """The version to serve unless an operator chose another: `serving.version`, else the highest."""
        if self.spec is not None and self.spec.serving.version is not None:
            return self.version(self.spec.serving.version)
        return self.versions[-1] if self.versions else None

    def stamps(self, label: str) -> tuple[FileStamp, FileStamp]:
        """What a loaded version depends on: the schema and its model file."""
        version = self.version(label)
        return self.schema_stamp, version.stamp if version is not None else FileStamp(-1, -1)


@dataclass(frozen=True)
class Snapshot:
    """What one scan found. `single`: the root is itself a policy (wave 1's layout)."""

    root: Path
    single: bool
    policies: dict[str, PolicySource] = field(default_factory=dict)


def scan(root: Path) -> Snapshot:
    """The policies under `root`. A policy that cannot be read is kept, with its error."""
    if is_policy_folder(root):
        source = read_policy(root)
        return Snapshot(root, single=True, policies={source.name: source})
    policies: dict[str, PolicySource] = {}
    for folder in _sub_folders(root):
        if not is_policy_folder(folder):
            continue
        source = read_policy(folder)
        if source.name in policies:
            other = policies[source.name].folder
            source = PolicySource(
                source.name,
                folder,
                None,
                source.schema_stamp,
                error=ConfigError(
                    folder / SCHEMA_FILE, "name", f"{source.name!r} is also the name of {other}", "give each policy its own name"
                ),
            )
            policies[f"{source.name}@{folder.name}"] = source
            continue
        policies[source.name] = source
    return Snapshot(root, single=False, policies=policies)


def is_policy_folder(folder: Path) -> bool:
    return (folder / SCHEMA_FILE).is_file() or (folder / BUNDLE).is_file()


def _sub_folders(root: Path) -> list[Path]:
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ConfigError(
            root, "POLICY_SERVER_DIR", f"cannot be read ({exc.strerror})", "point it at a policy folder or a folder of them"
        ) from None
    return [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]


def read_policy(folder: Path) -> PolicySource:
    schema_file = folder / SCHEMA_FILE if (folder / SCHEMA_FILE).is_file() else folder / BUNDLE
    schema_stamp = FileStamp.of(schema_file)
    try:
        spec = _spec_of(folder, schema_stamp)
    except ConfigError as error:
        return PolicySource(folder.name, folder, None, schema_stamp, error=error)
    try:
        versions = tuple(_versions(folder, spec))
    except ConfigError as error:
        return PolicySource(spec.name, folder, spec, schema_stamp, error=error)
    return PolicySource(spec.name, folder, spec, schema_stamp, versions)


@functools.lru_cache(maxsize=1024)
def _spec_of(folder: Path, stamp: FileStamp) -> PolicySpec:
    """The folder's schema, parsed again only when its file changed (the watcher reads every
    policy every few seconds). `stamp` is the cache key."""
    return load_policy_spec(folder)


def _versions(folder: Path, spec: PolicySpec) -> Iterable[VersionSource]:
    """Version "1" for a single model file (or `model.path`); else one per numbered folder."""
    models = folder / MODELS_DIR
    numbered = _numbered_folders(models) if spec.model_path is None else []
    if not numbered:
        model = find_model_file(folder, spec.model_path)
        yield VersionSource("1", model, FileStamp.of(model))
        return
    bare = [path for path in models.iterdir() if path.is_file() and path.suffix in MODEL_SUFFIXES]
    if bare:
        raise ConfigError(
            bare[0], "models", "is a model file beside numbered version folders", f"move it into {models / '1'}/ (or the next number)"
        )
    for version_dir in numbered:
        model = _the_model_in(version_dir)
        if model is not None:
            yield model


def _numbered_folders(models: Path) -> list[Path]:
    if not models.is_dir():
        return []
    folders = [path for path in models.iterdir() if path.is_dir() and path.name.isdigit()]
    return sorted(folders, key=lambda path: int(path.name))


def _the_model_in(version_dir: Path) -> VersionSource | None:
    """The version's one model file; None while its folder has none yet (still being copied)."""
    label = str(int(version_dir.name))
    files = sorted(path for path in version_dir.iterdir() if path.is_file() and path.suffix in MODEL_SUFFIXES)
    if not files:
        return None
    if len(files) > 1:
        names = ", ".join(path.name for path in files)
        error = ConfigError(version_dir, "model", f"several model files ({names})", "keep one model file per version folder")
        return VersionSource(label, None, error=error)
    return VersionSource(label, files[0], FileStamp.of(files[0]))
