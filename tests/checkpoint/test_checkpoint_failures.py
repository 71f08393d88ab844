"""Checkpoints that fail well: one-line errors naming the bad file, fallback to the newest
checkpoint that loads, refused pickles that never run, and crash leftovers swept away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ebt import api
from ebt import checkpoint as ckpt
from ebt.config import Config, ConfigError, load_config
from ebt.errors import CheckpointError
from ebt.interop.convert import read_reference_checkpoint
from ebt.models import build_model

SHAPE = ["model.dim=32", "model.layers=1", "model.heads=2", "data.seq_len=16"]


def tiny_config() -> Config:
    return load_config(None, SHAPE)


def write_run(run: Path, steps: tuple[int, ...] = (100, 200), keep: int = 2) -> dict[int, dict]:
    """A run with one checkpoint of a tiny EBT per step (byte vocabulary); returns the weights."""
    config = tiny_config()
    weights = {}
    for step in steps:
        torch.manual_seed(step)
        model = build_model(config, 257)
        weights[step] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        extra = {"note": f"step {step}"}
        ckpt.save_checkpoint(run, step, model, config.to_dict(), None, None, extra, keep=keep)
    ckpt.write_run_config(run, config.to_dict())
    return weights


def truncate(path: Path) -> None:
    """Keep the first half of a file, as a crash or a full disk would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every path under a run with its size and modification time."""
    return {
        str(path.relative_to(run)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(run.rglob("*"))
    }


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_load_run_falls_back_from_a_truncated_model_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    weights = write_run(run)
    truncate(run / "step_000200" / "model.safetensors")
    before = snapshot(run)
    loaded = api.load_run(run)
    assert loaded.checkpoint == run / "step_000100"
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, weights[100][name]), name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"ebt: warning: {run / 'step_000200'} is unreadable (")
    assert "model.safetensors: truncated" in err[0]
    assert err[0].endswith(f"using {run / 'step_000100'}")
    assert snapshot(run) == before  # reading never writes into the run


def test_resume_loader_falls_back_from_a_truncated_train_state(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    truncate(run / "step_000200" / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt: .*truncated or corrupt"):
        ckpt.load_train_state(run)
    loaded = ckpt.load_newest_valid(run, with_train_state=True)
    assert loaded.step_dir == run / "step_000100"
    assert loaded.train_state["step"] == 100
    assert loaded.train_state["extra"] == {"note": "step 100"}
    assert loaded.config == tiny_config().to_dict()
    assert [(path.name, why.split(":")[0]) for path, why in loaded.skipped] == [
        ("step_000200", "train_state.pt")
    ]
    assert "train_state.pt" in capsys.readouterr().err
    # the model weights alone are fine, so the reading commands keep the newest checkpoint
    assert ckpt.load_newest_valid(run).step_dir == run / "step_000200"


def test_every_checkpoint_unreadable_is_one_line_naming_each(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    truncate(run / "step_000200" / "model.safetensors")
    truncate(run / "step_000100" / "train_state.pt")
    with pytest.raises(CheckpointError) as error:
        ckpt.load_newest_valid(run, with_train_state=True)
    message = one_line(error)
    assert message.startswith(f"no readable checkpoint in {run}: ")
    assert f"{run / 'step_000200'} (model.safetensors: truncated" in message
    assert f"{run / 'step_000100'} (train_state.pt: " in message
    assert "warning" not in capsys.readouterr().err  # nothing was used, so nothing to warn about


def test_an_explicit_step_dir_gets_no_fallback(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    truncate(run / "step_000200" / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        api.load_run(run / "step_000200")
    assert one_line(error).startswith(f"{run / 'step_000200' / 'model.safetensors'}: truncated")


def test_no_checkpoint_keeps_the_file_not_found_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*latest"):
        ckpt.load_newest_valid(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        api.load_run(tmp_path / "missing")


def test_fallback_prefers_older_checkpoints_to_an_abandoned_timeline(tmp_path):
    run = tmp_path / "run"
    write_run(run, steps=(100, 300, 200), keep=0)  # resumed from 100, then saved 200
    assert (run / "latest").read_text().strip() == "step_000200"
    truncate(run / "step_000200" / "model.safetensors")
    assert ckpt.load_newest_valid(run, warn=False).step_dir == run / "step_000100"


class Payload:
    """Unpickling this would run code: os.makedirs(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def test_a_malicious_train_state_is_refused_without_running(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    marker = tmp_path / "pwned"
    bad = run / "step_000200" / "train_state.pt"
    state = {"step": 200, "optimizer": None, "scheduler": None, "rng": {}, "extra": {}}
    torch.save({**state, "extra": {"payload": Payload(marker)}}, bad)
    torch.save({**state, "extra": {"payload": Payload(marker)}}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(CheckpointError) as error:
        ckpt.load_train_state(bad.parent)
    message = one_line(error)
    assert message.startswith(f"{bad}: refused: it holds 'os.makedirs' (pickled)")
    assert "ebt never unpickles code" in message and "tampered" in message
    assert "weights_only=False" not in message
    loaded = ckpt.load_newest_valid(run, with_train_state=True)  # ... and never runs here
    assert loaded.step_dir == run / "step_000100"
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_a_train_state_missing_keys_is_refused(tmp_path):
    write_run(tmp_path)
    step_dir = tmp_path / "step_000200"
    torch.save({"step": 200, "extra": {}}, step_dir / "train_state.pt")
    with pytest.raises(CheckpointError) as error:
        ckpt.load_train_state(step_dir)
    assert one_line(error).endswith("not a complete ebt train state: no optimizer, scheduler, rng")


def test_a_garbage_config_json_is_one_line_and_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    (run / "step_000200" / "config.json").write_text('{"model": {"dim": 32,', encoding="utf-8")
    with pytest.raises(CheckpointError) as error:
        ckpt.load_model_state(run / "step_000200")
    assert one_line(error).startswith(f"{run / 'step_000200' / 'config.json'}: not valid JSON")
    assert api.load_run(run).checkpoint == run / "step_000100"
    assert "(config.json: not valid JSON" in capsys.readouterr().err
    (run / "step_000100" / "config.json").write_bytes(b"[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        api.load_run(run / "step_000100")


def test_remove_stale_temporaries_removes_only_crash_leftovers(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    leftovers = [run / ".tmp-step_000300-123", run / ".old-step_000100-77"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    leftovers += [run / ".latest.tmp-123", run / ".config.json.tmp-77"]
    for stray in leftovers[2:]:
        stray.write_text("partial")
    kept = snapshot(run)
    for path in leftovers:
        kept = {name: value for name, value in kept.items() if not name.startswith(path.name)}
    assert sorted(ckpt.remove_stale_temporaries(run)) == sorted(leftovers)
    assert snapshot(run) == kept
    assert {"latest", "metrics.jsonl", "config.json", "step_000100", "step_000200"} <= set(kept)
    assert ckpt.remove_stale_temporaries(run) == []
    assert ckpt.remove_stale_temporaries(tmp_path / "missing") == []


def test_load_run_refuses_model_overrides_that_change_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    with pytest.raises(ConfigError) as error:
        api.load_run(run, ["model.dim=64"])
    message = one_line(error)
    assert message.startswith("model.dim=64 does not match the checkpoint (32): ")
    with pytest.raises(ConfigError, match=r"data.tokenizer=.* does not match the checkpoint"):
        api.load_run(run, ["data.tokenizer=some/tokenizer.json"])
    same = api.load_run(run, ["model.dim=32", "think.steps=3", "train.batch_size=2"])
    assert same.config.think.steps == 3 and same.config.model.dim == 32


def test_import_reference_of_a_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "paper.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}, "hyper_parameters": {}}, path)
    truncate(path)
    with pytest.raises(CheckpointError) as error:
        read_reference_checkpoint(path)
    assert one_line(error) == f"{path}: not a readable torch zip archive (truncated or corrupt)"
