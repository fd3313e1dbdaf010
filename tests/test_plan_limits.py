"""A careless or hostile plan is a named refusal, never a traceback or an out-of-memory kill:
`Plan` checks every field when made (`plan.py`), `resolve_spec` applies the spec limits
(nesting, layers, parameters, integer sizes), `check_wire` the wire's largest body at each
cut, `check_stage_memory` a trainer's budget, and `clicooper plan` / `clicooper run`'s
pre-flight report these as one line. No live runs: every case is a unit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clicooper_bus.config import MAX_BATCH_SIZE, load_config
from clicooper_bus.errors import ConfigError, RosterError
from clicooper_bus.ml.models import (
    MAX_INT_PARAM,
    MAX_PARAMS,
    build_segment,
    build_segments,
    check_stage_memory,
    check_wire,
    configured_split,
    default_cuts,
    model_spec,
    plan_spec,
    resolve_spec,
    stage_memory,
)
from clicooper_bus.net.wire import DEFAULT_LIMITS
from clicooper_bus.plan import MAX_LAYERS, MAX_NESTING, MAX_PLAN_BYTES, Plan
from clicooper_bus.tools.cli import main
from clicooper_bus.tools.run import check_model

F, C = {"op": "flatten"}, {"op": "linear", "out": "classes"}
CONV = {"op": "conv2d", "out": 4, "kernel": 3}


def nest(n: int) -> dict:
    """`n` residuals inside one another around a relu."""
    inner: dict = {"op": "relu"}
    for _ in range(n):
        inner = {"op": "residual", "body": [inner]}
    return inner


def small_plan_doc(**fields) -> dict:
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    doc = json.loads(Plan("small-cnn", (1, 28, 28), 10, default_cuts(spec, 2), 0, 0.01, 64,
                          layers=spec.layers).to_meta())
    doc.update(fields)
    return doc


# --- Plan: every field typed and in range -------------------------------------------------------

def test_a_good_plan_round_trips():
    doc = small_plan_doc()
    plan = Plan.from_meta(json.dumps(doc))
    assert Plan.from_meta(plan.to_meta()) == plan and plan.cuts == tuple(doc["cuts"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"batch_size": 10**9}, f"batch_size = 1000000000 is outside 1..{MAX_BATCH_SIZE}"),
    ({"batch_size": -1}, "batch_size = -1 is outside"),
    ({"batch_size": 0}, "batch_size = 0 is outside"),
    ({"batch_size": 64.0}, "batch_size must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"seed": 2**70}, "seed = 1180591620717411303424 is outside 0..18446744073709551615"),
    ({"seed": -1}, "seed = -1 is outside"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0, got inf"),
    ({"lr": -1.0}, "lr must be a finite number >= 0, got -1.0"),
    ({"lr": "0.1"}, "lr must be a finite number"),
    ({"cuts": [2, 1]}, "cuts [2, 1] must be 1 to 8 strictly increasing"),
    ({"cuts": [3, 3]}, "strictly increasing"),
    ({"cuts": []}, "cuts [] must be 1 to 8"),
    ({"cuts": [0]}, "cuts[0] = 0 is outside"),
    ({"cuts": [1, 99]}, "cuts [1, 99] do not fit a model of 10 layers"),
    ({"cuts": [3, 7], "tail": 7}, "tail = 7 (the owner's tail) must come after the last cut 7"),
    ({"tail": 50}, "tail = 50 (the owner's tail) must be a layer index of the model's 10"),
    ({"cuts": [3, 6], "tail": 6}, "must come after the last cut 6"),
    ({"classes": 0}, "classes = 0 is outside 1.."),
    ({"outputs": 15}, "outputs = 15 must be 0 or a multiple of classes (10)"),
    ({"outputs": 5}, "outputs = 5 must be 0 or a multiple of classes (10)"),
    ({"input_shape": [1, 1, 28, 28]}, "input_shape must be C, H, W (3 sides), got [1, 1, 28"),
    ({"input_shape": [1, 0, 28]}, "input_shape[1] = 0 is outside"),
    ({"model": ["a"]}, "model must be a name of 1 to 256 characters"),
    ({"model": ""}, "model must be a name"),
    ({"in_flight": 9}, "in_flight = 9 is outside 1..8"),
    ({"layers": "abc"}, "layers must be a list of layer tables, got str"),
    ({"layers": [1]}, "layer 0 must be a table with a string op"),
    ({"layers": [F, {"op": "residual", "body": "x"}, C]}, "layer 1's body must be a list"),
    ({"layers": [F, nest(MAX_NESTING + 1), C]}, f"nests residuals more than {MAX_NESTING} deep"),
    ({"layers": [F, nest(150), C]}, f"nests residuals more than {MAX_NESTING} deep"),
    ({"layers": [{"op": "relu"}] * (MAX_LAYERS + 1)}, f"more than {MAX_LAYERS} layers in all"),
    ({"extra": 1}, "unknown field(s) extra"),
])
def test_a_plan_field_out_of_range_is_a_named_refusal(fields, message):
    with pytest.raises(RosterError) as err:
        Plan.from_meta(json.dumps(small_plan_doc(**fields)))
    assert message in str(err.value)
    # the owner building such a plan is refused the same way (one place: Plan.check)
    doc = small_plan_doc(**fields)
    if "extra" not in doc:
        with pytest.raises(RosterError, match="roster plan"):
            Plan(**doc)


def test_a_plan_that_is_not_json_or_too_big_or_too_deep_is_refused():
    cases = {
        "[" * 3000 + "]" * 3000: "its JSON nests too deep",
        "{" + '"a": ' * 10: "roster plan is malformed",
        "[1, 2]": "a JSON object expected, got list",
        " " * (MAX_PLAN_BYTES + 1): f"over the limit of {MAX_PLAN_BYTES:,}",
        json.dumps({"model": "x"}): "lacks field(s) input_shape, classes, cuts",
    }
    deep = json.dumps(small_plan_doc()).replace(
        '{"op": "relu"}', '{"op": "residual", "body": [' * 3000 + '{"op": "relu"}' + "]}" * 3000,
        1)
    cases[deep] = "its JSON nests too deep"
    for text, message in cases.items():
        with pytest.raises(RosterError) as err:
            Plan.from_meta(text)
        assert message in str(err.value), (text[:40], str(err.value))


def test_a_plan_has_one_cut_per_stage_of_its_roster():
    plan = Plan.from_meta(json.dumps(small_plan_doc(cuts=[3])))
    plan.check_stages(1)
    with pytest.raises(RosterError, match=r"1 cut\(s\) \[3\] for 2 trainer stage\(s\)"):
        plan.check_stages(2)


def test_a_run_config_cannot_ask_for_a_batch_a_trainer_refuses():
    with pytest.raises(ConfigError, match=rf"\[run\] batch_size: must be at most {MAX_BATCH_SIZE}"):
        load_config(None, {"run": {"batch_size": 100_000_000}})


# --- spec limits ----------------------------------------------------------------------------

@pytest.mark.parametrize(("layers", "message"), [
    ([F, {"op": "linear", "out": 2**63}, C],
     f"layer 1 (linear): out must be an integer in 1..{MAX_INT_PARAM} or \"classes\", got "
     f"{2**63}"),
    ([{"op": "conv2d", "out": 4, "kernel": 2**62, "padding": 2**62}, F, C],
     "kernel must be an integer in 1.."),
    ([{"op": "groupnorm", "groups": 1, "eps": float("inf")}, F, C],
     "eps must be a finite number > 0, got inf"),
    ([F, nest(MAX_NESTING + 1), C], f"residuals nest more than {MAX_NESTING} deep here"),
    ([{"op": "relu"}] * MAX_LAYERS + [F, C], f"the model has more than {MAX_LAYERS} layers"),
    ([F, {"op": "linear", "out": 2**20}, {"op": "relu"}, C],
     f"has 833,617,930 parameters, over the limit of {MAX_PARAMS:,}; its largest layer is "
     f"layer 1 (linear, 823,132,160 parameters)"),
])
def test_a_spec_over_the_limits_is_a_config_error(layers, message):
    with pytest.raises(ConfigError) as err:
        resolve_spec("x", layers, (1, 28, 28), 10, 1)
    assert message in str(err.value)


def test_nesting_up_to_the_limit_resolves_and_runs():
    spec = resolve_spec("x", [F, nest(MAX_NESTING), C], (1, 28, 28), 10, 1)
    segs = build_segments(spec, (1,), 0)
    out = segs[1](segs[0](torch.zeros(2, 1, 28, 28)))
    assert out.shape == (2, 10)


def test_activations_too_large_for_the_wire_are_refused_before_the_run():
    layers = [{"op": "conv2d", "out": 512, "kernel": 3, "padding": 1}, {"op": "relu"},
              {"op": "adaptive_avgpool"}, F, C]
    cfg = load_config(None, {"data": {"name": "synthetic"}, "run": {"batch_size": 128},
                             "model": {"name": "custom", "layers": layers, "cuts": [1, 2]}})
    with pytest.raises(ConfigError) as err:
        configured_split(cfg, (1, 28, 28), 10)
    limit = DEFAULT_LIMITS.max_body
    msg = str(err.value)
    assert msg.startswith("[model] on 1x28x28 images, 10 outputs: at the cut before layer 1 "
                          "(relu) a batch of 128 activations of 512x28x28 is 205,520,896 bytes")
    assert f"over the wire's limit of {limit:,} bytes" in msg
    assert f"batch_size <= {limit // (512 * 28 * 28 * 4)}" in msg and "(layers 3, 4)" in msg
    # a batch that fits passes
    cfg.run.batch_size = limit // (512 * 28 * 28 * 4)
    configured_split(cfg, (1, 28, 28), 10)


def test_a_plan_whose_activations_do_not_fit_the_wire_is_refused_by_plan_spec():
    layers = resolve_spec("x", [{"op": "conv2d", "out": 64, "kernel": 3, "padding": 1}, F, C],
                          (3, 64, 64), 10, 1).layers
    plan = Plan("x", (3, 64, 64), 10, (1,), 0, 0.01, 4096, layers=layers)
    with pytest.raises(ConfigError, match="at the cut before layer 1 .flatten. a batch of 4096"):
        plan_spec(plan)
    check_wire(plan_spec(Plan("x", (3, 64, 64), 10, (1,), 0, 0.01, 64, layers=layers)),
               (1,), 64)


def test_clicooper_run_preflight_and_clicooper_plan_report_a_deep_spec_in_one_line(
        tmp_path, capsys):
    body = "{ op = \"relu\" }"
    for _ in range(150):
        body = f"{{ op = \"residual\", body = [{body}] }}"
    config = tmp_path / "nested.toml"
    config.write_text(f"[data]\nname = \"synthetic\"\n[model]\nname = \"deep\"\ncuts = [2, 3]\n"
                      f"layers = [{{ op = \"conv2d\", out = 4, kernel = 3 }}, {{ op = \"flatten\""
                      f" }}, {body}, {{ op = \"linear\", out = \"classes\" }}]\n")
    with pytest.raises(ConfigError, match=f"residuals nest more than {MAX_NESTING} deep"):
        check_model(load_config(config))
    assert main(["plan", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clicooper: error: [model] on 1x28x28 images, 10 outputs: layer 2.body")
    assert f"residuals nest more than {MAX_NESTING} deep" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- a trainer's budget -----------------------------------------------------------------------

def test_a_trainer_refuses_a_stage_over_its_memory_budget_before_allocating():
    layers = resolve_spec("x", [F, {"op": "linear", "out": 2**18}, {"op": "relu"}, C],
                          (1, 28, 28), 10, 1).layers
    plan = Plan("x", (1, 28, 28), 10, (1,), 0, 0.01, 64, layers=layers)
    spec = plan_spec(plan)
    with pytest.raises(RosterError) as err:
        check_stage_memory(spec, plan, 1, 2048)
    msg = str(err.value)
    assert "needs more memory than this trainer allows: stage 1 at batch_size 64" in msg
    assert "208,404,490 parameters" in msg and "trainer_memory_mb = 2048 MiB" in msg
    # the same layer in the owner's head costs a trainer of the layers after it nothing: its
    # random numbers are drawn and dropped, never allocated as a layer
    later = Plan("x", (1, 28, 28), 10, (3,), 0, 0.01, 64, layers=layers)
    need = check_stage_memory(spec, later, 1, 256)
    assert need.stage_params == 2**18 * 10 + 10 and need.model_params == 208_404_490
    assert need.skip == 4 << 20


def test_stage_memory_counts_weights_adam_and_activations():
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    cuts = default_cuts(spec, 2)
    need = stage_memory(spec, cuts, 2, 128, in_flight=2)
    bounds = (0, *cuts, len(spec.layers))
    params = sum(p.numel() for p in build_segments(spec, cuts, 0)[2].parameters())
    assert need.stage_params == params and need.weights == 16 * params
    per_sample = math.prod(spec.shapes[bounds[2]]) * 3 + 2 * sum(spec.acts[bounds[2]:])
    assert need.activations == 4 * 128 * per_sample
    assert need.total == need.weights + need.activations + need.skip + need.workspace


def test_the_preflight_refuses_a_plan_its_own_trainers_would_refuse():
    cfg = load_config(None, {"data": {"name": "synthetic"}, "model": {"name": "resnet-8"},
                             "run": {"batch_size": 512, "trainer_memory_mb": 64}})
    with pytest.raises(ConfigError, match=r"a trainer would refuse this plan: stage 1 at "
                                          r"batch_size 512 needs about .* the limit is \[run\] "
                                          r"trainer_memory_mb = 64 MiB"):
        configured_split(cfg, (3, 32, 32), 10)


def test_a_trainer_builds_only_its_stage_with_the_same_weights():
    layers = [{"op": "conv2d", "out": 8, "kernel": 3}, {"op": "groupnorm", "groups": 2},
              {"op": "residual", "body": [{"op": "conv2d", "out": 8, "kernel": 3, "padding": 1},
                                          {"op": "layernorm"}],
               "shortcut": [{"op": "conv2d", "out": 8, "kernel": 1, "bias": False}]},
              {"op": "maxpool", "kernel": 2}, F, {"op": "linear", "out": 17}, {"op": "gelu"}, C]
    spec = resolve_spec("x", layers, (3, 12, 12), 10, 1)
    cuts = (2, 3, 5)
    full = build_segments(spec, cuts, 123)
    state = torch.random.get_rng_state()
    for i in range(len(full)):
        a, b = full[i].state_dict(), build_segment(spec, cuts, 123, i).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
