"""What the experience tests share: a policy folder that logs, and the log read back."""

import shutil
from pathlib import Path
from typing import Any, ClassVar

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


class MouseGrid:
    """The mouse_and_cheese example's world, for the tests to play episodes in: a mouse on a 6x6
    grid moves up, down, left or right towards a cheese; -0.05 a step, +1 on the cheese (the end),
    cut short after `limit` steps."""

    MOVES: ClassVar[dict[int, tuple[int, int]]] = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}

    def __init__(self, mouse: tuple[int, int], cheese: tuple[int, int], limit: int = 12) -> None:
        self.mouse, self.cheese, self.limit, self.steps = mouse, cheese, limit, 0

    def observation(self) -> dict[str, float]:
        (row, col), (cheese_row, cheese_col) = self.mouse, self.cheese
        return {
            "mouse_row": row,
            "mouse_col": col,
            "mouse_row_distance": cheese_row - row,
            "mouse_col_distance": cheese_col - col,
            "cheese_row": cheese_row,
            "cheese_col": cheese_col,
        }

    def step(self, action: int) -> tuple[float, bool, bool]:
        """Reward, terminated, truncated."""
        d_row, d_col = self.MOVES[action]
        self.mouse = (min(5, max(0, self.mouse[0] + d_row)), min(5, max(0, self.mouse[1] + d_col)))
        self.steps += 1
        if self.mouse == self.cheese:
            return 1.0, True, False
        return -0.05, False, self.steps >= self.limit


def row_of(observation: dict[str, float]) -> list[float]:
    return [float(value) for value in observation.values()]
