"""The demo (the README's first command) runs end to end: train, evaluate, summary, plot."""

import json
import sys

from cots import demo

from ..helpers import optional_module


def test_quick_demo_writes_summary_and_plot(tmp_path, capsys):
    optional_module("matplotlib")
    assert demo.main(["--quick", "--steps", "6", "--out", str(tmp_path), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = summary["metrics"]
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0 <= metrics[f"{direction}_r{k}"] <= 100
            assert metrics[f"{direction}_r{k}_chance"] > 0
    assert summary["history"] and {"itc", "mlm", "mvm", "kl"} <= set(summary["history"][-1])
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "text -> image" in capsys.readouterr().out
    # `make demo` twice: the second run starts afresh in the same folder.
    assert demo.main(["--quick", "--steps", "3", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["steps"] == 3


def test_demo_without_matplotlib_skips_only_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert demo.main(["--quick", "--steps", "2", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "demo.png").exists()
    assert "no plot" in capsys.readouterr().out
