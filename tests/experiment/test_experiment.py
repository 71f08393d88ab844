"""Experiments as commands: scaling axes, power-law fits, resumable studies, thinking-shift,
and `ebt report`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from support import ROOT
from support.text import interrupt_at, training_rows
from support.text import tiny_overrides as text_overrides
from support.vision import image_config

import ebt.training.trainer
from ebt.api import load_run
from ebt.cli.main import main
from ebt.config import ConfigError, load_config
from ebt.data import iter_eval_batches
from ebt.experiment.axes import axis_overrides, parse_values
from ebt.experiment.fit import fit_power_law, rate_gain
from ebt.experiment.scaling import RESULTS_FILE, Study, metric_names, run_study
from ebt.experiment.shift import thinking_shift, trained_steps
from ebt.modalities import modality_for
from ebt.thinking.selection import Selection, thinking_curves
from ebt.training.interrupt import TrainingInterrupted
from ebt.training.trainer import Trainer, train

TINY = ROOT / "configs" / "text" / "tiny.toml"


def tiny_overrides(corpus: Path) -> list[str]:
    """The tiny text run (support.text) on `corpus` (each study point or command sets its own steps
    and run directory after these)."""
    return text_overrides(corpus.parent / "unused-run", corpus)


@pytest.mark.parametrize(
    ("axis", "values", "named"),
    [
        ("size", "1,2", "--axis"),
        ("data", "100", "two distinct"),
        ("data", "100,100", "two distinct"),
        ("data", "100,1e5", "'1e5'"),
        ("width", "64,-8", "'-8'"),
        ("params", "64x2,128", "DIMxLAYERS"),
    ],
)
def test_bad_axis_values_are_refused_by_name(axis: str, values: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_values(axis, values)


def test_axis_overrides_put_the_config_at_the_value() -> None:
    config = load_config(TINY)  # batch 16 x seq_len 64 = 1024 tokens a step, dim 128, 4 heads
    data = dict(item.split("=") for item in axis_overrides(config, "data", "102400"))
    assert data["train.max_steps"] == "100" and int(data["train.warmup_steps"]) <= 20
    assert data["train.save_every"] == "25"  # an interrupted point resumes from a quarter
    assert axis_overrides(config, "width", "256") == ["model.dim=256", "model.heads=8"]
    expected = ["model.dim=64", "model.layers=6", "model.heads=2"]
    assert axis_overrides(config, "params", "64x6") == expected
    assert axis_overrides(config, "depth", "3") == ["model.layers=3"]


def test_power_law_fit_recovers_a_known_slope_and_rate_gain() -> None:
    x = [1e3, 2e3, 4e3, 8e3, 16e3]
    noise = np.random.default_rng(0).normal(0.0, 0.01, len(x))
    baseline = [5.0 * value**-0.3 * np.exp(eps) for value, eps in zip(x, noise, strict=True)]
    ebt_y = [9.0 * value**-0.45 for value in x]
    fitted = fit_power_law(x, baseline, samples=500)
    assert fitted.slope == pytest.approx(-0.3, abs=0.02)
    assert fitted.slope_low <= fitted.slope <= fitted.slope_high
    assert fitted.r_squared > 0.99
    exact = fit_power_law(x, ebt_y, samples=200)
    assert exact.slope == pytest.approx(-0.45) and exact.coefficient == pytest.approx(9.0)
    gain = rate_gain((x, ebt_y), (x, baseline), samples=500)
    assert gain["gain"] == pytest.approx(0.5, abs=0.1)  # |-0.45| / |-0.3| - 1
    assert gain["low"] <= gain["gain"] <= gain["high"]
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0], [1.0, -1.0])


def _study(corpus: Path, out: Path, values: list[str]) -> Study:
    return Study(
        config=str(TINY), axis="data", values=values, overrides=tiny_overrides(corpus),
        out_dir=str(out),
    )  # fmt: skip


@pytest.mark.filterwarnings("error::RuntimeWarning")  # its plot spans perplexities up to e^700
def test_interrupted_study_resumes_without_retraining_finished_points(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "study"
    real_train, trained = ebt.training.trainer.train, []

    def crash_on_third(config):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the user stops the study during its third point
        trained.append(config.train.out_dir)
        return real_train(config)

    monkeypatch.setattr(ebt.training.trainer, "train", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_study(_study(corpus, out, ["64", "192"]))  # 1 and 3 steps of 64 tokens
    recorded = json.loads((out / "results.json").read_text())["points"]
    assert sorted(recorded) == ["ebt-data-192", "ebt-data-64"]

    def counting(config):
        trained.append(config.train.out_dir)
        return real_train(config)

    trained.clear()
    monkeypatch.setattr(ebt.training.trainer, "train", counting)
    lines: list[str] = []
    results = run_study(_study(corpus, out, ["64", "192"]), progress=lines.append)
    assert [Path(run).name for run in trained] == ["baseline-data-64", "baseline-data-192"]
    assert sum("done before" in line for line in lines) == 2
    points = results["points"]
    assert {point["x"] for point in points.values()} == {64, 192}
    assert all(point["flops"] > 0 and point["metric"] > 1 for point in points.values())
    for point in points.values():  # every metric a study accepts is in the real rows
        assert set(metric_names("text", [point["model"]])) <= set(point["final_eval"])
    assert points["ebt-data-64"]["flops_per_step"] > points["baseline-data-64"]["flops_per_step"]
    assert set(results["fits"]["axis"]) >= {"ebt", "baseline", "rate_gain"}
    report = (out / "report.md").read_text()
    assert "rate gain" in report.lower() and (out / "scaling-data.png").stat().st_size > 0
    trained.clear()
    again = _study(corpus, out, ["64", "192"])
    again.overrides += ["train.num_threads=2", "train.log_every=5"]  # how it runs, not what
    run_study(again, progress=lines.append)  # all done: nothing is trained again
    assert trained == []
    more = run_study(_study(corpus, out, ["64", "192", "320"]), progress=lines.append)
    assert [Path(run).name for run in trained] == ["ebt-data-320", "baseline-data-320"]
    assert len(more["points"]) == 6 and more["fits"]["axis"]["ebt"]["slope"] != 0
    fewer = run_study(_study(corpus, out, ["64", "192"]), progress=lines.append)
    assert len(fewer["points"]) == 4 and len(trained) == 2  # fitted on the values asked for
    assert fewer["fits"] == results["fits"]
    changed = _study(corpus, out, ["64", "192"])
    changed.overrides += ["model.dim=48"]
    with pytest.raises(ConfigError, match="different study"):
        run_study(changed)


def test_a_study_interrupted_inside_a_point_resumes_that_point_exactly(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at step 2 of the 3-step point: the study stops with that point saved at step 2
    and unrecorded. Run again, it skips the finished point, trains only step 3 of the
    interrupted one, and its results file (points, metrics, evaluation rows, fits) is that of
    a study never interrupted."""
    values, models = ["64", "192"], ["ebt"]  # 1 and 3 steps of 64 tokens
    whole = _study(corpus, tmp_path / "whole", values)
    whole.models = models
    expected = json.loads(json.dumps(run_study(whole, progress=lambda line: None)))
    broken = _study(corpus, tmp_path / "broken", values)
    broken.models = models
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, run="ebt-data-192")
        with pytest.raises(TrainingInterrupted):
            run_study(broken, progress=lambda line: None)
    recorded = json.loads((tmp_path / "broken" / RESULTS_FILE).read_text())["points"]
    assert sorted(recorded) == ["ebt-data-64"]
    steps, trained = [], []
    original_step, original_train = Trainer.train_step, ebt.training.trainer.train

    def counting_steps(self: Trainer) -> dict:
        steps.append(self.step + 1)
        return original_step(self)

    def counting_runs(config):
        trained.append(Path(config.train.out_dir).name)
        return original_train(config)

    monkeypatch.setattr(Trainer, "train_step", counting_steps)
    monkeypatch.setattr(ebt.training.trainer, "train", counting_runs)
    results = json.loads(json.dumps(run_study(broken, progress=lambda line: None)))
    assert trained == ["ebt-data-192"] and steps == [3]  # resumed from its step 2
    on_disk = json.loads((tmp_path / "broken" / RESULTS_FILE).read_text())
    assert on_disk["fits"] == results["fits"] == expected["fits"]
    for name, point in expected["points"].items():
        for got in (results["points"][name], on_disk["points"][name]):
            same = {key for key in point if key not in ("run_dir", "seconds")}
            assert {key: got[key] for key in same} == {key: point[key] for key in same}, name
    rows = training_rows(tmp_path / "broken" / "runs" / "ebt-data-192")
    assert rows == training_rows(tmp_path / "whole" / "runs" / "ebt-data-192")


