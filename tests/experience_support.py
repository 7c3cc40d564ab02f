"""What the experience tests share: a policy folder that logs, and the log read back."""

import shutil
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def logging_policy(example: str, target: Path, experience: str) -> Path:
    """A copy of examples/`example` whose schema logs as `experience` (a YAML flow mapping) says."""
    folder = target / example
    shutil.copytree(REPO / "examples" / example, folder, ignore=shutil.ignore_patterns("*.md", "train.py"))
    schema = folder / "schema.yaml"
    schema.write_text(schema.read_text() + f"experience: {experience}\n")
    return folder


def parquet_files(root: Path) -> list[Path]:
    """Every file a reader would read: not those being written ("_" or "." first)."""
    return sorted(path for path in root.rglob("*.parquet") if not path.name.startswith(("_", ".")))


def read_table(root: Path, table: str) -> list[dict[str, Any]]:
    """Every row of `steps` or `outcomes`, with the partition columns, in time order (then step)."""
    if not (root / table).is_dir():
        return []
    rows = ds.dataset(root / table, format="parquet", partitioning="hive").to_table().to_pylist()
    return sorted(rows, key=lambda row: (row["time"], row.get("step") or 0))


def every_file_reads(root: Path) -> int:
    """Read each Parquet file whole (raises if one is cut short); how many rows they hold."""
    return sum(pq.read_table(path).num_rows for path in parquet_files(root))
