"""`ebt generate --graphs`: the EBT decoding step traces as one graph at fixed shapes and gives
the eager cached generator's tokens and energies."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from ebt.config import load_config
from ebt.errors import ConfigError
from ebt.modalities.text import graph_decoding
from ebt.modalities.text.generate import Sampling, generate_ids
from ebt.models import build_model
from ebt.models.candidate_gradient import extend_context_by_one
from ebt.nn.kv_cache import StaticKeyValueBuffer
from ebt.thinking.loop import InferenceOptions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Every model, variant and setting compiles decoding_step once more: without a reset a
    whole test run reaches dynamo's recompile limit (8 per code object), a hard error under
    fullgraph."""
    torch._dynamo.reset()


VARIANTS = ("time_embed", "adaln", "default", "pred_step")


def _model(variant: str, window: int = 8, noise: float = 0.0, kind: str = "ebt"):
    overrides = [f"model.kind={kind}", f"model.variant={variant}", "model.dim=32"]
    overrides += ["model.layers=2", "model.heads=2", f"data.seq_len={window}"]
    overrides += [f"think.langevin_noise={noise}"]
    torch.manual_seed(0)
    return build_model(load_config(None, overrides), 20).eval()


def aot_eager_compile(calls: list, graphs: list | None = None):
    """torch.compile through aot_eager (tracing + AOTAutograd, no C++ codegen); records the
    options it was asked for and (in `graphs`) every graph it compiled."""
    real = torch.compile
    aot_eager = lookup_backend("aot_eager")

    def counting(graph_module, example_inputs):
        if graphs is not None:
            graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    def compile(function, **options):
        calls.append(options)
        options = {k: v for k, v in options.items() if k != "mode"}
        return real(function, **(options | {"backend": counting}))

    return compile


def _generate(model, graphs: bool, thinking: InferenceOptions, count: int = 14):
    records: list[dict] = []
    sampling = Sampling(steps=2, thinking=thinking, graphs=graphs)
    tokens = list(generate_ids(model, [1, 2, 3], count, 8, sampling, seed=3, records=records))
    energies = [r["energy"] for r in records]  # None for Transformer++
    energies = energies if None in energies else torch.tensor(energies)
    return tokens, energies, [r["steps"] for r in records]


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_generation_equals_cached_generation_across_window_restarts(variant, monkeypatch):
    """Window 8, 3 prompt + 14 new tokens (two restarts): the compiled one-graph step
    (fullgraph=True) gives the eager cached path's tokens one for one and its energies, and is
    traced once for all tokens and restarts."""
    calls: list[dict] = []
    compiled: list = []
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile(calls, compiled))
    model = _model(variant)
    thinking = InferenceOptions(langevin_noise=0.0)
    eager = _generate(model, False, thinking)
    graphs = _generate(model, True, thinking)
    assert graphs[0] == eager[0]
    torch.testing.assert_close(graphs[1], eager[1], rtol=1e-5, atol=1e-5)
    assert graphs[2] == eager[2] == [4] * 14
    assert calls == [{"fullgraph": True, "dynamic": False, "mode": None}]
    assert len(compiled) == 1  # one graph for every token: no recompilation per position


def test_transformer_pp_graph_generation_equals_its_cached_generation(monkeypatch):
    """The twin's step (fixed-capacity cache, one graph): its cached path's tokens across two
    window restarts, traced once."""
    compiled: list = []
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile([], compiled))
    model = _model("time_embed", kind="transformer_pp")
    thinking = InferenceOptions()
    assert _generate(model, True, thinking)[0] == _generate(model, False, thinking)[0]
    assert len(compiled) == 1


def test_the_trained_langevin_sigma_is_read_once_and_the_noisy_step_traces(monkeypatch):
    # planted: the sigma left a tensor -> "Could not guard on data-dependent expression" (red)
    """With the trained sigma (> 0) each thinking step adds noise: the sigma is a Python number
    of the compiled step (a device read per step would break the graph), and the noise is the
    eager path's draw for draw (CPU, aot_eager)."""
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile([]))
    model = _model("time_embed", noise=0.5)
    assert float(model.langevin_std) == 0.5
    eager = _generate(model, False, InferenceOptions())
    graphs = _generate(model, True, InferenceOptions())
    assert graphs[0] == eager[0]
    torch.testing.assert_close(graphs[1], eager[1], rtol=1e-5, atol=1e-5)


def test_accepting_lower_energies_traces_in_the_step_too(monkeypatch):
    """--accept-lower-energies (one extra energy per step, a per-candidate choice on the
    device) is part of the one graph and gives the eager cached path's tokens."""
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile([]))
    model = _model("adaln")
    thinking = InferenceOptions(langevin_noise=0.0, accept_lower_energies=True)
    eager = _generate(model, False, thinking, count=6)
    graphs = _generate(model, True, thinking, count=6)
    assert graphs[0] == eager[0]
    torch.testing.assert_close(graphs[1], eager[1], rtol=1e-5, atol=1e-5)


