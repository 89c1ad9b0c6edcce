"""Calibration statistics kept apart by fold (``collect_fold_stats``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler import calibration
from tests import graphs


def test_fold_stats_equal_the_stats_of_each_folds_samples():
    model = ir.serde.deserialize_model(graphs.mlp(k=8, n=12))
    values = [v for n in model.graph for v in n.outputs]
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(0, 1 + i, size=(1, 16, 8)).astype(np.float32)} for i in range(6)]
    by_fold = calibration.collect_fold_stats(model, values, feeds, folds=2, fold_of=lambda i: 2 * i // 6,
                                             progress=False, keep_rows=8, histogram=False)
    first = calibration.collect_stats(model, values, feeds[:3], progress=False, keep_rows=8, histogram=False)
    second = calibration.collect_stats(model, values, feeds[3:], progress=False, keep_rows=8, histogram=False)
    for fold, alone in zip(by_fold, (first, second)):
        for v in values:
            np.testing.assert_array_equal(fold[v.name].channel_max, alone[v.name].channel_max)
            np.testing.assert_array_equal(fold[v.name].channel_min, alone[v.name].channel_min)
            assert fold[v.name].rows.seen == alone[v.name].rows.seen > 0
            np.testing.assert_array_equal(fold[v.name].rows.rows, alone[v.name].rows.rows)
    name = values[0].name
    assert by_fold[1][name].channel_max.max() > by_fold[0][name].channel_max.max()  # wider feeds went to fold 1
