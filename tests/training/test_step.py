"""One training step for every caller (training/step.py): the precision policy, TF32, the same
step in `ebt train` and `ebt bench train`, and the whole-forward compile of train.cuda_graphs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.text import VOCAB, tiny_config

import ebt.training.step as step_module
from ebt.config import ConfigError, finalize, load_config
from ebt.models import build_model
from ebt.training.bench import _Stepper
from ebt.training.objective import Objective
from ebt.training.optim import build_optimizer
from ebt.training.step import (
    TrainingStep,
    apply_matmul_policy,
    resolve_precision,
)
from ebt.training.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(*overrides: str):
    base = ["model.variant=pred_step", "model.dim=16", "model.layers=1", "model.heads=2"]
    base += ["data.seq_len=8", "think.landscapes=2", "train.batch_size=2", "train.device=cpu"]
    return finalize(load_config(None, base + list(overrides)))


def test_auto_is_bf16_on_cuda_and_float32_elsewhere():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"
    assert [resolve_precision(p, d) for p in ("fp32", "bf16") for d in ("cpu", "cuda")] == [
        "fp32",
        "fp32",
        "bf16",
        "bf16",
    ]
    with pytest.raises(ConfigError, match="train.precision='fp16'"):
        resolve_precision("fp16", "cpu")


def test_the_default_precision_is_auto_and_the_checks_know_it():
    assert load_config(None, []).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        finalize(load_config(None, ["train.precision=fp16"]))
    with pytest.raises(ConfigError, match="train.cuda_graphs=true needs train.compile=true"):
        finalize(load_config(None, ["train.cuda_graphs=true"]))


def matmul_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every nn.Linear the model runs (hooks stay for the test)."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize(("precision", "expected"), [("bf16", torch.bfloat16), ("auto", None)])
def test_bf16_on_cpu_runs_the_step_under_cpu_autocast(precision, expected):
    """bf16 on CPU is CPU autocast for real (matrix products in bf16); auto on CPU is float32.
    The weights stay float32 (master weights)."""
    config = small_config(f"train.precision={precision}")
    stepper = _Stepper(config, VOCAB, torch.device("cpu"))
    seen = matmul_dtypes(stepper.objective.model)
    stepper.step()
    assert seen and set(seen) == {expected or torch.float32}
    assert {p.dtype for p in stepper.objective.model.parameters()} == {torch.float32}


def test_bench_and_trainer_take_the_same_step(tmp_path, corpus, monkeypatch):
    """`ebt bench train` and `ebt train` both run TrainingStep.forward_backward and
    optimizer_step, inside the same autocast region: matrix products in bf16 in both (the bench
    never entered autocast before, so its "bf16" figures were float32 ones)."""
    calls = []
    original = TrainingStep.forward_backward

    def recorded(self, *args, **kwargs):
        calls.append((self.precision, torch.is_autocast_enabled("cpu")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainingStep, "forward_backward", recorded)
    config = tiny_config(tmp_path / "run", corpus, "train.precision=bf16", "train.max_steps=1")
    trainer = Trainer(config, step_module_setup())
    trained = matmul_dtypes(trainer.model)
    trainer.train_step()
    bench = _Stepper(config, VOCAB, torch.device("cpu"))
    benched = matmul_dtypes(bench.objective.model)
    bench.step()
    assert calls == [("bf16", False), ("bf16", False)]  # the region is entered inside
    assert set(trained) == set(benched) == {torch.bfloat16}


def step_module_setup():
    from ebt.training.distributed import setup

    return setup("cpu")


def test_bench_and_trainer_give_the_same_gradients_from_the_same_weights(tmp_path, corpus):
    """One step of each on the same weights and batch: the same loss and gradients."""
    config = tiny_config(tmp_path / "run", corpus, "train.grad_clip=0")
    trainer = Trainer(config, step_module_setup())
    bench = _Stepper(config, VOCAB, torch.device("cpu"))
    bench.objective.model.load_state_dict(trainer.model.state_dict())
    batch = next(trainer.batches)
    results = []
    for training_step in (trainer.stepper, bench.training_step):
        torch.manual_seed(5)
        loss = training_step.forward_backward(batch).loss
        grads = [p.grad.clone() for p in training_step.model.parameters() if p.grad is not None]
        results.append((loss, grads))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_tf32_is_set_on_cuda_only():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        apply_matmul_policy(True, "cpu")
        assert (matmul.fp32_precision, conv.fp32_precision) == saved
        apply_matmul_policy(True, "cuda")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        apply_matmul_policy(False, torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_an_old_run_config_resumes_and_the_run_records_its_precision(tmp_path, corpus):
    """A run written before train.precision gained "auto" and train.tf32 / cuda_graphs existed
    (its config.json says "fp32" and lacks the new keys) resumes under the new defaults."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=2", "train.precision=fp32"))
    assert json.loads((run_dir / "runtime.json").read_text()) == {
        "device": "cpu",
        "precision": "fp32",
        "tf32": False,
    }
    for path in [run_dir / "config.json", *run_dir.glob("step_*/config.json")]:
        saved = json.loads(path.read_text())
        del saved["train"]["tf32"], saved["train"]["cuda_graphs"]
        path.write_text(json.dumps(saved))
    assert load_config(run_dir / "config.json", []).train.precision == "fp32"
    train(tiny_config(run_dir, corpus, "train.max_steps=3", "train.precision=bf16"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = [row for row in rows if row.get("event") == "resume"][0]
    assert resume["changes"]["train.precision"] == ["fp32", "bf16"]
    assert resume["changes"]["train.tf32"] == [None, True]
    assert json.loads((run_dir / "runtime.json").read_text())["precision"] == "bf16"


def aot_eager_compile(calls: list):
    """torch.compile with the aot_eager backend (tracing + AOTAutograd, no C++ codegen)."""
    real = torch.compile

    def compile(function, **options):
        calls.append(options)
        options = {k: v for k, v in options.items() if k != "mode"}
        return real(function, **(options | {"backend": "aot_eager"}))

    return compile


@pytest.mark.parametrize(
    ("variant", "precision"),
    [("pred_step", "fp32"), ("time_embed", "fp32"), ("time_embed", "bf16")],
)
def test_the_whole_first_order_forward_compiles_as_one_graph(variant, precision, monkeypatch):
    """train.cuda_graphs: every thinking step with the written-out gradient and the loss trace
    as ONE graph (fullgraph=True: a graph break would raise), and the step's loss and gradients
    equal the eager step's; under bf16 autocast too (the written-out gradient runs there)."""
    config = small_config(f"model.variant={variant}", "train.compile=true")
    torch.manual_seed(0)
    model = build_model(config, VOCAB)
    twin = copy.deepcopy(model)
    batch = torch.randint(1, VOCAB, (2, 9))
    results = []
    calls: list[dict] = []
    monkeypatch.setattr(step_module.torch, "compile", aot_eager_compile(calls))
    for graphs, module in (("false", model), ("true", twin)):
        overrides = (f"train.cuda_graphs={graphs}", "train.compile=true")
        train_config = small_config(*overrides, f"train.precision={precision}").train
        objective = Objective(module, config.think).train()
        optimizer = build_optimizer(module, train_config, config.think)
        training_step = TrainingStep(objective, optimizer, train_config, torch.device("cpu"))
        torch.manual_seed(1)
        output = training_step.forward_backward(batch)
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((output.loss, output.metrics["final_step_loss"], grads))
    assert calls == [{"fullgraph": True, "dynamic": False, "mode": None}]
    (loss, final, expected), (compiled_loss, compiled_final, actual) = results
    torch.testing.assert_close((compiled_loss, compiled_final), (loss, final))
    assert actual.keys() == expected.keys()
    bound = 1e-5 if precision == "fp32" else 1e-2  # bf16: the traced ops round apart (~2^-8)
    for name, gradient in expected.items():
        error = (actual[name] - gradient).norm() / gradient.norm().clamp(min=1e-12)
        assert error < bound, (name, error.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_eager_steps_on_cuda():
    """reduce-overhead (CUDA graphs) whole-forward steps give the eager steps' losses, bf16."""
    device = torch.device("cuda")
    losses = {}
    for graphs in ("false", "true"):
        config = small_config("train.device=cuda", "train.compile=true")
        config.train.cuda_graphs = graphs == "true"
        torch.manual_seed(0)
        model = build_model(config, VOCAB).to(device)
        objective = Objective(model, config.think).train()
        optimizer = build_optimizer(model, config.train, config.think)
        training_step = TrainingStep(objective, optimizer, config.train, device)
        batch = torch.randint(1, VOCAB, (2, 9), device=device)
        torch.manual_seed(1)
        losses[graphs] = torch.stack([training_step(batch).loss for _ in range(4)]).cpu()
    torch.testing.assert_close(losses["true"], losses["false"], rtol=2e-2, atol=2e-2)


def test_the_matmul_ceiling_is_timed_in_the_runs_dtype_on_cpu():
    from ebt.training.bench import matmul_ceiling

    cpu = torch.device("cpu")
    single = matmul_ceiling(cpu, "fp32", size=32, repeats=1)
    half = matmul_ceiling(cpu, "bf16", size=32, repeats=1)
    assert (single["dtype"], half["dtype"], single["size"]) == ("float32", "bfloat16", 32)
    assert single["tflops"] > 0 and half["tflops"] > 0


def test_bench_states_its_precision_and_mfu_is_counted_work_over_the_ceiling(monkeypatch):
    import ebt.training.bench as bench

    ceiling = {"tflops": 0.25, "dtype": "bfloat16", "size": 7}
    monkeypatch.setattr(bench, "matmul_ceiling", lambda device, precision: ceiling)
    monkeypatch.setattr(bench, "peak_memory_mb", lambda *args: 0.0)  # no child process
    config = small_config("train.precision=bf16")
    result = bench.bench_train(config, vs_baseline=True, repeats=1, warmup=0)
    assert (result["precision"], result["tf32"], result["cuda_graphs"]) == ("bf16", False, False)
    assert result["matmul_ceiling_tflops"] == 0.25 and result["matmul_ceiling"] == ceiling
    for prefix in ("", "baseline_"):
        seconds = result[f"{prefix}ms_per_step"] / 1000
        gflops = result[f"{prefix}gflop_per_step"] / seconds
        assert result[f"{prefix}gflops"] == pytest.approx(gflops)
        assert result[f"{prefix}mfu"] == pytest.approx(gflops / 250)  # GFLOP/s over 250 GFLOP/s


def test_compiled_work_is_not_counted_so_it_has_no_mfu():
    from ebt.training.bench import throughput

    ceiling = {"tflops": 2.0}
    assert throughput("", None, 10.0, ceiling) == {
        "gflop_per_step": None,
        "gflops": None,
        "mfu": None,
    }
    assert throughput("x_", 4.0, 10.0, ceiling) == {
        "x_gflop_per_step": 4.0,
        "x_gflops": 400.0,
        "x_mfu": 0.2,
    }


def test_a_forward_that_breaks_the_graph_is_one_line_naming_cuda_graphs(monkeypatch):
    """Without the written-out gradient the forward asks autograd for dE/dp, which a whole
    graph cannot hold: train.cuda_graphs says so in one line instead of a Dynamo traceback."""
    monkeypatch.setattr(step_module.torch, "compile", aot_eager_compile([]))
    config = small_config("train.compile=true", "train.cuda_graphs=true")
    model = build_model(config, VOCAB)
    model.hand_written_gradients = False
    objective = Objective(model, config.think).train()
    optimizer = build_optimizer(model, config.train, config.think)
    training_step = TrainingStep(objective, optimizer, config.train, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.cuda_graphs: the training forward does not"):
        training_step.forward_backward(torch.randint(1, VOCAB, (2, 9)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_runs_bf16_products_and_the_ceiling_is_bf16():
    from ebt.training.bench import matmul_ceiling

    device = torch.device("cuda")
    stepper = _Stepper(small_config("train.device=cuda"), VOCAB, device)
    seen = matmul_dtypes(stepper.objective.model)
    stepper.step()
    assert set(seen) == {torch.bfloat16}
    assert stepper.training_step.record() == {"device": "cuda", "precision": "bf16", "tf32": True}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert matmul_ceiling(device, "fp32", size=1024)["dtype"] == "bfloat16"


def test_the_scaling_studys_flop_count_is_the_eager_step_whatever_the_run_compiles(monkeypatch):
    """experiment/flops.py counts the TrainingStep of `ebt bench train` eager and in float32:
    the counter sees nothing inside compiled graphs, and the count depends on shapes only."""
    from ebt.experiment.flops import training_flops_per_step

    compiled = []
    monkeypatch.setattr(step_module, "compile_for_training", lambda *a, **k: compiled.append(a))
    plain = training_flops_per_step(small_config(), VOCAB, steps=1)
    run_as = small_config("train.compile=true", "train.cuda_graphs=true", "train.precision=bf16")
    assert training_flops_per_step(run_as, VOCAB, steps=1) == plain > 0
    assert compiled == [] and run_as.train.compile  # the caller's config is left as it was
