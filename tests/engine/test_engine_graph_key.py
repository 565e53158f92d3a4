"""Which batches share a captured graph: the T bucket and the head-row bucket R (graphs.graph_shape).
The GPU test of graph reuse (test_engine_gpu.py) draws its batches from REUSED and NEW_ROWS."""
import pytest

from gradmem_fast.engine import graphs

M = 8
# (B, T, lengths): batches of one T bucket (Tb 64) whose real-token counts (60, 64) round to one R
REUSED = [(3, 40, [40, 17, 3]), (3, 50, [12, 50, 2])]
# the same T bucket with 95 real tokens: the next head-row bucket, so a second capture
NEW_ROWS = (3, 50, [12, 50, 33])


def _shape(B, T, lengths):
    return graphs.graph_shape(B, T, M, sum(lengths))


def test_reused_batches_share_their_graph_shape():
    first, second = (_shape(*batch) for batch in REUSED)
    assert first == second == (64, 64)
    assert REUSED[0][1] != REUSED[1][1] and REUSED[0][2] != REUSED[1][2]


def test_more_real_rows_take_the_next_head_row_bucket():
    assert _shape(*NEW_ROWS) == (64, 128) != _shape(*REUSED[0])


@pytest.mark.parametrize("B, T, real, limit, expected", [
    (1, 37, 37, None, (64, 64)), (16, 1008, 16128, None, (1024, 16384)), (2, 100, 101, 128, (112, 128)),
    (2, 100, 200, 128, (112, 224)), (3, 40, 95, None, (64, 128)),
])
def test_graph_shape(B, T, real, limit, expected):
    assert graphs.graph_shape(B, T, M if limit is None else 16, real, limit) == expected
