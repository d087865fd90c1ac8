"""Pure rules of prime.chain.types: the requirement check mirrors the contract's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prime.chain.types import NodeStatus, Requirements, Specs, model_matches

SPECS = Specs(gpu_count=4, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81_559, cpu_cores=64, ram_mib=524_288, disk_gib=4_000)


def test_empty_requirements_accept_anything():
    assert Requirements().unmet_by(Specs(0, "", 0, 0, 0, 0)) is None


def test_exact_minimums_are_met():
    req = Requirements(4, "H100", 81_559, 64, 524_288, 4_000, max_nodes=2)
    assert req.unmet_by(SPECS) is None


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (dict(min_gpus=5), "The node has 4 GPU(s) but the run needs at least 5."),
        (dict(gpu_model="A100"), "The node's GPU model 'NVIDIA H100 80GB HBM3' does not match the run's required model 'A100'."),
        (dict(min_gpu_memory_mib=81_560), "The node's GPUs have 81559 MiB of memory but the run needs at least 81560 MiB per GPU."),
        (dict(min_cpu_cores=65), "The node has 64 CPU cores but the run needs at least 65."),
        (dict(min_ram_mib=524_289), "The node has 524288 MiB of RAM but the run needs at least 524289 MiB."),
        (dict(min_disk_gib=4_001), "The node has 4000 GiB of disk but the run needs at least 4001 GiB."),
    ],
)
def test_unmet_by_names_the_failing_requirement(change, sentence):
    assert replace(Requirements(), **change).unmet_by(SPECS) == sentence


def test_first_failing_requirement_wins_in_contract_order():
    req = Requirements(min_gpus=8, min_disk_gib=10**6)
    assert req.unmet_index(SPECS) == 0
    assert req.unmet_by(SPECS).startswith("The node has 4 GPU(s)")


def test_model_match_is_ascii_case_insensitive_substring():
    assert model_matches("NVIDIA H100 80GB HBM3", "h100 80gb")
    assert model_matches("anything", "")
    assert not model_matches("NVIDIA A100", "H100")
    assert not model_matches("H1", "H100")
    # Only A-Z fold, as in the contract: a non-ASCII capital stays distinct.
    assert not model_matches("É", "é")


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True])
def test_requirements_reject_values_the_contract_cannot_hold(bad):
    with pytest.raises(ValueError, match="min_gpus"):
        Requirements(min_gpus=bad)


def test_tuple_round_trip_matches_field_order():
    req = Requirements(1, "H100", 2, 3, 4, 5, 6)
    assert req.as_tuple() == (1, "H100", 2, 3, 4, 5, 6)
    assert Requirements.from_tuple(req.as_tuple()) == req
    assert Specs.from_tuple(SPECS.as_tuple()) == SPECS


def test_node_status_values_match_the_contract_enum():
    assert [s.value for s in NodeStatus] == list(range(8))
    assert [s.name for s in NodeStatus] == ["NONE", "REGISTERED", "APPROVED", "REJECTED", "ACTIVE", "LEFT", "EJECTED", "RELEASED"]
    assert {s for s in NodeStatus if s.stake_withdrawable} == {
        NodeStatus.LEFT, NodeStatus.EJECTED, NodeStatus.REJECTED, NodeStatus.RELEASED,
    }
