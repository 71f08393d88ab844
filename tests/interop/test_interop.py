"""Interop: the paper's checkpoints in and out (`ebt import-reference` / `export-reference`),
save_pretrained / from_pretrained, and `ebt push` with huggingface_hub mocked (no network)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from support import VECTORS
from support.parity import STEP_TOLERANCE, stepwise_errors
from support.reference_layout import (
    WORDS,
    paper_hparams,
    paper_state_dict,
    write_paper_checkpoint,
    write_word_tokenizer,
)
from support.tolerances import relative

import ebt
from ebt.checkpoint import save_checkpoint, write_run_config
from ebt.cli.main import main
from ebt.config import Config, finalize
from ebt.data import ByteTokenizer
from ebt.interop.convert import InteropError, read_reference_checkpoint
from ebt.interop.reference import convert_state_dict, reference_state_dict
from ebt.models import build_model
from ebt.training.objective import Objective

EBT_VARIANTS = ["ebt_time_embed", "ebt_default", "ebt_adaln"]
ALL_VECTORS = [*EBT_VARIANTS, "transformer_pp"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    write_word_tokenizer(root / "tokenizer.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EBT_CACHE_DIR", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def imported(workspace: Path, vectors_dir: Path) -> dict[str, Path]:
    """Every parity vector's ref.ckpt imported through `ebt import-reference`."""
    runs = {}
    for name in ALL_VECTORS:
        out = workspace / "imported" / name
        tokenizer = str(workspace / "tokenizer.json")
        argv = ["import-reference", str(VECTORS / name / "ref.ckpt"), str(out)]
        assert main([*argv, "--tokenizer", tokenizer]) == 0
        runs[name] = out
    return runs


def expected_of(name: str) -> dict:
    return torch.load(VECTORS / name / "expected.pt", weights_only=True)


@pytest.mark.parametrize("name", EBT_VARIANTS)
def test_imported_run_thinks_like_the_paper(imported, name):
    """In float64 (our exact math against the paper's float32 outputs; bounds and observed
    errors in test_reference_parity): every step from the reference's state before it within
    one step's float32 rounding, and the whole trajectory within its amplified rounding."""
    expected = expected_of(name)
    model = ebt.load(imported[name]).double()
    errors = stepwise_errors(model, expected, torch.float64)
    assert len(errors) == 2 and max(max(pair) for pair in errors) < STEP_TOLERANCE, errors
    init = expected["init"].double()
    trajectory = model.think(expected["tokens_with_target"][:, :-1], init=init)
    assert len(trajectory.states) == len(expected["states"])
    for ours, theirs in zip(trajectory.states, expected["states"], strict=True):
        assert relative(ours, theirs.double()) < 5e-5
    for ours, theirs in zip(trajectory.energies, expected["energies"], strict=True):
        assert relative(ours, theirs.double()) < 5e-5


def test_imported_transformer_pp_loss_matches_the_paper(imported):
    expected = expected_of("transformer_pp")
    run = ebt.load_run(imported["transformer_pp"])
    objective = Objective(run.model, run.config.think, run.tokenizer.pad_id)
    with torch.no_grad():
        loss = objective(expected["tokens_with_target"]).loss
    assert loss.item() == pytest.approx(expected["train_loss"].item(), rel=2e-6)  # [1.1e-7]


def test_imported_run_directory_layout(imported):
    run = imported["ebt_time_embed"]
    assert (run / "latest").read_text().strip() == "step_000000"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["variant"] == "time_embed" and config["think"]["landscapes"] == 2
    loaded = ebt.load_run(run)
    assert loaded.tokenizer.vocab_size == 64 and loaded.tokenizer.pad_id == 0
    assert loaded.model.step_size.item() == pytest.approx(37.0)