def _static_state(model, tokens: torch.Tensor, capacity: int):
    cache = model.encode_context(tokens, torch.arange(tokens.shape[0]))
    buffers = [
        StaticKeyValueBuffer(k, v, capacity) for k, v in zip(cache.keys, cache.values, strict=True)
    ]
    return cache, buffers


def test_the_compiled_step_equals_the_eager_step_exactly_and_the_growing_cache_in_float64():
    """float64, three tokens: the traced step equals the same step run eagerly bit for bit, and
    the fixed-capacity step (masked unfilled positions) equals the growing cache's context
    extension and thinking to 1e-12."""
    model = _model("adaln").double()
    options = graph_decoding.graph_step_options(model, InferenceOptions(langevin_noise=0.0))
    schedule = [0, 0, 1, 1]
    prefix = torch.tensor([[1, 2, 3]]).expand(2, -1)  # (L, T)
    cache, eager_buffers = _static_state(model, prefix, 8 + model.offset)
    _, traced_buffers = _static_state(model, prefix, 8 + model.offset)
    compiled = torch.compile(graph_decoding.decoding_step, fullgraph=True, backend="aot_eager")
    for token in (4, 5, 6):
        tokens = torch.tensor([[token]]).expand(2, 1)  # (L, 1)
        position = torch.tensor([cache.length])
        init = torch.randn(1, 1, 20, dtype=torch.float64)
        args = (tokens, position, init, schedule, options)
        eager = graph_decoding.decoding_step(model, eager_buffers, cache.condition, *args)
        traced = compiled(model, traced_buffers, cache.condition, *args)
        assert all(torch.equal(a, b) for a, b in zip(traced, eager, strict=True))
        cache = model.extend_context(cache, tokens)  # the growing cache
        row = position + 1 - model.offset
        caches = {lv: cache.select(slice(lv, lv + 1), lv) for lv in (0, 1)}
        trajectory = model.think(None, init, steps=2, rows=row, caches=caches, langevin_noise=0.0)
        expected = (trajectory.states[-1][:, -1], trajectory.energies[-1][0, -1:])
        torch.testing.assert_close(eager, expected, rtol=1e-12, atol=1e-12)


def test_a_graph_break_in_the_decoding_step_is_one_line_naming_graphs(monkeypatch):
    """fullgraph=True: a step that does not trace as one graph is an error naming --graphs,
    not a silent slowdown (planted: a graph break in the context extension)."""
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile([]))

    def breaking(*args, **kwargs):
        torch._dynamo.graph_break()
        return extend_context_by_one(*args, **kwargs)

    monkeypatch.setattr(graph_decoding, "extend_context_by_one", breaking)
    model = _model("pred_step")
    with pytest.raises(ConfigError, match="--graphs: the decoding step does not trace"):
        _generate(model, True, InferenceOptions(langevin_noise=0.0), count=3)


def test_the_fused_prediction_route_gives_way_inside_the_traced_step(monkeypatch):
    """Where the fused prediction attention would run (CUDA by default; forced here), the
    traced step takes the explicit route (the fused backward asks autograd, which does not
    trace) and still gives the eager fused path's tokens."""
    monkeypatch.setattr(graph_decoding.torch, "compile", aot_eager_compile([]))
    monkeypatch.setattr("ebt.nn.attention.FUSED_PREDICTION_ATTENTION", "any")
    model = _model("time_embed")
    thinking = InferenceOptions(langevin_noise=0.0)
    eager = _generate(model, False, thinking, count=6)
    graphs = _generate(model, True, thinking, count=6)
    assert graphs[0] == eager[0]
    torch.testing.assert_close(graphs[1], eager[1], rtol=1e-5, atol=1e-5)


def test_graphs_do_not_combine_with_adaptive_halting():
    sampling = Sampling(steps=2, graphs=True, halt_tolerance=0.1)
    with pytest.raises(ConfigError, match="--halt-tolerance"):
        list(generate_ids(_model("pred_step"), [1, 2], 2, 8, sampling))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ebt", "transformer_pp"])
def test_cuda_graph_generation_equals_eager_cached_generation_on_cuda(kind):
    """mode="reduce-overhead": the step replays as a CUDA graph (inductor, explicit prediction
    attention) and gives the eager cached path's greedy tokens across window restarts."""
    model = _model("time_embed", kind=kind).cuda()
    thinking = InferenceOptions(langevin_noise=0.0)
    eager = _generate(model, False, thinking, count=20)
    graphs = _generate(model, True, thinking, count=20)
    assert graphs[0] == eager[0]
    if kind == "ebt":
        torch.testing.assert_close(graphs[1], eager[1], rtol=1e-3, atol=1e-3)