def test_scaling_command_line(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-study"
    argv = ["experiment", "scaling", str(TINY), *tiny_overrides(corpus), "--axis", "steps"]
    argv += ["--values", "1,2", "--models", "ebt", "--out", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["report"]).is_file() and "ebt" in summary["fits"]["axis"]
    assert main([*argv[:-5], "--values", "1", "--out", str(out)]) == 2  # one value: refused
    assert "two distinct" in capsys.readouterr().err


@pytest.fixture
def tiny_run(corpus: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    overrides = tiny_overrides(corpus) + ["train.max_steps=4", f"train.out_dir={run}"]
    assert main(["train", str(TINY), *overrides]) == 0
    return run


def curve_losses(run_path: Path, source: str, steps: list[int], samples: list[int]) -> dict:
    """Loss at every (steps, samples) of thinking_curves on the first 2 evaluation batches of a
    set (val: the run's validation split; else a file), built here from the data layer."""
    run = load_run(str(run_path))
    modality = modality_for(run.config, run.tokenizer)
    dataset = modality.dataset("val") if source == "val" else modality.dataset("all", source)
    batches = list(iter_eval_batches(dataset, run.config.train.batch_size, 2))
    think = run.config.think
    selection = Selection(think.selection, think.selection_temperature)
    curves = thinking_curves(run.model, batches, steps, samples, run.tokenizer.pad_id, 0)
    assert selection == Selection()  # the tiny run's rule is thinking_curves' default
    return {(point["steps"], point["samples"]): point["loss"] for point in curves["curves"]}


def test_thinking_shift_measures_gain_against_distance(
    tiny_run: Path, corpus: Path, tmp_path: Path
) -> None:
    """Distance = perplexity of a set / perplexity of validation, both at the trained steps and
    one sample; gains from there to the most steps (one sample, then the most samples). Every
    number against thinking_curves of the same batches (deterministic: 1e-12 relative)."""
    other = tmp_path / "other.txt"
    other.write_text("Completely different prose, numbers 12345 and CAPITALS!\n" * 40)
    plot = tmp_path / "shift.png"
    result = thinking_shift(str(tiny_run), ["val", str(other)], [1, 2], [1, 2], 2, plot=str(plot))
    rows = {row["set"]: row for row in result["sets"]}
    assert result["from_steps"] == 1  # configs/text/tiny.toml trains one step per landscape
    s2 = load_config(TINY.with_name("tiny-s2.toml"))
    assert trained_steps(s2.think) == s2.think.random_steps + 1 == 3  # what ebt eval runs
    losses = {name: curve_losses(tiny_run, name, [1, 2], [1, 2]) for name in ("val", str(other))}
    for name, row in rows.items():
        loss = losses[name]
        assert row["loss_start"] == pytest.approx(loss[1, 1], rel=1e-12)
        assert row["loss_longer"] == pytest.approx(loss[2, 1], rel=1e-12)
        assert row["loss_verified"] == pytest.approx(loss[2, 2], rel=1e-12)
        for key, end in (("gain_longer_pct", loss[2, 1]), ("gain_verified_pct", loss[2, 2])):
            gain = 100 * (1 - math.exp(end - loss[1, 1]))  # perplexity improvement, %
            assert row[key] == pytest.approx(gain, rel=1e-9), key
        distance = math.exp(loss[1, 1] - losses["val"][1, 1])
        assert row["distance"] == pytest.approx(distance, rel=1e-9)
    assert rows[str(other)]["distance"] > 1.0  # unseen prose is further from training
    assert plot.stat().st_size > 0


def test_report_of_a_run_writes_markdown_and_plots(tiny_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "report" / "report.md"
    assert main(["report", str(tiny_run), "-o", str(output)]) == 0
    text = output.read_text()
    assert "## " in text and "loss" in text
    pictures = list(output.parent.glob("*.png"))
    assert pictures and all(picture.stat().st_size > 0 for picture in pictures)


def test_study_presets_load_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    from ebt.experiment.preset import read_preset

    presets = sorted((TINY.parents[1] / "experiments").glob("*.toml"))
    assert presets
    for path in presets:
        study = read_preset(path)
        assert study is not None and Path(study["config"]).is_file()
        parse_values(study["axis"], study["values"])
        load_config(study["config"], study.get("overrides", []))
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nconfig = "x.toml"\naxis = "data"\nvalues = [1, 2]\nseed = 3\n')
    with pytest.raises(ConfigError, match="unknown \\[study\\] keys \\['seed'\\]"):
        read_preset(bad)
    assert read_preset(TINY) is None  # a plain config


def studies_run_by_the_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> list[Study]:
    """`ebt experiment scaling ARGV`, with run_study recording the Study it is given."""
    studies: list[Study] = []

    def recording(study: Study) -> dict:
        studies.append(study)
        return {"report": "report.md", "fits": {}}

    monkeypatch.setattr("ebt.experiment.scaling.run_study", recording)
    assert main(["experiment", "scaling", *argv]) == 0
    return studies


def test_study_flags_override_the_preset_and_the_preset_fills_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The command's own merge: a flag replaces the preset's key, the preset fills every key
    without a flag, the defaults fill what neither gives, and overrides on the command line
    come after the preset's (so they win when both set a key)."""
    preset = tmp_path / "study.toml"
    preset.write_text(
        f'[study]\nconfig = "{TINY}"\naxis = "data"\nvalues = [64, 128]\nmodels = ["ebt"]\n'
        'metric = "loss"\nout = "preset-out"\noverrides = ["model.dim=32", "train.seed=3"]\n'
    )
    out = str(tmp_path / "flag-out")
    flags = ["--values", "1024,2048", "--out", out, "--axis", "steps"]
    (study,) = studies_run_by_the_command([str(preset), "model.dim=48", *flags], monkeypatch)
    assert (study.axis, study.values, study.out_dir) == ("steps", ["1024", "2048"], out)
    assert (study.config, study.models, study.metric) == (str(TINY.resolve()), ["ebt"], "loss")
    assert study.overrides == ["model.dim=32", "train.seed=3", "model.dim=48"]
    plain_flags = ["--axis", "data", "--values", "64,128"]
    (plain,) = studies_run_by_the_command([str(TINY), *plain_flags], monkeypatch)
    assert (plain.models, plain.out_dir, plain.metric) == (["ebt", "baseline"], "runs/scaling", "")
    assert plain.overrides == [] and plain.values == ["64", "128"]
    capsys.readouterr()


def test_report_compares_an_image_ebt_with_its_dit(tmp_path: Path) -> None:
    runs = [tmp_path / "ebt", tmp_path / "dit"]
    train(image_config(runs[0], "tiny.toml", "train.num_threads=1"))
    train(image_config(runs[1], "dit-tiny.toml", "train.num_threads=1"))
    output = tmp_path / "compare.md"
    assert main(["report", *map(str, runs), "-o", str(output)]) == 0
    text = output.read_text()
    assert "Keys that differ" in text and "| model.kind | ebt | dit |" in text
    assert "psnr" in text and (tmp_path / "compare-0.png").stat().st_size > 0
    assert (tmp_path / "compare-1.png").stat().st_size > 0  # the DiT's grid too


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.md")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_an_image_study_fits_psnr_of_the_ebt_and_its_dit(tmp_path: Path) -> None:
    overrides = ["data.image_size=8", "model.dim=16", "model.layers=1", "model.heads=2"]
    overrides += ["model.patch_size=4", "train.batch_size=4", "train.eval_batches=1"]
    overrides += ["train.progress=false", "train.num_threads=1", "train.device=cpu"]
    config = TINY.parents[1] / "image" / "tiny.toml"
    study = Study(str(config), "steps", ["1", "2"], overrides=overrides, out_dir=str(tmp_path))
    results = run_study(study, progress=lambda line: None)
    assert sorted(results["points"]) == [
        "baseline-steps-1", "baseline-steps-2", "ebt-steps-1", "ebt-steps-2",
    ]  # fmt: skip
    assert study.metric == "psnr" and "rate_gain" in results["fits"]["axis"]
    for point in results["points"].values():
        assert set(metric_names("image", [point["model"]])) <= set(point["final_eval"])


def test_an_unknown_metric_is_refused_before_any_point_trains(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ebt.training.trainer, "train", lambda config: pytest.fail("trained"))
    study = _study(corpus, tmp_path / "study", ["64", "192"])
    study.metric = "accuracy"
    with pytest.raises(ConfigError, match="'accuracy'.*loss, ppl, forward_passes"):
        run_study(study)
    study.metric = "energy_gap"  # the baseline's rows have none
    with pytest.raises(ConfigError, match="energy_gap"):
        run_study(study)
    study.models, study.metric = ["ebt"], "energy_gap"
    with pytest.raises(pytest.fail.Exception, match="trained"):
        run_study(study)  # accepted: it gets as far as training


def test_report_of_a_video_run_has_its_rollout_strip(tmp_path: Path) -> None:
    config = TINY.parents[1] / "video" / "tiny.toml"
    run = tmp_path / "video"
    overrides = ["model.dim=32", "model.layers=1", "model.heads=2", "data.frame_size=8"]
    overrides += ["model.patch_size=2"]  # the patch-token preset: 12 numbers a patch, under 32
    overrides += ["train.batch_size=4", "train.max_steps=2", "train.eval_batches=1"]
    overrides += ["train.progress=false", f"train.out_dir={run}"]
    assert main(["train", str(config), *overrides]) == 0
    output = tmp_path / "video.md"
    assert main(["report", str(run), "-o", str(output)]) == 0
    text = output.read_text()
    assert "| ebt |" in text and "PSNR @1" in text and "copy" in text.lower()
    assert (tmp_path / "video-0.png").stat().st_size > 0


def test_a_study_runs_data_parallel_under_torchrun(corpus: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m ebt experiment scaling ...`: every point trains on both
    processes (gloo), rank 0 alone writes results and prints the summary."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp-study"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "ebt", "experiment", "scaling", str(TINY)]
    command += [*tiny_overrides(corpus), "train.parallel=ddp", "--axis", "steps"]
    command += ["--values", "1,2", "--models", "ebt", "--out", str(out), "--json"]
    env = dict(os.environ, EBT_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["fits"]["axis"]["ebt"]["slope"] == pytest.approx(
        json.loads((out / "results.json").read_text())["fits"]["axis"]["ebt"]["slope"]
    )  # one summary on stdout, from rank 0 only
    rows = [json.loads(line) for line in (out / "runs" / "ebt-steps-2" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "split" not in row and "event" not in row] == [1, 2]


def test_perplexities_past_the_log_axis_range_are_drawn_capped_and_marked(tmp_path: Path) -> None:
    from ebt.experiment.report import PLOT_CAP, plot_scaling, shown_on_log_axis

    assert shown_on_log_axis([250.0, 1e304]) == ([250.0, PLOT_CAP], [False, True])
    points = {
        f"{model}-{x}": {"model": model, "x": x, "metric": metric}
        for model, metric in (("ebt", 1.014e304), ("baseline", 250.0))
        for x in (64, 192)
    }
    results = {"study": {"models": ["ebt", "baseline"], "axis": "data", "metric": "ppl"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an e^700 point overflowed the axis and emptied it
        plot_scaling(results | {"points": points}, "x", tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0