def test_imported_model_generates_text(imported, capsys):
    argv = ["generate", str(imported["ebt_time_embed"]), "--prompt", "w1 w2 w3"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w1 w2 w3") and len(out.split()) > 3


def test_imported_model_evaluates_and_thinks(imported, workspace, capsys):
    corpus = workspace / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(20)))
    argv = ["eval", str(imported["ebt_default"]), f"data.source={corpus}", "--batches", "1"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and result["loss"] > 0
    argv = ["think", str(imported["ebt_time_embed"]), "--steps", "1,2", "--samples", "1"]
    assert main([*argv, "--data", str(corpus), "--batches", "1", "--json"]) == 0
    curves = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["curves"]
    assert [curve["steps"] for curve in curves] == [1, 2]


@pytest.mark.parametrize("variant", ["time_embed", "default", "adaln", "tpp"])
def test_converter_round_trip_on_the_paper_layout(variant):
    theirs = paper_state_dict(variant)
    ours = convert_state_dict(theirs)
    config = finalize(Config())
    config.model.kind = "transformer_pp" if variant == "tpp" else "ebt"
    config.model.variant = "default" if variant == "tpp" else variant
    config.model.dim, config.model.layers, config.model.heads, config.model.ffn_dim = 16, 2, 2, 24
    config.think.landscapes = 3
    build_model(config, 257).load_state_dict(ours, strict=True)  # every key and shape fits
    back = reference_state_dict(ours, config.model.variant)
    assert list(back) == list(theirs)
    assert all(back[key] is theirs[key] for key in theirs)


@pytest.mark.parametrize("variant", ["time_embed", "default", "adaln", "tpp"])
def test_import_then_export_gives_back_the_checkpoint(tmp_path, variant, capsys):
    source = write_paper_checkpoint(tmp_path / "paper.ckpt", variant)
    assert main(["import-reference", str(source), str(tmp_path / "run")]) == 0  # byte vocab
    assert (tmp_path / "run" / "step_001234").is_dir()
    assert main(["export-reference", str(tmp_path / "run"), str(tmp_path / "back.ckpt")]) == 0
    assert "some/tokenizer" in capsys.readouterr().out
    original = read_reference_checkpoint(source)
    back = read_reference_checkpoint(tmp_path / "back.ckpt")
    assert sorted(back["state_dict"]) == sorted(original["state_dict"])
    for key, tensor in original["state_dict"].items():
        assert torch.equal(back["state_dict"][key], tensor), key
    for key, value in original["hyper_parameters"].items():
        assert back["hyper_parameters"][key] == value, key
    assert back["global_step"] == 1234


def test_export_then_import_is_the_same_model(tmp_path):
    config = finalize(Config())
    config.model.dim, config.model.layers, config.model.heads, config.model.ffn_dim = 32, 2, 2, 48
    config.model.variant, config.think.step_size, config.data.seq_len = "adaln", 20.0, 16
    model = build_model(config, 257)
    save_checkpoint(tmp_path / "ours", 7, model, config.to_dict(), None, None)
    write_run_config(tmp_path / "ours", config.to_dict())
    assert main(["export-reference", str(tmp_path / "ours"), str(tmp_path / "x.ckpt")]) == 0
    assert main(["import-reference", str(tmp_path / "x.ckpt"), str(tmp_path / "back")]) == 0
    first, second = ebt.load_run(tmp_path / "ours"), ebt.load_run(tmp_path / "back")
    assert first.config.model == second.config.model
    assert first.config.think == second.config.think
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], tensor), key
    tokens = torch.randint(1, 257, (2, 16))
    init = torch.randn(2, 16, 257)
    a, b = first.model.think(tokens, init=init), second.model.think(tokens, init=init)
    assert all(torch.equal(x, y) for x, y in zip(a.states, b.states, strict=True))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vocab_to_embed_uses_prob_dist": True}, "vocab_to_embed_uses_prob_dist"),
        ({"ebt_norm": "layer"}, "ebt_norm"),
        ({"contrastive_loss": True}, "contrastive_loss"),
        ({"normalize_initial_condition": False}, "normalize_initial_condition"),
        ({"modality": "VID"}, "modality"),
        ({"denoising_initial_condition": "most_recent_embedding"}, "denoising_initial_condition"),
        ({"clamp_futures_grad": True, "clamp_max_after_warm_up": 3.0}, "clamp_max_after_warm_up"),
    ],
)
def test_unsupported_flags_are_refused_by_name(tmp_path, change, named, capsys):
    source = write_paper_checkpoint(tmp_path / "paper.ckpt", "time_embed", **change)
    assert main(["import-reference", str(source), str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert named in error and "not supported" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("variant", "change"),
    [("default", {"ebt_norm": "layer"}), ("tpp", {"contrastive_loss": True})],
)
def test_flags_the_model_ignores_are_accepted(tmp_path, variant, change):
    source = write_paper_checkpoint(tmp_path / "paper.ckpt", variant, **change)
    assert main(["import-reference", str(source), str(tmp_path / "run")]) == 0
    kind = ebt.load_run(tmp_path / "run").config.model.kind
    assert kind == ("transformer_pp" if variant == "tpp" else "ebt")


def test_tokenizer_is_required_unless_the_vocabulary_is_bytes(tmp_path, workspace, capsys):
    hparams = paper_hparams("default", tokenizer="EleutherAI/gpt-neox-20b")
    checkpoint = {"state_dict": paper_state_dict("default", vocab=64), "hyper_parameters": hparams}
    torch.save(checkpoint, tmp_path / "paper.ckpt")
    argv = ["import-reference", str(tmp_path / "paper.ckpt"), str(tmp_path / "run")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--tokenizer" in error and "EleutherAI/gpt-neox-20b" in error and "64" in error
    assert main([*argv, "--tokenizer", "byte"]) == 2
    assert "257" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(workspace / "tokenizer.json")]) == 0


