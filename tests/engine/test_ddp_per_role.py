"""One DDP per role under 2 gloo processes (``engine/distributed/replication.py``).

One spawn runs every scenario of ``tests/engine/ddp_worker.py``; the tests read what the ranks
recorded. The guarantees: before every optimiser step each role's gradient equals the explicit
average over the ranks of the role's isolated local gradient; parameters are bitwise equal on
the ranks after every window; a role switched off by its flag does not move; a parameter no
rank's loss reaches keeps no gradient; each role has its own DDP (never one around several
roles, never ``static_graph``); and 2 ranks equal one process on the global batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.distributed.collectives import World
from tests.engine import ddp_worker as worker

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return worker.spawn(tmp_path_factory.mktemp("ddp-per-role"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_each_role_steps_on_the_average_of_the_ranks_isolated_gradients(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for rank in ranks:
        result = rank[name]
        assert result["errors"], "no optimiser step was checked"
        worst = max(result["errors"], key=lambda entry: entry[2])
        assert worst[2] <= TOLERANCE, f"window {worst[0]}, role {worst[1]}: error {worst[2]}"
    # Every role stepped in the windows its schedule and flags allow, on both ranks alike.
    assert [e[:2] for e in ranks[0][name]["errors"]] == [e[:2] for e in ranks[1][name]["errors"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_parameters_are_bitwise_equal_on_the_ranks_after_every_window(
    ranks: list[dict[str, Any]], name: str
) -> None:
    first, second = ranks[0][name], ranks[1][name]
    assert len(first["digests"]) == worker.WINDOWS
    assert first["digests"] == second["digests"]
    for key, value in first["params"].items():
        assert torch.equal(value, second["params"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_every_role_has_its_own_ddp_without_static_graph(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for rank in ranks:
        result = rank[name]
        owners: dict[str, str] = {}
        for role, facts in result["replicas"].items():
            assert facts["built"], f"{role} trained without its DDP"
            assert facts["params"] == result["names"][role], role  # exactly this role's
            assert facts["static_graph"] is False
            assert facts["gradient_as_bucket_view"] is True
            assert facts["forward_sync_buffers"] is False
            for param in facts["params"]:
                assert param not in owners, f"{param} in the DDPs of {owners.get(param)}, {role}"
                owners[param] = role


@pytest.mark.slow
def test_find_unused_parameters_only_where_a_loss_misses_parameters(
    ranks: list[dict[str, Any]],
) -> None:
    for rank, result in enumerate(ranks):
        for name, scenario in worker.SCENARIOS.items():
            for role, facts in result[name]["replicas"].items():
                misses = scenario.spare_on_rank_one and role in ("model", "generator")
                assert facts["find_unused"] is misses, (name, role)
        unused = result["unused parameters"]["replicas"]["model"]
        # Rank 0 uses neither ``spare`` nor ``never``; rank 1 uses ``spare``.
        assert unused["unreached"] == (["spare", "never"] if rank == 0 else ["never"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unused parameters", "unused parameters with accumulation"])
def test_a_parameter_no_rank_uses_keeps_no_gradient_and_does_not_move(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for rank in ranks:
        result = rank[name]
        # With momentum and weight decay, a zero gradient would have moved ``never``.
        assert torch.equal(result["params"]["never"], torch.ones(worker.FEATURES))
        assert not torch.equal(result["params"]["spare"], torch.ones(worker.FEATURES))
        missing = {tuple(entry[2]) for entry in result["grads_none"]}
        assert missing == {("never",)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "window", "role"),
    [
        ("flag off on one rank", 1, "discriminator"),
        ("flag off on one rank", 2, "decoder"),
        ("flag off two-phase", 1, "discriminator"),
        ("flag off two-phase", 2, "generator"),
    ],
)
def test_a_role_switched_off_on_one_rank_moves_on_none(
    ranks: list[dict[str, Any]], name: str, window: int, role: str
) -> None:
    for rank in ranks:
        moved = rank[name]["moved"]
        assert moved[window][role] is False
        assert all(moved[window][other] for other in moved[window] if other != role)
        assert (window, role) not in [entry[:2] for entry in rank[name]["errors"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [name for name, scenario in worker.SCENARIOS.items() if scenario.comparable]
)
def test_two_ranks_equal_one_process_with_the_global_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    alone = worker.run_scenario(name, World())
    for key, value in alone["params"].items():
        torch.testing.assert_close(ranks[0][name]["params"][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "roles", "skipped"),
    [
        ("flag off on the last micro-batch", {"decoder"}, 0),
        ("non-finite last micro-batch skipped", {"generator", "discriminator"}, 1),
    ],
)
def test_a_window_ending_with_local_gradients_is_averaged_before_the_step(
    ranks: list[dict[str, Any]], name: str, roles: set[str], skipped: int
) -> None:
    """The window's last micro-batch did not back-propagate into ``roles`` (a flag off, or a
    non-finite loss skipped, on rank 1 only, agreed by both): their earlier micro-batches'
    gradients were local, and are averaged explicitly before the step (the checks of
    ``test_each_role_steps_on_the_average_of_the_ranks_isolated_gradients`` cover the values)."""
    for rank in ranks:
        assert {role for role, count in rank[name]["fallbacks"].items() if count} == roles
        assert all(count <= 1 for count in rank[name]["fallbacks"].values())
        assert rank[name]["skipped"] == skipped
