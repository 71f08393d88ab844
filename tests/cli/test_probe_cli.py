"""`ebt probe dyck|arithmetic RUN`: on tiny runs trained a few steps inside the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.text import four_step_run

from ebt.cli.main import main
from ebt.thinking.selection import thinking_passes

CONFIGS = ROOT / "configs" / "text"
POINT_KEYS = {
    "split",
    "steps",
    "samples",
    "answer_loss",
    "answer_ppl",
    "exact_match",
    "forward_passes_per_token",
    "flops_per_token",
}


def _overrides(run_dir: Path) -> list[str]:
    return [
        "data.source=dyck:count=600",
        "data.ood_source=dyck:count=600,ood",
        "data.val_fraction=0.2",
        "data.seq_len=48",
        "model.dim=32",
        "model.layers=1",
        "model.heads=2",
        "train.batch_size=4",
        *four_step_run(run_dir),
        "train.max_steps=3",
        "train.eval_every=0",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-step dyck EBT (the S2 recipe) and its Transformer++ twin."""
    root = tmp_path_factory.mktemp("probe")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EBT_CACHE_DIR", str(root / "cache"))
        for name, config in (("ebt", "dyck-tiny.toml"), ("tpp", "dyck-tiny-baseline.toml")):
            assert main(["train", str(CONFIGS / config), *_overrides(root / name)]) == 0
        yield {"ebt": root / "ebt", "tpp": root / "tpp"}
    torch.set_num_threads(threads)


def _probe(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["probe", *args, "--problems", "6", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_probe_reports_every_point_in_and_out_of_distribution(runs, tmp_path, capsys):
    plot = tmp_path / "probe.png"
    args = ["dyck", str(runs["ebt"]), "--steps", "1,2", "--samples", "1,2", "--plot", str(plot)]
    result = _probe(capsys, *args)
    assert {
        "probe",
        "kind",
        "checkpoint",
        "problems",
        "sources",
        "curves",
        "gains",
        "options",
    } <= set(result)
    assert result["kind"] == "ebt" and result["problems"] == {"in": 6, "ood": 6}
    assert result["sources"] == {"in": "dyck:count=600", "ood": "dyck:count=600,ood"}
    pairs = [(p["split"], p["steps"], p["samples"]) for p in result["curves"]]
    assert pairs == [(s, t, n) for s in ("in", "ood") for t in (1, 2) for n in (1, 2)]
    for point in result["curves"]:
        assert POINT_KEYS | {"energy_auroc_wrong"} <= set(point)
        assert 0.0 <= point["exact_match"] <= 1.0 and point["answer_loss"] > 0
        passes = thinking_passes(point["steps"], point["samples"], 1)  # landscapes = 1
        assert point["forward_passes_per_token"] == passes
    flops = {(p["steps"], p["samples"]): p["flops_per_token"] for p in result["curves"]}
    assert flops[(1, 1)] < flops[(2, 1)] < flops[(2, 2)]  # more thinking costs more
    assert set(result["gains"]) == {"in", "ood"}
    assert plot.stat().st_size > 0


def test_probe_is_deterministic_per_seed(runs, capsys):
    args = ["dyck", str(runs["ebt"]), "--steps", "2", "--samples", "2"]
    first = _probe(capsys, *args)["curves"]
    assert _probe(capsys, *args)["curves"] == first
    other = _probe(capsys, *args, "--seed", "1")["curves"]
    assert [p["answer_loss"] for p in other] != [p["answer_loss"] for p in first]


def test_transformer_pp_is_a_flat_line_and_a_baseline(runs, capsys):
    result = _probe(capsys, "dyck", str(runs["tpp"]), "--steps", "1,4", "--samples", "1,4")
    assert result["kind"] == "transformer_pp"
    for split in ("in", "ood"):
        points = [p for p in result["curves"] if p["split"] == split]
        assert len(points) == 4 and len({p["answer_loss"] for p in points}) == 1
        assert all(p["forward_passes_per_token"] == 1.0 for p in points)
        assert POINT_KEYS == set(points[0])  # no energies
    both = _probe(capsys, "dyck", str(runs["ebt"]), "--steps", "1", "--baseline", str(runs["tpp"]))
    assert both["baseline"]["kind"] == "transformer_pp"
    assert both["baseline"]["sources"] == both["sources"]  # the same problems


def test_the_thinking_options_reach_the_probe(runs, capsys):
    args = ["dyck", str(runs["ebt"]), "--steps", "2", "--samples", "1"]
    result = _probe(capsys, *args, "--langevin-noise", "0", "--accept-lower-energies")
    assert result["options"]["accept_lower_energies"] is True
    assert result["curves"][0]["forward_passes_per_token"] == thinking_passes(2, 1, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "dyck:kinds=9"], "--source: data source 'dyck:kinds=9': kinds=9: must be in"),
        (["--source", "arithmetic"], "--source='arithmetic': not a dyck source"),
        (["--source", "dyck:depth=3"], "unknown dyck parameter 'depth'"),
        (["--source", "dyck:ood_length=60"], "exceeds the run's data.seq_len=48"),
    ],
)
def test_bad_parameters_fail_in_one_line_naming_the_key(runs, capsys, args, message):
    assert main(["probe", "dyck", str(runs["ebt"]), *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_bad_flags_fail_at_parse_time(runs, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["probe", "dyck", str(runs["ebt"]), "--steps", "0"])
    assert exited.value.code == 2 and "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "sudoku", str(runs["ebt"])])


def test_the_selection_rule_is_a_knob_of_probe_and_think(runs, capsys):
    args = ["dyck", str(runs["ebt"]), "--steps", "2", "--samples", "1,3"]
    lowest = _probe(capsys, *args)
    weighted = _probe(capsys, *args, "--selection", "weighted", "--selection-temperature", "1e9")
    assert lowest["selection"] == {"rule": "lowest", "temperature": 0.1}
    assert weighted["selection"] == {"rule": "weighted", "temperature": 1e9}
    plain, mixed = ([p["answer_loss"] for p in r["curves"]] for r in (lowest, weighted))
    assert plain[0] == pytest.approx(mixed[0], rel=1e-5)  # one candidate: nothing to choose
    assert plain[1] != mixed[1]  # three: the average differs from the lowest
    capsys.readouterr()
    think = ["think", str(runs["ebt"]), "--steps", "1", "--samples", "2", "--batches", "1"]
    assert main(think + ["--selection", "sequence", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["rule"] == "sequence"
    for bad in (["--selection", "best"], ["--selection-temperature", "0"]):
        with pytest.raises(SystemExit):
            main(think + bad)


def test_the_runs_think_selection_is_the_default_and_a_flag_overrides_it(runs, capsys):
    from ebt.config import ConfigError, load_config

    think = ["think", str(runs["ebt"]), "think.selection=weighted"]
    think += ["think.selection_temperature=0.5", "--steps", "1", "--samples", "2", "--batches", "1"]
    capsys.readouterr()
    assert main([*think, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"] == {
        "rule": "weighted",
        "temperature": 0.5,
    }
    assert main([*think, "--selection", "lowest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["rule"] == "lowest"
    probed = _probe(capsys, "dyck", str(runs["ebt"]), "think.selection=sequence", "--steps", "1")
    assert probed["selection"]["rule"] == "sequence"
    assert load_config(CONFIGS / "tiny-s2.toml").think.selection == "weighted"  # the S2 preset
    with pytest.raises(ConfigError, match="think.selection"):
        load_config(CONFIGS / "tiny-s2.toml", ["think.selection=best"])
