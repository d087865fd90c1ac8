"""`prime validator start --gpu-classes FILE`: the GPU table extended from JSON or TOML (issue 12).

The parser is strict (one sentence per error), entries add to the built-in table or replace a
model of the same name, matching takes the longest pattern, and the process-wide table reaches
the claim check and the planner. The option against a real validator process is in
tests/roles/validator/test_gpu_claims.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from prime.challenge.classes import (
    GPU_MODELS,
    GpuClassError,
    check_claim,
    extended_table,
    find_model,
    gpu_table,
    load_gpu_classes,
    parse_gpu_classes,
    use_gpu_table,
)
from prime.challenge.params import plan_challenge
from tests.fixtures.processes import prime_command

TOML = """
[[gpu]]
name = "RTX 5090"
patterns = ["5090"]
variants = [{ memory_mib = 32607, fp32 = 104.8, fp16 = 209.5, label = "32 GB" }]

[[gpu]]
name = "H100"
variants = [{ memory_mib = 81559, fp32 = 67, fp16 = 989 }]
"""


def model(**fields) -> dict:
    entry = {"name": "X1", "variants": [{"memory_mib": 16384, "fp32": 10, "fp16": 40}]}
    entry.update(fields)
    return {"gpu": [entry]}


def claim(name: str, memory: int, count: int = 1) -> dict:
    return {"gpu_count": count, "gpu_model": name, "gpu_memory_mib": memory, "cpu_cores": 8, "ram_mib": 65536}


@pytest.fixture
def restore_table() -> Iterator[None]:
    yield
    use_gpu_table(GPU_MODELS)


def test_toml_and_json_files_define_the_same_models(tmp_path: Path) -> None:
    from_toml = parse_gpu_classes(TOML, fmt="toml")
    data = {"gpu": [{"name": "RTX 5090", "patterns": ["5090"],
                     "variants": [{"memory_mib": 32607, "fp32": 104.8, "fp16": 209.5, "label": "32 GB"}]},
                    {"name": "H100", "variants": [{"memory_mib": 81559, "fp32": 67, "fp16": 989}]}]}
    (tmp_path / "classes.json").write_text(json.dumps(data))
    (tmp_path / "classes.toml").write_text(TOML)
    assert load_gpu_classes(tmp_path / "classes.json") == from_toml == load_gpu_classes(tmp_path / "classes.toml")
    assert from_toml[0].patterns == ("5090",) and from_toml[1].patterns == ("H100",)  # default: the name, upper case
    assert from_toml[0].variants[0].fp16 == 209.5


def test_entries_add_to_the_built_in_table_or_replace_a_model_of_the_same_name() -> None:
    table = extended_table(parse_gpu_classes(TOML, fmt="toml"))
    assert len(table) == len(GPU_MODELS) + 1
    assert find_model("NVIDIA GeForce RTX 5090", table).name == "RTX 5090"
    h100 = find_model("NVIDIA H100 80GB HBM3", table)
    assert h100.variants[0].fp16 == 989 and len(h100.variants) == 1  # replaced, not merged
    assert find_model("NVIDIA H100 80GB HBM3").variants[0].fp16 == 756  # the built-in table is untouched
    assert check_claim(claim("RTX 5090", 32607), table) is None
    assert "not in the validator's table" in check_claim(claim("RTX 5090", 32607))
    assert "but a H100 has 81559 MiB" in check_claim(claim("H100 NVL", 95830), table)  # the NVL variant is gone


def test_the_longest_pattern_wins_whatever_the_order() -> None:
    # "H20" listed first must not take H200 claims (first match would); H20 claims still find it
    table = extended_table(parse_gpu_classes(json.dumps(model(name="H20", variants=[
        {"memory_mib": 97871, "fp32": 44, "fp16": 148}])), fmt="json"))
    assert table[0].name == "H20"
    assert find_model("NVIDIA H200 NVL", table).name == "H200"
    assert find_model("NVIDIA H20", table).name == "H20"
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA A10G", "NVIDIA A10", "NVIDIA L40S", "NVIDIA L40", "NVIDIA L4"):
        assert find_model(name).name == name.split()[-1].split("-")[0]


@pytest.mark.parametrize("data, words", [
    ("[1]", "must be a table"),
    ('{"gpus": []}', "unknown key(s) gpus"),
    ('{"gpu": []}', "list of 1 to 256"),
    (json.dumps(model(name="")), "name must be a non-empty string"),
    (json.dumps(model(colour="red")), "unknown key(s) colour"),
    (json.dumps(model(variants=[])), "variants must be a non-empty list"),
    (json.dumps(model(patterns="X1")), "patterns must be a non-empty list"),
    (json.dumps(model(variants=[{"memory_mib": 16384, "fp32": 10}])), "lacks fp16"),
    (json.dumps(model(variants=[{"memory_mib": 16384, "fp32": 10, "fp16": 0}])), "fp16 (TFLOP/s) must be a number above 0"),
    (json.dumps(model(variants=[{"memory_mib": 16384, "fp32": True, "fp16": 1}])), "fp32 (TFLOP/s) must be a number"),
    (json.dumps(model(variants=[{"memory_mib": 1.5e4, "fp32": 1, "fp16": 1}])), "memory_mib (MiB per GPU) must be an integer"),
    (json.dumps(model(variants=[{"memory_mib": 16384, "fp32": 1, "fp16": 1},
                                {"memory_mib": 16000, "fp32": 2, "fp16": 2}])), "within 4% of each other"),
    (json.dumps({"gpu": [model()["gpu"][0], model()["gpu"][0]]}), "defines the model 'X1' twice"),
    ("{", "is not valid JSON"),
])
def test_a_bad_file_is_refused_with_one_sentence(data: str, words: str) -> None:
    with pytest.raises(GpuClassError) as raised:
        parse_gpu_classes(data, fmt="json")
    message = str(raised.value)
    assert words in message, message
    assert "\n" not in message


def test_a_pattern_two_models_share_is_refused() -> None:
    with pytest.raises(GpuClassError, match="'X1' and 'H100' both have the pattern 'H100'"):
        extended_table(parse_gpu_classes(json.dumps(model(patterns=["H100"])), fmt="json"))


def test_a_file_must_be_json_or_toml_and_readable(tmp_path: Path) -> None:
    (tmp_path / "classes.yaml").write_text("gpu: []")
    with pytest.raises(GpuClassError, match=r"must end in \.json or \.toml"):
        load_gpu_classes(tmp_path / "classes.yaml")
    with pytest.raises(GpuClassError, match="cannot read"):
        load_gpu_classes(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("[[gpu]\n")
    with pytest.raises(GpuClassError, match="is not valid TOML"):
        load_gpu_classes(tmp_path / "bad.toml")


def test_the_process_table_reaches_the_claim_check_and_the_planner(restore_table) -> None:
    sim = parse_gpu_classes(json.dumps(model(name="CPUSIM", variants=[
        {"memory_mib": 8192, "fp32": 0.005, "fp16": 0.01}])), fmt="json")
    assert "not in the validator's table" in check_claim(claim("CPUSIM", 8192))
    use_gpu_table(extended_table(sim))
    assert gpu_table()[0].name == "CPUSIM"
    assert check_claim(claim("CPUSIM", 8192)) is None
    plan = plan_challenge(claim("CPUSIM", 8192))
    assert plan.params.dtype == "float16" and plan.notes["class"] == "1×CPUSIM 8192 MiB"
    assert 0.9 * 1.8e10 <= plan.params.flops <= 1.5 * 1.8e10  # 3 s at 60 % of 10 GFLOP/s
    use_gpu_table(GPU_MODELS)
    assert check_claim(claim("CPUSIM", 8192)) is not None
    with pytest.raises(ValueError):
        use_gpu_table(())


def test_validator_start_refuses_a_bad_file_with_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "classes.json").write_text(json.dumps(model(variants=[{"memory_mib": 1, "fp32": 1, "fp16": -2}])))
    result = subprocess.run(prime_command("validator", "start", "--deployment", str(tmp_path / "deployment.json"),
                                          "--gpu-classes", str(tmp_path / "classes.json")),
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "fp16 (TFLOP/s) must be a number above 0" in lines[0], lines
    assert "start without --gpu-classes" in lines[0]
