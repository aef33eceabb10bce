"""A map set's rows on their way to disk, without ever holding the set's heatmaps at once.

Rows arrive in batches (from the explain actors, or the baselines' loop). Each batch feeds the
threshold tuner (`explain.tuning.Tuner`: validation rows leave only their keys and IoU curves)
and its test rows are appended to a spill file (Arrow IPC, `ArrowSpill`). Once every row is in,
the thresholds are chosen and the spill is read back one arrival at a time, scored at the tuned
thresholds and written to the final Parquet files in bounded row groups (`ROW_GROUP_BYTES`), so a
reader can stream them. Driver memory is one row group, whatever the number of images, layers or
cascade steps. The spill is a `.<name>.tmp-<pid>` sibling, so a crashed writer's spill is swept
like any other temporary file (`StudyStore.sweep_temporary`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from explain.tuning import SPLIT, Tuner

# Row groups of the map datasets: a reader streams one at a time (pyarrow decodes a whole row
# group), so this bounds its memory; 64 MiB is ~650 maps at 224 px.
ROW_GROUP_BYTES = 64 << 20


def rows_per_group(schema: pa.Schema, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per row group so that one holds about `target_bytes` (the heatmap dominates a row)."""
    per_row = 512  # the score columns, generously
    if "heatmap" in schema.names:
        heat = schema.field("heatmap").type
        shape = getattr(heat, "shape", None)
        if shape:
            per_row += int(np.prod(shape)) * heat.value_type.bit_width // 8
    return max(1, target_bytes // per_row)


class ParquetSink:
    """One Parquet file written a batch at a time in row groups of `rows_per_group`; opened on
    the first batch (its schema is the file's: later batches are cast to it)."""

    def __init__(self, path: Path):
        self.path, self.writer, self.rows = Path(path), None, 0
        self.group = 1

    def write(self, table: pa.Table) -> None:
        if not len(table):
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = rows_per_group(table.schema)
            self.writer = pq.ParquetWriter(self.path, table.schema)
        elif table.schema != self.writer.schema:  # e.g. a column all null in one batch
            table = table.cast(self.writer.schema)
        self.writer.write_table(table, row_group_size=self.group)
        self.rows += len(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ArrowSpill:
    """A spill file in Arrow's IPC format, written a batch at a time and read back a batch at a time
    through a memory map. Not Parquet: reading back a Parquet list column (a heatmap) decodes
    repetition and definition levels for every pixel, and a reader that batches across row groups
    held several hundred MB per run at 96 px (measured); an IPC batch is the bytes as written."""

    def __init__(self, path: Path):
        self.path, self.writer, self.schema, self.rows = Path(path), None, None, 0

    def write(self, table: pa.Table) -> None:
        if not len(table):
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.schema = table.schema
            self.writer = pa.ipc.new_file(self.path, self.schema)
        elif table.schema != self.schema:  # e.g. a column all null in one batch
            table = table.cast(self.schema)
        self.writer.write_table(table)
        self.rows += len(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def batches(self) -> Iterator[pa.Table]:
        """The spilled rows, one written batch at a time (zero-copy from the memory map)."""
        if not self.path.is_file():
            return
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])


class MapSink:
    """Tuning and spilling as rows arrive (`add`), then the scored test rows in bounded batches
    (`finish`, `scored`). `expected`: the rows (validation and test) the set will receive, so
    `complete` says when to write it."""

    def __init__(self, spill_dir: Path, name: str, keys: Sequence[str], metrics_config: Any,
                 fallback: Optional[Callable[[tuple], tuple]] = None, expected: Optional[int] = None):
        self.spill = ArrowSpill(Path(spill_dir) / f".{name}.spill.tmp-{os.getpid()}")
        self.tuner = Tuner(keys, metrics_config, fallback)
        self.expected, self.received = expected, 0

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received >= self.expected

    def add(self, table: pa.Table) -> None:
        self.tuner.add(table)
        self.spill.write(table.filter(pc.equal(table.column(SPLIT), "test")))
        self.received += len(table)

    def finish(self) -> list[dict]:
        """Choose the thresholds; their records (for _tuning.json)."""
        self.spill.close()
        return self.tuner.finish()

    def scored(self) -> Iterator[pa.Table]:
        """The test rows scored at their tuned thresholds, one spilled batch (one arrival) at a time."""
        for batch in self.spill.batches():
            yield self.tuner.score(batch)

    def discard(self) -> None:
        self.spill.close()
        self.spill.path.unlink(missing_ok=True)
