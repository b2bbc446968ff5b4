"""python -m cots.evaluate scores a checkpoint on a held-out split or a caption file."""

import json

import pytest

from cots import evaluate as evaluate_cli
from cots.retrieval import chance_recall
from cots.training import latest, parse_config, train

from .test_training import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(parse_config(TINY + ["--steps", "2", "--batch_size", "8", "--data.train_size", "16", "--out_dir", str(out)]))
    return latest(out)


def test_scores_a_synthetic_split_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert evaluate_cli.main([str(checkpoint), "--size", "12", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["items"] == 12
    metrics = payload["metrics"]
    assert metrics["i2t_r10_chance"] == pytest.approx(chance_recall(60, 10, 5))  # 5 of 60 captions
    assert metrics["t2i_r10_chance"] == pytest.approx(100 * 10 / 12)
    table = capsys.readouterr().out
    assert "image -> text" in table and "text -> image" in table


def test_a_caption_file_run_needs_its_caption_file(checkpoint, tmp_path):
    from cots.training import load_model

    _, _, config = load_model(checkpoint)
    config.data.dataset = "captions"
    with pytest.raises(ValueError, match="--captions-json"):
        evaluate_cli.evaluation_dataset(config)
    with pytest.raises(SystemExit):
        evaluate_cli.main([str(tmp_path / "missing.pt")])
