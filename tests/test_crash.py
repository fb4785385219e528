"""SIGKILL a real `imgindex build` process at chosen moments of its writes, then check that the
index opens, that its FAISS vectors and SQLite rows agree one to one, and that a re-run finishes
the job without re-embedding what was committed and without duplicates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgindex.store import Store

from .conftest import DATA, ROOT, random_image

N_IMAGES = 40
BATCH = 4


def start(index: Path, folder: Path, point: str, nth: int, *extra: str, real: bool = False):
    args = [sys.executable, "-m", "tests.crash_helper"]
    if real:
        args.append("--real")
    args += [point, str(nth), "--", "build", str(folder), "--index", str(index)]
    args += ["--batch-size", str(BATCH), "--workers", "2", "--json", *extra]
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill_at(index: Path, folder: Path, point: str, nth: int, real: bool = False) -> None:
    child = start(index, folder, point, nth, real=real)
    line = child.stdout.readline()
    if not line.startswith("PAUSED"):
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"child did not pause at {point}: {line}{out}{err}")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def run_to_end(index: Path, folder: Path, *extra: str, real: bool = False) -> dict:
    child = start(index, folder, "none", 0, *extra, real=real)
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    return json.loads(out)


def assert_consistent(index: Path, files_may_be_missing: bool = False) -> int:
    """The index opens; FAISS and SQLite hold the same ids and vectors; no duplicate paths."""
    store = Store.open(index)
    try:
        ids, stored = store.all_vectors()
        assert store.vector_index.ntotal == store.count() == len(ids)
        if len(ids):
            np.testing.assert_array_equal(store.vector_index.reconstruct(ids), stored)
        paths = [r.path for r in store.records()]
        assert len(paths) == len(set(paths))
        report = store.check()
        assert report.problems == [], report
        assert files_may_be_missing or report.missing_files == [], report
        return store.count()
    finally:
        store.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """40 small images, all the same size so that every batch is full (4 per commit)."""
    for i in range(N_IMAGES):
        random_image(tmp_path / "images" / f"{i:03d}.png", size=(40, 30), seed=i)
    return tmp_path / "images"


# (moment, which occurrence): the first batch, the middle of the build, and the FAISS write.
KILL_POINTS = [
    ("before-commit", 1),
    ("in-transaction", 2),
    ("in-transaction", 22),
    ("after-commit", 5),
    ("before-commit", 10),
    ("faiss-partial", 1),
    ("faiss-replaced", 1),
]


@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[f"{p}-{n}" for p, n in KILL_POINTS])
def test_kill_during_first_build(tmp_path, folder, point, nth):
    index = tmp_path / "idx"
    kill_at(index, folder, point, nth)
    committed = assert_consistent(index) if (index / "imgindex.db").exists() else 0
    assert committed % BATCH == 0  # never half a batch
    report = run_to_end(index, folder)
    assert report["embedded"] == N_IMAGES - committed  # nothing committed is embedded again
    assert report["unchanged"] == committed
    assert report["total"] == N_IMAGES
    assert assert_consistent(index) == N_IMAGES


@pytest.mark.parametrize("point, nth", [("faiss-partial", 1), ("after-commit", 2)])
def test_kill_during_a_later_build_keeps_the_old_faiss_file_usable(tmp_path, folder, point, nth):
    index = tmp_path / "idx"
    run_to_end(index, folder)
    for i in range(12):
        random_image(folder / "more" / f"{i}.png", size=(40, 30), seed=100 + i)
    kill_at(index, folder, point, nth)
    committed = assert_consistent(index)
    assert N_IMAGES <= committed <= N_IMAGES + 12
    report = run_to_end(index, folder)
    assert report["embedded"] == N_IMAGES + 12 - committed
    assert assert_consistent(index) == N_IMAGES + 12


def test_kill_while_removing_and_renaming(tmp_path, folder):
    index = tmp_path / "idx"
    run_to_end(index, folder)
    for i in range(5):
        (folder / f"{i:03d}.png").unlink()
    for i in range(5, 10):
        (folder / f"{i:03d}.png").rename(folder / f"moved-{i}.png")
    kill_at(index, folder, "in-rename", 2)
    assert assert_consistent(index, files_may_be_missing=True) == N_IMAGES
    kill_at(index, folder, "in-remove", 1)
    assert assert_consistent(index, files_may_be_missing=True) == N_IMAGES
    report = run_to_end(index, folder)
    assert report["embedded"] == 0
    assert assert_consistent(index) == N_IMAGES - 5
    store = Store.open(index)
    try:
        assert store.get_by_path(folder / "moved-7.png") is not None
        assert store.get_by_path(folder / "007.png") is None
    finally:
        store.close()


@pytest.mark.slow
def test_kill_a_real_augnet_build_and_resume(tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(DATA / "Leopards", photos / "Leopards")  # same size: full batches
    shutil.copytree(DATA / "pizza", photos / "pizza")
    index = tmp_path / "idx"
    kill_at(index, photos, "after-commit", 1, real=True)
    committed = assert_consistent(index)
    assert committed == BATCH
    report = run_to_end(index, photos, real=True)
    assert (report["embedded"], report["total"]) == (12 - BATCH, 12)
    assert assert_consistent(index) == 12
