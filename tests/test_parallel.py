from __future__ import annotations

import os
from pathlib import Path

import pytest

from medxfer.errors import MedxferError
from medxfer.parallel import fresh_context, process_map


def test_workers_are_never_a_fork_of_this_process() -> None:
    assert fresh_context().get_start_method() in {"forkserver", "spawn"}


def test_process_map_keeps_order_and_the_working_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)  # a fork server started elsewhere: workers still resolve here
    names = [f"f{i}" for i in range(50)]
    got = list(process_map(os.path.abspath, names, 2, chunksize=3))
    assert got == [str(tmp_path / n) for n in names]


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    with pytest.raises(MedxferError, match="a decoding process died"):
        list(process_map(os._exit, [1, 1], 2, what="decoding"))
