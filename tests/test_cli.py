"""`infertrix bench` end to end on a tiny saved model."""

from __future__ import annotations

import json

from conftest import byte_tokenizer, make_tiny

from infertrix import cli


def test_bench_baseline_writes_json_and_plot(tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_tiny("llama", vocab_size=259).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "out.json"
    png = tmp_path / "out.png"
    rc = cli.main(["bench", "--model", str(folder), "--quick", "--threads", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| baseline |" in table and "decode tok/s" in table
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["recipe"] == "baseline" and row["agreement"] == 1.0 and row["decode_speedup"] == 1.0
    assert row["perplexity"] > 1 and row["decode_tok_s"] > 0 and row["peak_rss_MiB"] > 0
    assert png.stat().st_size > 1000


def test_bench_reports_failing_recipe_without_hiding_others(tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_tiny("llama", vocab_size=259).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    rc = cli.main(["bench", "--model", str(folder), "--quick", "--threads", "1", "--recipe", "no_such_method"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| baseline |" in table and "unknown transform 'no_such_method'" in table


def test_status_and_list_commands(capsys):
    assert cli.main(["status"]) == 0
    assert "quantize_per_token_int8" in capsys.readouterr().out
    assert cli.main(["list"]) == 0
