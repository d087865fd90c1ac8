"""The committed ABI + bytecode are exactly what the Solidity sources compile to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from prime.chain.client import load_artifact

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts"
ARTIFACTS = ROOT / "src" / "prime" / "chain" / "artifacts"


def test_committed_artifacts_equal_a_fresh_compile(tmp_path):
    node = shutil.which("node")
    if not (CONTRACTS / "node_modules" / "solc").is_dir() or node is None:
        if not os.environ.get("CI"):
            pytest.skip("contracts/node_modules is missing (run `cd contracts && npm ci`); CI runs this check.")
        pytest.fail("CI must have node and contracts/node_modules (npm ci) to check the committed artifacts.")
    result = subprocess.run([node, str(CONTRACTS / "build.mjs"), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    committed = sorted(p.name for p in ARTIFACTS.glob("*.json"))
    fresh = sorted(p.name for p in tmp_path.glob("*.json"))
    assert committed == fresh
    for name in committed:
        assert (tmp_path / name).read_bytes() == (ARTIFACTS / name).read_bytes(), (
            f"{name} is stale: run `make artifacts` (cd contracts && npm run build) and commit the result."
        )


def test_artifact_declares_the_protocol_events_and_functions():
    artifact = load_artifact()
    names = {(item["type"], item.get("name")) for item in artifact["abi"]}
    for event in ("RunCreated", "MasterAdded", "MasterRemoved", "NodeRegistered", "NodeValidated", "NodeJoined",
                  "NodeLeft", "NodeEjected", "RunEnded", "StakeWithdrawn", "NodeSlashed"):
        assert ("event", event) in names
    for fn in ("createRun", "addMaster", "removeMaster", "endRun", "registerNode", "reportValidation", "joinRun",
               "leaveRun", "ejectNode", "withdrawStake", "slash", "getRun", "getNode", "isMaster", "nodeStatus"):
        assert ("function", fn) in names
    assert artifact["bytecode"].startswith("0x60") and len(artifact["deployedBytecode"]) > 1000
    assert json.loads(json.dumps(artifact)) == artifact
