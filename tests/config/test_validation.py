"""Validation at the edge: bad config values, config files, CLI arguments and data sources fail
in one line (or are skipped with a count), before anything runs or is written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from support import ROOT

from ebt.cli.main import build_parser, main
from ebt.config import Config, ConfigError, load_config
from ebt.data import DataError, iter_documents, tokenizer_train_command
from ebt.errors import EbtError

TINY = ROOT / "configs" / "text" / "tiny.toml"

BAD_VALUES = [
    "model.kind=gpt",
    "model.variant=film",
    "model.size=huge",
    "model.dim=-128",
    "model.dim=0",
    "model.layers=0",
    "model.heads=0",
    "model.ffn_dim=-1",
    "model.norm_eps=0",
    "model.rope_theta=-1",
    "think.landscapes=0",
    "think.steps=0",
    "think.step_size=0",
    "think.step_size=-5",
    "think.step_size_lr_multiplier=-1",
    "think.step_size_random_scale=0.5",
    "think.random_steps=-1",
    "think.random_steps_min=-1",
    "think.langevin_noise=-0.5",
    "think.replay_buffer_size=0",
    "think.replay_fraction=0",
    "think.replay_fraction=1.5",
    "think.grad_clamp=-1",
    "think.absolute_clamp=-1",
    "think.init=ones",
    "think.init_scale=0",
    "think.samples=0",
    "data.source=",
    "data.text_field= ",
    "data.tokenizer=",
    "data.seq_len=1",
    "data.val_fraction=1",
    "data.val_fraction=-0.1",
    "data.ood_source=",
    "data.max_documents=-1",
    "data.train_supersample=0",
    "data.train_min_pan_speed=-0.5",
    "data.train_min_pan_speed=2.5",
    "train.batch_size=0",
    "train.grad_accum=0",
    "train.max_steps=0",
    "train.max_steps=-5",
    "train.lr=-1",
    "train.lr=0",
    "train.lr=nan",
    "train.lr=inf",
    "train.min_lr_ratio=1.5",
    "train.warmup_steps=-1",
    "train.schedule_steps=-1",
    "train.weight_decay=-0.01",
    "train.beta1=1",
    "train.beta2=-0.1",
    "train.grad_clip=-1",
    "train.eval_every=-1",
    "train.eval_batches=0",
    "train.log_every=-1",
    "train.save_every=-1",
    "train.keep_checkpoints=-1",
    "train.out_dir=",
    f"train.seed={2**63}",
    "train.device=gpu",
    "train.device=cuda:x",
    "train.precision=fp16",
    "train.num_threads=-1",
    "train.wandb_project=",
    "train.parallel=zero",
]


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("override", BAD_VALUES)
def test_a_bad_config_value_fails_in_one_line_naming_key_value_and_range(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, [override])
    message = one_line(caught.value)
    assert message.startswith(f"{key}=") and ": must be " in message
    assert value.strip() in message


def test_every_config_value_has_a_rule():
    """Every field but the booleans (typed on input) and the size preset is range-checked."""
    from ebt.config_checks import RULES

    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(section.default_factory()):
            if item.type not in ("bool", bool) and item.name != "size":
                assert f"{section.name}.{item.name}" in RULES


def test_several_bad_values_are_joined_in_one_line():
    overrides = ["model.heads=0", "train.lr=-1", "train.grad_accum=0", "data.val_fraction=2"]
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, overrides)
    message = one_line(caught.value)
    assert message.count("; ") == 3
    for override in overrides:
        assert override.partition("=")[0] + "=" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.dim=100", "model.heads=3"], "not divisible by model.heads=3"),
        (["model.dim=96", "model.heads=32"], "must be even"),
        (["think.random_steps=2", "think.random_steps_min=4"], "think.random_steps_min=4"),
        (["model.dim=1.5e0"], "model.dim: expected int"),
        (["model.dim=1e400"], "model.dim: expected int"),
    ],
)
def test_combinations_and_types(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, overrides)


BOUNDARY_VALUES = [  # (override, the value the config must then hold, type included)
    ("model.ffn_dim=0", 0),
    ("think.random_steps=0", 0),
    ("think.random_steps_min=0", 0),
    ("think.langevin_noise=0", 0.0),
    ("think.grad_clamp=0", 0.0),
    ("think.absolute_clamp=0", 0.0),
    ("think.step_size_lr_multiplier=0", 0.0),
    ("data.val_fraction=0", 0.0),
    ("data.max_documents=0", 0),
    ("train.warmup_steps=0", 0),
    ("train.schedule_steps=0", 0),
    ("train.weight_decay=0", 0.0),
    ("train.grad_clip=0", 0.0),
    ("train.min_lr_ratio=0", 0.0),
    ("train.eval_every=0", 0),
    ("train.log_every=0", 0),
    ("train.save_every=0", 0),
    ("train.keep_checkpoints=0", 0),
    ("train.num_threads=0", 0),
    ("train.seed=-1", -1),
    ("train.device=cuda:1", "cuda:1"),
    ("train.device=mps", "mps"),
    ("think.replay_fraction=1", 1.0),
    ("model.dim=1e2", 100),
]


@pytest.mark.parametrize(("override", "expected"), BOUNDARY_VALUES)
def test_values_that_mean_off_or_are_at_the_boundary_are_accepted(override, expected):
    """Accepted, and read back as given: the key holds the value (and its type), and nothing
    else in the config moved (model.dim=1e2 needs heads that divide it)."""
    extra = ["model.heads=2"] if override.startswith("model.dim") else []
    base = load_config(TINY, extra).to_dict()
    config = load_config(TINY, [override, *extra])
    section, key = override.partition("=")[0].split(".")
    value = getattr(getattr(config, section), key)
    assert value == expected and type(value) is type(expected), value
    base[section][key] = expected
    assert config.to_dict() == base


def test_a_json_run_config_is_checked_too(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model": {"heads": 0}, "train": {"max_steps": -5}}')
    with pytest.raises(ConfigError, match=r"model.heads=0: .*; train.max_steps=-5: "):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "text", "place"),
    [
        ("bad.toml", "[model]\ndim = 64\nheads = = 2\n", "line 3, column 9: invalid TOML"),
        ("open.toml", '[model]\nkind = "ebt\n', "line 2, column 12: invalid TOML"),
        ("end.toml", "[model]\ndim =", "line 2, column 6: invalid TOML"),
        ("bad.json", '{"model": {\n  "dim": 64,\n}}', "line 3, column 1: invalid JSON"),
    ],
)
def test_config_file_syntax_errors_name_file_line_and_column(tmp_path, capsys, name, text, place):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = one_line(caught.value)
    assert message.startswith(f"{path}: {place}"), message
    assert main(["train", str(path), f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"ebt: error: {message}\n"


def test_a_config_file_that_is_not_a_table_or_not_text(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a table of sections"):
        load_config(listed)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(binary)


def test_main_reports_a_config_error_in_one_line_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(TINY), "model.heads=0", f"train.out_dir={run}"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "ebt: error: model.heads=0: must be an integer >= 1\n"
    assert captured.out == ""
    assert not run.exists()


BAD_ARGUMENTS = [
    ["eval", "RUN", "--batches", "-1"],
    ["eval", "RUN", "--batches", "x"],
    ["think", "RUN", "--samples", "0"],
    ["think", "RUN", "--steps", "abc"],
    ["think", "RUN", "--steps", "0"],
    ["think", "RUN", "--steps", ""],
    ["think", "RUN", "--steps", "1,,2"],
    ["think", "RUN", "--steps", "1,-2"],
    ["think", "RUN", "--batches", "-1"],
    ["think", "RUN", "--halt-tolerance", "0"],
    ["think", "RUN", "--step-size", "-1"],
    ["think", "RUN", "--langevin-noise", "-0.1"],
    ["think", "RUN", "--seed", "1.5"],
    ["generate", "RUN", "--prompt", "x", "--max-new-tokens", "-5"],
    ["generate", "RUN", "--prompt", "x", "--max-new-tokens", "0"],
    ["generate", "RUN", "--prompt", "x", "--temperature", "-1"],
    ["generate", "RUN", "--prompt", "x", "--temperature", "nan"],
    ["generate", "RUN", "--prompt", "x", "--top-k", "-1"],
    ["generate", "RUN", "--prompt", "x", "--top-p", "0"],
    ["generate", "RUN", "--prompt", "x", "--top-p", "1.5"],
    ["generate", "RUN", "--prompt", "x", "--steps", "0"],
    ["generate", "RUN", "--prompt", "x", "--halt-tolerance", "-1"],
    ["generate", "RUN", "--prompt", "x", "--step-size", "0"],
    ["generate", "RUN", "--prompt", "x", "--langevin-noise", "inf"],
    ["generate", "RUN", "--prompt", "x", "--stop", ""],
    ["generate", "RUN", "--prompt", "x", "--seed", str(2**64)],
    ["bench", "train", "CONFIG", "--repeats", "0"],
    ["bench", "generate", "CONFIG", "--new-tokens", "0"],
    ["bench", "train", "CONFIG", "--warmup", "-1"],
    ["tokenizer", "train", "--out", "tok", "--vocab-size", "2"],
    ["tokenizer", "train", "--out", "tok", "--vocab-size", "256"],
    ["tokenizer", "train", "--out", "tok", "--max-documents", "-1"],
]


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda argv: " ".join(argv[2:]) or "empty")
def test_bad_cli_arguments_fail_at_parse_time(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nowhere near the repository
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: argument {argv[-2]}" in err and "must be" in err


def test_good_cli_arguments_parse():
    parser = build_parser()
    think = parser.parse_args(["think", "RUN", "--steps", "1, 2,8", "--samples", "4"])
    assert think.steps == [1, 2, 8] and think.samples == [4] and think.batches == 8
    assert parser.parse_args(["think", "RUN"]).steps == [1, 2, 4, 8]
    stops = ["--stop", r"\n\n", "--stop", r"a\tb\\n", "--stop", r"\x"]
    generate = parser.parse_args(["generate", "RUN", "--prompt", "p", *stops])
    assert generate.stop == ["\n\n", "a\tb\\n", r"\x"]
    tokenizer = parser.parse_args(["tokenizer", "train", "--out", "t", "--vocab-size", "257"])
    assert tokenizer.vocab_size == 257


def test_bench_generate_needs_room_for_its_new_tokens(capsys):
    assert main(["bench", "generate", str(TINY), "data.seq_len=16", "--new-tokens", "16"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["train", str(TINY), "model.heads=0", f"train.out_dir={tmp_path}"]
    with pytest.raises(ConfigError):
        main(["--debug", *argv])
    monkeypatch.setenv("EBT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(argv)
    monkeypatch.setenv("EBT_DEBUG", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    ("raised", "code", "err"),
    [
        (EbtError("first line\nsecond line"), 2, "ebt: error: first line second line\n"),
        (FileNotFoundError("no such run: r"), 2, "ebt: error: no such run: r\n"),
        (KeyboardInterrupt(), 130, "ebt: interrupted\n"),
    ],
)
def test_main_turns_user_errors_and_ctrl_c_into_one_line(monkeypatch, capsys, raised, code, err):
    def handler(args):
        raise raised

    monkeypatch.setattr("ebt.cli.main.cmd_eval", handler)
    assert main(["eval", "RUN"]) == code
    assert capsys.readouterr().err == err


def test_an_error_carrying_an_exit_code_keeps_it(monkeypatch, capsys):
    error = EbtError("SIGTERM at step 3: saved")
    error.exit_code = 143  # as TrainingInterrupted carries

    def handler(args):
        raise error

    monkeypatch.setattr("ebt.cli.main.cmd_eval", handler)
    assert main(["eval", "RUN"]) == 143
    assert capsys.readouterr().err == "ebt: SIGTERM at step 3: saved\n"


# --- data sources that are not text -------------------------------------------------------------


def write_files(folder: Path, texts: int, binaries: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(texts):
        (folder / f"note{index}.txt").write_text(f"note {index}\n\n" + "words here. " * 20)
    for index in range(binaries):  # NUL bytes, and bytes that are not UTF-8
        data = b"\x89PNG\r\n\x1a\n\x00\x00" if index % 2 == 0 else b"caf\xe9 \xff\xfe"
        (folder / f"blob{index}.bin").write_bytes(data * 50)


def test_a_directory_of_binary_files_is_a_data_error(tmp_path, capsys):
    write_files(tmp_path / "blobs", 0, 3)
    with pytest.raises(DataError) as caught:
        iter_documents(str(tmp_path / "blobs"), "train")
    message = one_line(caught.value)
    assert "none of the 3 files" in message and "is UTF-8 text" in message
    argv = ["tokenizer", "train", "--source", str(tmp_path / "blobs"), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("ebt: error: none of the 3 files")


def test_a_single_binary_file_is_a_data_error(tmp_path):
    write_files(tmp_path, 0, 1)
    with pytest.raises(DataError, match="blob0.bin is not UTF-8 text"):
        iter_documents(str(tmp_path / "blob0.bin"), "all")


def test_binary_files_among_text_are_skipped_with_one_count(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path / "notes", 6, 3)
    everything = list(iter_documents("notes", "all"))
    assert len(everything) == 6 and all(text.startswith("note ") for text in everything)
    err = capsys.readouterr().err
    assert err.startswith("ebt: skipped 3 of 9 files under notes/ that are not UTF-8 text")
    assert "(e.g. notes/blob" in err and err.count("\n") == 1
    train = list(iter_documents("notes", "train", val_fraction=0.3))
    val = list(iter_documents("notes", "val", val_fraction=0.3))
    assert sorted(train + val) == sorted(everything)
    assert capsys.readouterr().err == ""  # said once per process


def test_tokenizer_training_skips_binary_files(tmp_path, capsys):
    write_files(tmp_path / "notes", 4, 2)
    tokenizer_train_command(str(tmp_path / "notes"), 260, str(tmp_path / "tok"))
    err = capsys.readouterr().err
    assert "skipped 2 of 6 files" in err


@pytest.mark.parametrize("config", ["text/tiny.toml", "image/tiny.toml"])
def test_an_unreachable_hub_dataset_is_one_line(tmp_path, monkeypatch, capsys, config):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'some/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path / "cache"))
    path = ROOT / "configs" / config
    argv = ["train", str(path), "data.source=hf:some/set", f"train.out_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("ebt: error: cannot load hf:some/set: ConnectionError")
    assert "hf-local:PATH" in error[-1] and not (tmp_path / "run").exists()


def test_overrides_win_over_a_size_preset():
    config = load_config(TINY, ["model.size=xxs", "model.dim=64", "model.heads=4"])
    assert (config.model.layers, config.model.heads, config.model.dim) == (6, 4, 64)
    config = load_config(TINY, ["model.dim=64", "model.size=xxs"])  # the later key wins
    assert config.model.dim == 384


def test_compile_is_refused_for_image_models():
    path = ROOT / "configs" / "image" / "tiny.toml"
    with pytest.raises(ConfigError, match="train.compile: the image models"):
        load_config(path, ["train.compile=true"])
