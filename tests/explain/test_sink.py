"""Map sets written as they arrive (explain/sink.py): the streamed result equals the one-shot
tuning, row groups stay bounded, and the explain stage's progress line says maps, rate, time left."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from explain import tuning
from explain.extract import MapProgress
from explain.sink import MapSink, ParquetSink, rows_per_group
from tests.explain.test_tuning import lesion_batch, rows_of, table_for
from study.config import MetricsConfig


def test_streamed_batches_equal_one_shot_tuning(tmp_path):
    rng = np.random.default_rng(0)
    config = MetricsConfig()
    parts = [table_for((rows_of("val", 5, rng), lesion_batch(rng, 5)), (rows_of("test", 7, rng), lesion_batch(rng, 7)),
                       config, method=method) for method in ("a", "b", "a")]
    whole = pa.concat_tables(parts)
    expected, expected_records = tuning.apply(whole, ["cam_method"], config)
    sink = MapSink(tmp_path, "run", ["cam_method"], config, expected=len(whole))
    for part in parts:  # arrival order interleaves validation and test rows of both sets
        assert not sink.complete
        sink.add(part)
    assert sink.complete
    records = sink.finish()
    streamed = pa.concat_tables(list(sink.scored()))
    assert streamed.schema.equals(expected.schema)
    pd.testing.assert_frame_equal(streamed.drop_columns(["heatmap"]).to_pandas(),
                                  expected.drop_columns(["heatmap"]).to_pandas())  # NaN equal to NaN here
    assert streamed.column("heatmap").equals(expected.column("heatmap"))
    assert records == expected_records
    sink.discard()
    assert list(tmp_path.iterdir()) == []  # the spill is gone


def test_row_groups_are_bounded_by_bytes(tmp_path):
    heat = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((300, 32, 32), np.float16))
    table = pa.table({"image_id": [str(i) for i in range(300)], "heatmap": heat})
    per_row = 32 * 32 * 2 + 512
    assert rows_per_group(table.schema, 100 * per_row) == 100
    sink = ParquetSink(tmp_path / "part.parquet")
    for start in range(0, 300, 40):
        sink.write(table.slice(start, 40))
    sink.close()
    meta = pq.ParquetFile(tmp_path / "part.parquet").metadata
    assert meta.num_rows == 300 == sink.rows
    # 64 MiB row groups hold far more than 40 rows of 32 px maps: each write is its own group here,
    # and none exceeds the bound
    assert all(meta.row_group(i).num_rows <= rows_per_group(table.schema) for i in range(meta.num_row_groups))
    big = rows_per_group(pa.schema([("heatmap", pa.fixed_shape_tensor(pa.float16(), (224, 224)))]))
    assert 600 <= big <= 700  # ~650 maps of 224 px per 64 MiB row group


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_reports_maps_rate_and_time_left():
    clock = FakeClock()
    progress = MapProgress(1000, clock=clock)
    assert "0/1000 heatmaps" in progress.line() and "estimating" in progress.line()
    clock.now += 50
    progress.add(250)
    line = progress.line()
    assert "250/1000 heatmaps" in line and "5.0 maps/s" in line and "~2m30s left" in line
    clock.now += 150
    progress.add(750)
    assert "~0s left" in progress.line()


def test_progress_prints_while_nothing_arrives(capsys, monkeypatch):
    monkeypatch.setattr(MapProgress, "EVERY_S", 0.05)
    import time

    with MapProgress(10):
        time.sleep(0.3)
    assert capsys.readouterr().out.count("0/10 heatmaps") >= 2
