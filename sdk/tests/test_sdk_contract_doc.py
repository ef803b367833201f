"""The two example hooks of docs/contract.md, run as written against a real batch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from osa_sdk.contract import FEATURES_FILE, REJECTIONS_FILE
from sdk_test_support import Batch, run_sdk

DOC = Path(__file__).resolve().parents[2] / "docs" / "contract.md"
pytestmark = pytest.mark.skipif(not DOC.exists(), reason="docs/ is not shipped with the sdk")

# A one-chain structure at 1.9 Å, in PDB format, which gemmi reads as well as mmCIF.
PDB_TEXT = """\
REMARK   2 RESOLUTION.    1.90 ANGSTROMS.
ATOM      1  CA  GLY A   1      11.104  13.207   2.100  1.00 20.00           C
END
"""


def _example(language: str) -> str:
    [code] = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return code


@pytest.mark.skipif(
    shutil.which("jq") is None and os.environ.get("CI") != "true",
    reason="the shell example needs jq (in CI a missing jq fails this test)",
)
def test_the_shell_example_follows_the_contract(batch: Batch, tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text(_example("sh"))
    batch.write_records([{"id": "pdb:1ABC"}, {"id": "a/b c"}])
    batch.add_file("pdb:1ABC", "1abc.cif", "data_1ABC")

    proc = subprocess.run(
        ["sh", str(script)], env=batch.env(), capture_output=True, text=True, check=False
    )

    assert proc.returncode == 0, proc.stderr
    out = batch.outcomes()
    assert out[FEATURES_FILE] == [{"id": "pdb:1ABC", "features": [{"n_files": 1}]}]
    assert out[REJECTIONS_FILE] == [{"id": "a/b c", "reason": "the record has no files"}]


def test_the_sdk_example_follows_the_contract(batch: Batch, tmp_path: Path) -> None:
    pytest.importorskip("gemmi")
    (tmp_path / "my_hooks.py").write_text(_example("python"))
    batch.write_records([{"id": "pdb:1ABC"}, {"id": "pdb:2XYZ"}])
    batch.write_config({"max_resolution": 2.0})
    batch.add_file("pdb:1ABC", "1abc.pdb", PDB_TEXT)
    batch.add_file("pdb:2XYZ", "2xyz.pdb", PDB_TEXT.replace("1.90", "2.50"))
    env = batch.env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"

    proc = run_sdk("hook", "my_hooks:resolution_check", env=env)

    assert proc.returncode == 0, proc.stderr
    out = batch.outcomes()
    assert out[FEATURES_FILE] == [
        {"id": "pdb:1ABC", "features": [{"resolution": 1.9, "n_chains": 1}]}
    ]
    assert out[REJECTIONS_FILE] == [
        {"id": "pdb:2XYZ", "reason": "resolution 2.5 Å is above the limit"}
    ]
