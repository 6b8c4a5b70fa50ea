"""Tests of `groundthink sweep`: grid parsing, point selection, and a tiny sweep end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from groundthink import GroundThinkConfig
from groundthink.cli import main
from groundthink.config import ConfigError
from groundthink.sweep import (SweepSpec, collect_results, expand_grid, parse_grid, parse_seeds, results_table,
                               run_sweep, select_points)

TINY_MODEL = dict(vocab_size=64, d_model=16, n_heads=2, head_dim=4, window_size=16, memory_block=16, chunk_size=16,
                  conv_size=2)
TINY_MQAR = dict(vocab_size=32, seq_len=32, num_pairs=2)
TINY_TRAINING = dict(max_steps=2, batch_size=2, warmup_steps=1, eval_every=2, eval_examples=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the CI machine has 2 cores shared with other jobs, and two threads
    contending there run these tiny models tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_parse_grid_types_and_order():
    grid = parse_grid(["head_dim=32,64", "expand_v=1,2,4", "layer_pattern=GSGS,GGSS", "use_short_conv=true,false"])
    assert grid == [("head_dim", [32, 64]), ("expand_v", [1.0, 2.0, 4.0]), ("layer_pattern", ["GSGS", "GGSS"]),
                    ("use_short_conv", [True, False])]
    assert isinstance(grid[1][1][0], float)


@pytest.mark.parametrize("items,message", [
    (["heads=4"], "unknown model field 'heads'"),
    (["head_dim"], "use KEY=V1,V2"),
    (["head_dim=32,x"], "invalid grid value 'x' for head_dim: expected int"),
    (["head_dim=32.5"], "expected int"),
    (["expand_v=1,,2"], "empty value"),
    (["use_short_conv=yes"], "expected bool"),
    (["expand_v=1,1"], "repeated value"),
    (["expand_v=1", "expand_v=2"], "appears twice"),
    ([], "empty grid"),
])
def test_parse_grid_rejects(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_expand_grid_rejects_invalid_point():
    with pytest.raises(ConfigError, match=r"grid point 1 \(expand_v=0.3\).*expand_v"):
        expand_grid(GroundThinkConfig(), parse_grid(["expand_v=1,0.3"]), [0])


def test_expand_grid_order_and_seeds():
    points = expand_grid(GroundThinkConfig(), parse_grid(["head_dim=16,32", "expand_v=1,2"]), [0, 1])
    assert len(points) == 8
    assert [p.index for p in points] == list(range(8))
    assert points[0].changes == {"head_dim": 16, "expand_v": 1.0}
    assert (points[0].seed, points[1].seed) == (0, 1)
    assert points[2].changes == {"head_dim": 16, "expand_v": 2.0}
    assert points[7].config["head_dim"] == 32


def test_select_points_shard_and_only():
    points = expand_grid(GroundThinkConfig(), parse_grid(["expand_v=1,2,3,4,5"]), [0])
    assert [p.index for p in select_points(points, shard="1/2")] == [1, 3]
    assert [p.index for p in select_points(points, only=[4, 0])] == [0, 4]
    with pytest.raises(ConfigError, match="the grid has points 0 .. 4"):
        select_points(points, only=[5])
    with pytest.raises(ConfigError, match="invalid --shard"):
        select_points(points, shard="2/2")
    with pytest.raises(ConfigError, match="either --only or --shard"):
        select_points(points, only=[0], shard="0/2")


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("a", "-1", "1,1", ""):
        with pytest.raises(ConfigError, match="invalid seeds"):
            parse_seeds(bad)


def tiny_spec(grid=("expand_v=1,2",)) -> SweepSpec:
    return SweepSpec(task="mqar", grid=parse_grid(list(grid)), seeds=[0],
                     base_model=GroundThinkConfig(**TINY_MODEL).to_dict(), mqar=dict(TINY_MQAR),
                     training=dict(TINY_TRAINING), probe_examples=2)


def test_two_point_sweep_resumes(tmp_path, monkeypatch):
    """Guards against a rerun retraining finished points, and against missing or unreadable outputs."""
    records = run_sweep(tiny_spec(), tmp_path)
    assert [r["index"] for r in records] == [0, 1]
    assert records[0]["state_floats"] == 2 * 2 * 4 * 4
    assert records[1]["state_floats"] == 2 * 2 * 4 * 8
    for r in records:
        assert 0.0 <= r["mqar_accuracy"] <= 1.0
        assert r["val_loss"] > 0
        assert r["steps"] == 2
        assert "focus_ratio" in r["probes"]
        assert "half_life_median" in r["probes"]
    assert (tmp_path / "points" / "point-000.json").exists()

    # A rerun reads the point files back instead of training.
    import groundthink.sweep as sweep

    def fail(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(sweep, "run_mqar_point", fail)
    again = run_sweep(tiny_spec(), tmp_path)
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in records]


def test_sweep_rejects_other_grid_in_same_folder(tmp_path):
    run_sweep(tiny_spec(), tmp_path, only=[0])
    with pytest.raises(ConfigError, match="contains a different sweep"):
        run_sweep(tiny_spec(grid=("expand_v=1,4",)), tmp_path)


def test_sweep_list_rejects_other_sweep(tmp_path, capsys):
    """--list on a folder of a different sweep raises instead of marking that sweep's points done."""
    from groundthink.cli import build_parser
    from groundthink.sweep import POINTS_DIR, _spec_from_args, prepare_out_dir

    saved = ["sweep", "--out", str(tmp_path), "--grid", "expand_v=1,2"]
    prepare_out_dir(tmp_path, _spec_from_args(build_parser().parse_args(saved)))
    (tmp_path / POINTS_DIR / "point-000.json").write_text("{}\n")

    assert main(saved + ["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["0", "done"]
    assert lines[1].split()[:2] == ["1", "todo"]

    other = ["sweep", "--out", str(tmp_path), "--grid", "expand_v=1,4", "--train", "max_steps=30", "--list"]
    assert main(other) == 1
    captured = capsys.readouterr()
    assert "contains a different sweep (differs in ['grid', 'training'])" in captured.err
    assert "done" not in captured.out


def test_sweep_list_without_folder(tmp_path, capsys):
    """--list on a new folder lists every point as todo and creates nothing."""
    out = tmp_path / "new"
    assert main(["sweep", "--out", str(out), "--grid", "expand_v=1,2", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["todo", "todo"]
    assert not out.exists()


def test_sweep_command_report_merges_points(tmp_path, capsys):
    args = ["sweep", "--out", str(tmp_path), "--grid", "layer_pattern=GSGS,GGSS", "--probe-examples", "2"]
    args += [f"--set=model.{k}={v}" for k, v in TINY_MODEL.items() if k != "vocab_size"]
    args += [f"--mqar={k}={v}" for k, v in TINY_MQAR.items()]
    args += [f"--train={k}={v}" for k, v in TINY_TRAINING.items()]
    assert main(args + ["--shard", "1/2"]) == 0
    assert not (tmp_path / "points" / "point-000.json").exists()
    assert main(args + ["--only", "0"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--out", str(tmp_path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "GGSS" in out
    assert "GSGS" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [p["index"] for p in results["points"]] == [0, 1]
    assert (tmp_path / "recall_vs_state.png").stat().st_size > 0
    assert (tmp_path / "loss_vs_params.png").stat().st_size > 0
    assert "2 of 2 points done" in (tmp_path / "results.md").read_text()


def test_sweep_command_rejects_bad_grid(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), "--grid", "expand_v=1,two"]) == 1
    assert "invalid grid value 'two' for expand_v" in capsys.readouterr().err


def test_results_table_lists_changes():
    record = {"index": 3, "changes": {"expand_v": 2.0}, "seed": 0, "parameters": 1000, "state_floats": 64,
              "mqar_accuracy": 0.5, "val_loss": 1.25, "probes": {"focus_ratio": 0.2, "half_life_median": 12.0},
              "steps": 10, "seconds": 1.2}
    table = results_table([record])
    assert "| expand_v |" in table
    assert "| 3 | 2.0 | 0 | 1,000 | 64 | 0.5000 | 1.2500 | 0.2000 | 12.0 | 10 | 1 |" in table
    with pytest.raises(ConfigError, match="not a sweep folder"):
        collect_results("/nonexistent/sweep")


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} not found")
def test_text_sweep_point(tmp_path):
    """Guards the text task's wiring: train.py run folder, checkpoint reload, probes on val text."""
    repo = Path(__file__).resolve().parents[1]
    args = ["sweep", "--task", "text", "--out", str(tmp_path), "--config", str(repo / "configs" / "tiny.toml"),
            "--grid", "expand_v=1", "--probe-examples", "2",
            "--set", f"data.path={json.dumps(str(SHAKESPEARE))}",
            "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            "--set", "train.max_steps=2", "--set", "train.eval_interval=2", "--set", "train.eval_batches=1",
            "--set", "train.sample_tokens=0", "--set", "train.progress_bar=false"]
    assert main(args) == 0
    record = json.loads((tmp_path / "points" / "point-000.json").read_text())
    assert record["task"] == "text"
    assert record["steps"] == 2
    assert record["val_loss"] > 0
    assert record["mqar_accuracy"] is None
    assert "half_life_median" in record["probes"]
    assert record["niah"]["skipped"].startswith("not requested")
