"""benchmarks/kvcache_compare.py: our labels and kvpress's presses land on the same rows."""

from __future__ import annotations

from benchmarks.kvcache_compare import our_cell, rows


def test_our_labels_parse_to_method_and_ratio():
    assert our_cell("snapkv") == ("snapkv", 0.5)
    assert our_cell("tova(compression=0.25)") == ("tova", 0.25)
    assert our_cell("h2o(observation_window=256)") == ("h2o", 0.5)
    assert our_cell("full cache") == ("full cache", 0.0)
    assert our_cell("kivi:4") == ("kivi:4", 0.0)


def test_rows_pair_cells_and_average_over_common_tasks():
    def ours_cell(score, kv):
        return {"score": score, "kv": kv, "s": 2.0}

    def theirs_cell(press, ratio, score, kv):
        return {"press": press, "ratio": ratio, "score": score, "s": 1.0, "kv": 2 * kv, "kv_kept": kv}

    ours = {
        "a": {"full cache": ours_cell(100, 10), "snapkv": ours_cell(50, 5)},
        "b": {"full cache": ours_cell(80, 10), "snapkv": ours_cell(30, 5)},
        "c": {"full cache": ours_cell(0, 10)},  # not in kvpress's file: left out
    }
    theirs = {
        t: {"full cache": theirs_cell("full", 0.0, 90, 10), "SnapKV@0.5": theirs_cell("SnapKV", 0.5, 60, 5),
            "KVzip@0.5": theirs_cell("KVzip", 0.5, 70, 5)}
        for t in ("a", "b")
    }
    table, tasks = rows(ours, theirs)
    assert tasks == ["a", "b"]
    by = {(r["method"], r["ratio"]): r for r in table}
    snap = by[("snapkv", 0.5)]
    assert snap["ours avg"] == 40 and snap["kvpress avg"] == 60 and snap["kvpress - ours"] == 20
    assert snap["a"] == "50 / 60" and snap["ours KV vs full"] == 0.5 and snap["kvpress KV vs full"] == 0.5
    assert by[("full cache", "-")]["kvpress - ours"] == 0
    assert by[("kvzip", 0.5)]["ours avg"] == "" and by[("kvzip", 0.5)]["kvpress avg"] == 70
