"""The one id -> folder rule, `files_dir_for`: properties over random ids, and known cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from osa_sdk.contract import MAX_FOLDER_NAME, bytes_to_mb, file_name_error, files_dir_for

# Any unicode text except lone surrogates, which cannot be encoded and so are no real ids.
any_id = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=400)
# Ids made of the characters the encoding itself uses, where collisions would hide.
tricky_id = st.text(st.sampled_from("_.-/:@ aZ09f%é\x00"), min_size=1, max_size=200)
ids = st.one_of(any_id, tricky_id)
BASE = Path("/batches/b1/files")


def _assert_safe(name: str) -> None:
    assert name
    assert "/" not in name and "\x00" not in name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert len(name) <= MAX_FOLDER_NAME
    # Joined to its base and normalised, the name is still one level inside the base.
    assert Path(os.path.normpath(BASE / name)).parent == BASE


@given(ids)
def test_every_name_is_a_single_safe_folder_inside_its_base(record_id: str) -> None:
    _assert_safe(files_dir_for(record_id))


@given(st.lists(ids, min_size=2, max_size=20, unique=True))
def test_different_ids_get_different_names(record_ids: list[str]) -> None:
    names = [files_dir_for(i) for i in record_ids]

    assert len(set(names)) == len(names)


@given(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=150, max_size=400),
    tricky_id,
    tricky_id,
)
def test_long_ids_sharing_a_prefix_get_different_names(
    prefix: str, tail_a: str, tail_b: str
) -> None:
    a, b = prefix + tail_a, prefix + tail_b
    assume(a != b)

    assert files_dir_for(a) != files_dir_for(b)
    _assert_safe(files_dir_for(a))


def test_the_name_is_the_same_in_every_process() -> None:
    # The engine and the hook container compute names in different processes.
    sample = ["pdb:1ABC", "a/b", "é" * 200, "x" * 300]
    script = "import json, sys; from osa_sdk import files_dir_for as f; " + (
        "print(json.dumps([f(i) for i in json.load(sys.stdin)]))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(sample),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )

    assert json.loads(child.stdout) == [files_dir_for(i) for i in sample]


@pytest.mark.parametrize(
    ("record_id", "name"),
    [
        ("pdb:1ABC", "pdb_3a1ABC"),
        ("1ABC", "1ABC"),
        ("a/b", "a_2fb"),
        ("..", "_2e."),
        (".hidden", "_2ehidden"),
        ("../../etc", "_2e._2f.._2fetc"),
        ("me@lab org", "me_40lab_20org"),
        ("_3a", "_5f3a"),
        ("é", "_c3_a9"),
        ("蛋白", "_e8_9b_8b_e7_99_bd"),
    ],
)
def test_known_ids(record_id: str, name: str) -> None:
    assert files_dir_for(record_id) == name
    _assert_safe(name)


def test_an_escaped_character_and_its_spelled_out_escape_differ() -> None:
    assert files_dir_for(":") != files_dir_for("_3a")


def test_a_300_character_id_is_shortened_with_a_hash() -> None:
    long_id = "x" * 300

    name = files_dir_for(long_id)

    assert len(name) == MAX_FOLDER_NAME
    assert name.startswith("x" * 90) and "__" in name
    assert name != files_dir_for("x" * 299)
    _assert_safe(name)


def test_a_long_id_is_never_cut_inside_an_escape() -> None:
    for pad in range(6):
        name = files_dir_for("a" * (88 + pad) + ":" * 60)
        prefix = name.rsplit("__", 1)[0]
        assert not prefix.endswith(("_", "_3")), prefix


def test_an_empty_id_is_refused() -> None:
    with pytest.raises(ValueError, match=r"record id is empty"):
        files_dir_for("")


def test_sizes_are_in_the_unit_of_memory_limits() -> None:
    # MB is 2^20 bytes for file sizes as for memory limits, so that they compare directly.
    assert bytes_to_mb(1024 * 1024) == 1.0
    assert bytes_to_mb(1_000_000) == 1_000_000 / 1_048_576


@pytest.mark.parametrize("name", ["1abc.cif", "a b.txt", ".hidden", "é.json", "x" * 255])
def test_file_names_that_are_one_component_are_accepted(name: str) -> None:
    assert file_name_error(name) is None


def test_a_file_name_that_is_not_utf8_is_refused_not_raised() -> None:
    # How a folder listing hands over the bytes of a Latin-1 name: as surrogate escapes.
    listed = os.fsdecode(b"r\xe9sum\xe9.txt")
    assert file_name_error(listed) == "is not valid UTF-8: name files in UTF-8"
