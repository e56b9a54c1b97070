"""FSDP2 per role and block under 2 gloo processes (``engine/distributed/sharding.py``), and
its refusals in one process.

One spawn runs every case of ``tests/engine/fsdp_worker.py`` under FSDP2 and under DDP per
role. The guarantees: before every optimiser step each role's gradient equals the explicit
average over the ranks of its isolated local gradient (isolation is exact although
``backward(inputs=)`` can not reach shards); the ranks' full parameters agree after every
window; FSDP2's trajectory equals DDP's; each rank holds about half of DDP's bytes for
parameters, gradients and Adam state.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from engine.distributed.collectives import World
from engine.distributed.sharding import ShardingPlan, shard_model
from engine.errors import ConfigError, DistributedError
from tests.engine import fsdp_worker as worker

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return worker.spawn(tmp_path_factory.mktemp("fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.CASES))
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_each_role_steps_on_the_average_of_the_ranks_isolated_gradients(
    ranks: list[dict[str, Any]], name: str, mode: str
) -> None:
    for rank in ranks:
        result = rank[name][mode]
        assert result["errors"]
        worst = max(result["errors"], key=lambda entry: entry[2])
        assert worst[2] <= TOLERANCE, f"window {worst[0]}, role {worst[1]}: error {worst[2]}"
    first, second = ranks[0][name][mode], ranks[1][name][mode]
    assert first["digests"] == second["digests"]
    assert [e[:2] for e in first["errors"]] == [e[:2] for e in second["errors"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.CASES))
def test_the_model_is_sharded_and_fsdp_follows_ddps_trajectory(
    ranks: list[dict[str, Any]], name: str
) -> None:
    fsdp, ddp = ranks[0][name]["fsdp"], ranks[0][name]["ddp"]
    assert fsdp["sharded"] and not ddp["sharded"]
    assert fsdp["units"] >= 3  # at least generator's root, encoder/decoder, discriminator
    assert [e[:2] for e in fsdp["errors"]] == [e[:2] for e in ddp["errors"]]
    for key, value in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_bf16_parameters_with_fp32_reduction_train_close_to_fp32(
    ranks: list[dict[str, Any]],
) -> None:
    bf16, fp32 = ranks[0]["bf16"], ranks[0]["one forward"]["fsdp"]
    assert ranks[0]["bf16"]["digests"] == ranks[1]["bf16"]["digests"]
    for key, value in fp32["params"].items():
        assert bf16["params"][key].dtype == torch.float32  # the sharded master weights
        torch.testing.assert_close(bf16["params"][key], value, rtol=0.05, atol=0.02, msg=key)
    assert any(not torch.equal(bf16["params"][k], v) for k, v in fp32["params"].items())


@pytest.mark.slow
def test_each_rank_holds_about_half_of_ddps_training_bytes(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        fsdp, ddp = rank["memory"]["fsdp"], rank["memory"]["ddp"]
        assert ddp["parameters"] == 4 * 4 * (64 * 64 + 64)
        ratio = sum(fsdp.values()) / sum(ddp.values())
        assert ratio <= 0.6, (fsdp, ddp)
        assert math.isclose(ratio, 0.5, abs_tol=0.01)


@pytest.mark.slow
def test_a_roles_backward_reduce_scatters_only_its_own_units(ranks: list[dict[str, Any]]) -> None:
    """Isolation costs no compute or communication for the other roles: the backward goes into
    the role's unsharded parameters (the earlier plain backward reduce-scattered all 6 units in
    each role's backward and dropped the other role's share)."""
    for rank in ranks:
        assert rank["reduced units"] == {"generator": 4, "discriminator": 2}


@pytest.mark.slow
def test_under_bf16_a_role_frozen_in_the_first_forward_trains_once_unfrozen(
    ranks: list[dict[str, Any]],
) -> None:
    """FSDP2 takes each unit's mixed-precision dtypes from its parameters that require grad at
    its initialisation: at the first forward, where a frozen discriminator's unit got none and
    its bf16 gradients later failed to land on the fp32 shards. ``shard_model`` initialises
    FSDP2 itself: the frozen run's gradients are the never-frozen run's, bitwise, in fp32."""
    for rank in ranks:
        frozen, never = rank["frozen first"][True], rank["frozen first"][False]
        assert "error" not in frozen, frozen["error"]
        assert "error" not in never, never["error"]
        assert {k.split(".")[0] for k in frozen["grads"]} == {"encoder", "decoder", "discriminator"}
        assert frozen["grads"].keys() == never["grads"].keys()
        for key, grad in frozen["grads"].items():
            assert grad.dtype == torch.float32, key
            assert torch.equal(grad, never["grads"][key]), key


@pytest.mark.slow
def test_the_isolated_backward_refuses_sharded_parameters_instead_of_giving_no_gradient(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        assert "'discriminator' are FSDP2 shards" in rank["refusal"]
        assert "sharded_backward" in rank["refusal"]


# ----------------------------------------------------------- one process


def test_fsdp_in_one_process_is_refused_naming_the_launcher() -> None:
    with pytest.raises(DistributedError, match="torchrun"):
        shard_model(nn.Linear(2, 2), ShardingPlan(), World(), torch.device("cpu"))


def test_a_mesh_that_does_not_cover_the_world_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"mesh \(3,\) has 3 ranks but the world has 2"):
        shard_model(nn.Linear(2, 2), ShardingPlan(mesh=(3,)), World(0, 2, 0), torch.device("cpu"))


@pytest.mark.parametrize(
    ("plan", "named"),
    [
        (ShardingPlan(forward_methods=("sample",)), "no method 'sample'"),
        (ShardingPlan(forward_methods=("decoder.logits",)), "no method 'logits' at decoder"),
        (ShardingPlan(blocks=("ResBlock",)), r"\['ResBlock'\] name no module class"),
    ],
)
def test_what_the_plan_names_and_the_model_lacks_is_refused_before_sharding(
    plan: ShardingPlan, named: str
) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=named):
        shard_model(model, plan, World(0, 2, 0), torch.device("cpu"))
    assert not isinstance(model[0].weight, torch.distributed.tensor.DTensor)


@pytest.mark.parametrize(
    "values",
    [{"mesh": (0,)}, {"mesh": (1, 2, 1)}, {"blocks": "Linear"}, {"param_dtype": "fp8"}],
)
def test_bad_plans_are_refused_at_construction(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ShardingPlan(**values)