def test_import_refuses_a_non_empty_output_directory(tmp_path, capsys):
    source = write_paper_checkpoint(tmp_path / "paper.ckpt", "default")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    assert main(["import-reference", str(source), str(tmp_path / "run")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


class Opaque:
    """An arbitrary class: a weights_only load must refuse to build it."""

    def __init__(self) -> None:
        self.value = 1


def test_reading_never_unpickles_code(tmp_path):
    checkpoint = {"state_dict": paper_state_dict("default"), "hyper_parameters": {"x": Opaque()}}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(InteropError, match="Opaque.*weights_only=True"):
        read_reference_checkpoint(tmp_path / "evil.ckpt")


def test_lightning_and_argparse_hyper_parameters_read_as_plain_dicts(tmp_path, monkeypatch):
    for name in ("lightning_fabric", "lightning_fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("lightning_fabric.utilities.data")
    attribute_dict = type("AttributeDict", (dict,), {"__module__": module.__name__})
    module.AttributeDict = attribute_dict
    monkeypatch.setitem(sys.modules, module.__name__, module)
    hparams = attribute_dict(paper_hparams("default"))
    checkpoint = {"state_dict": paper_state_dict("default"), "hyper_parameters": hparams}
    torch.save(checkpoint, tmp_path / "lightning.ckpt")
    for name in ("lightning_fabric", "lightning_fabric.utilities", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without Lightning
    loaded = read_reference_checkpoint(tmp_path / "lightning.ckpt")
    assert loaded["hyper_parameters"] == dict(hparams)
    assert type(loaded["hyper_parameters"]) is dict
    checkpoint["hyper_parameters"] = argparse.Namespace(**hparams)
    torch.save(checkpoint, tmp_path / "namespace.ckpt")
    assert read_reference_checkpoint(tmp_path / "namespace.ckpt")["hyper_parameters"] == hparams


def test_export_refuses_pred_step(tmp_path, capsys):
    config = finalize(Config())
    config.model.variant, config.model.dim, config.model.layers = "pred_step", 16, 1
    save_checkpoint(tmp_path / "ours", 0, build_model(config, 257), config.to_dict(), None, None)
    assert main(["export-reference", str(tmp_path / "ours"), str(tmp_path / "x.ckpt")]) == 2
    assert "pred_step" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_save_pretrained_from_pretrained_round_trip(imported, tmp_path):
    run = imported["ebt_adaln"]
    row = {"split": "val", "step": 0, "loss": 3.25, "perplexity": 25.8}
    rows = [{"step": 0, "loss": 4.0}, row]
    (run / "metrics.jsonl").write_text("".join(json.dumps(item) + "\n" for item in rows))
    out = ebt.save_pretrained(run, tmp_path / "pretrained")
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer", "README.md"} <= names
    card = (out / "README.md").read_text()
    assert "library_name: ebt" in card and "3.25" in card and '"variant": "adaln"' in card
    assert "ebt.from_pretrained" in card
    model = ebt.from_pretrained(out)
    original = ebt.load(run)
    for key, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert ebt.load_run(out).tokenizer.vocab_size == 64  # the directory is a checkpoint too


def test_save_pretrained_of_a_bare_model(tmp_path):
    config = finalize(Config())
    config.model.dim, config.model.layers, config.model.heads, config.data.seq_len = 16, 1, 2, 8
    model = build_model(config, 257).eval()
    out = ebt.save_pretrained(model, tmp_path / "bare")
    assert "No evaluation was recorded" in (out / "README.md").read_text()
    loaded = ebt.from_pretrained(out)
    tokens, init = torch.randint(1, 257, (1, 8)), torch.randn(1, 8, 257)
    expected, actual = model.think(tokens, init=init), loaded.think(tokens, init=init)
    assert torch.equal(expected.states[-1], actual.states[-1])
    assert isinstance(ebt.load_run(out).tokenizer, ByteTokenizer)


def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """A stand-in huggingface_hub module recording what ebt asks of it."""
    calls: dict = {"uploaded": tmp_path / "uploaded"}

    class HfApi:
        def __init__(self, token: str) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, **kwargs) -> str:
            calls["create_repo"] = (repo_id, kwargs)
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, **kwargs) -> str:
            calls["upload_folder"] = kwargs
            shutil.copytree(kwargs["folder_path"], calls["uploaded"])
            return "commit"

    def snapshot_download(repo_id: str, **kwargs) -> str:
        calls["snapshot_download"] = (repo_id, kwargs)
        return str(calls["uploaded"])

    module = types.SimpleNamespace(HfApi=HfApi, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def test_push_uploads_a_pretrained_directory(imported, tmp_path, monkeypatch, capsys):
    calls = fake_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    run = str(imported["transformer_pp"])
    assert main(["push", run, "someone/ebt-tpp", "--private"]) == 0
    assert "https://hub.example/someone/ebt-tpp" in capsys.readouterr().out
    assert calls["token"] == "hf_test_token"
    assert calls["create_repo"] == (
        "someone/ebt-tpp",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert calls["upload_folder"]["repo_id"] == "someone/ebt-tpp"
    uploaded = calls["uploaded"]
    assert (uploaded / "model.safetensors").is_file() and (uploaded / "tokenizer").is_dir()
    assert 'from_pretrained("someone/ebt-tpp")' in (uploaded / "README.md").read_text()
    model = ebt.from_pretrained("someone/ebt-tpp")  # through the mocked snapshot_download
    assert calls["snapshot_download"][0] == "someone/ebt-tpp"
    assert torch.equal(model.output.weight, ebt.load(run).output.weight)


@pytest.mark.parametrize(
    ("token", "hub", "message"),
    [(None, True, "HF_TOKEN"), ("hf_test_token", False, "pip install huggingface_hub")],
)
def test_push_needs_a_token_and_huggingface_hub(
    imported, tmp_path, monkeypatch, capsys, token, hub, message
):
    fake_hub(monkeypatch, tmp_path)
    if not hub:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if absent
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    assert main(["push", str(imported["ebt_default"]), "someone/x"]) == 2
    assert message in capsys.readouterr().err
