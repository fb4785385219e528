"""One writer, many readers: a second build waits or says who holds the lock, and queries during
a build see whole committed batches, never half of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import imgindex

from .conftest import ROOT, FakeVectorizer, random_image

BATCH = 4


def helper(index, folder, point="none", nth=0, *extra, env=None):
    args = [sys.executable, "-m", "tests.crash_helper", point, str(nth), "--"]
    args += ["build", str(folder), "--index", str(index), "--batch-size", str(BATCH), *extra]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def make_folder(tmp_path, n=40):
    for i in range(n):
        random_image(tmp_path / "pics" / f"{i:03d}.png", size=(40, 30), seed=i)
    return tmp_path / "pics"


def test_second_writer_is_told_who_holds_the_lock_or_waits(tmp_path):
    folder = make_folder(tmp_path, 12)
    index = tmp_path / "idx"
    first = helper(index, folder, "after-commit", 1, env={"PAUSE_SECONDS": "10"})
    assert first.stdout.readline().startswith("PAUSED")
    # All three start while the first build holds the lock (it pauses for 10 s).
    refused = helper(index, folder)
    waited = helper(index, folder, "none", 0, "--wait", "0.5")
    patient = helper(index, folder, "none", 0, "--wait", "120", "--json")

    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1
    assert f"another imgindex process (pid {first.pid}) is writing" in err
    assert "--wait SECONDS" in err and "Traceback" not in err

    _, err = waited.communicate(timeout=60)
    assert waited.returncode == 1 and "after waiting 0.5 s" in err

    out, err = patient.communicate(timeout=120)
    assert patient.returncode == 0, err
    assert f"Waiting for the index lock, held by pid {first.pid}" in err
    assert first.wait(timeout=60) == 0
    report = json.loads(out)
    assert report["embedded"] == 0 and report["total"] == 12  # the first build did the work


def test_queries_during_a_build_see_whole_batches(tmp_path):
    folder = make_folder(tmp_path, 40)
    index = tmp_path / "idx"
    with imgindex.Index.create(index, vectorizer=FakeVectorizer(device="cpu")):
        pass
    builder = helper(index, folder, env={"SLOW_COMMITS": "0.15"})
    probe = np.zeros(768, dtype=np.float32)
    seen = []
    with imgindex.Index.open(index, vectorizer=FakeVectorizer(device="cpu")) as reader:
        while builder.poll() is None:
            hits = reader.search_by_vector(probe, k=1000)
            assert all(h.path.startswith(str(folder)) for h in hits)
            seen.append(len(hits))
            time.sleep(0.02)
        assert builder.returncode == 0, builder.stderr.read()
        seen.append(len(reader.search_by_vector(probe, k=1000)))
    assert all(n % BATCH == 0 for n in seen), seen
    assert seen == sorted(seen) and seen[-1] == 40
    assert len(set(seen)) >= 3  # it did look in the middle of the build


def test_cli_query_during_a_build(tmp_path):
    folder = make_folder(tmp_path, 16)
    index = tmp_path / "idx"
    builder = helper(index, folder, "after-commit", 2, env={"PAUSE_SECONDS": "30"})
    assert builder.stdout.readline().startswith("PAUSED")
    query = [sys.executable, "-m", "tests.crash_helper", "none", "0", "--", "query"]
    query += [str(folder / "000.png"), "--index", str(index), "--json", "-k", "100"]
    result = subprocess.run(query, cwd=ROOT, capture_output=True, text=True, timeout=60)
    builder.kill()
    builder.wait()
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)[0]["results"]) == 2 * BATCH


def test_refused_writers_and_readers_do_not_disturb_a_build(tmp_path):
    """Writers refused the lock (and readers) while a build runs must not touch SQLite's write
    path: a refused `remove` used to checkpoint the write-ahead log on closing, and after some
    tens of them the build died with "database is locked"."""
    from imgindex.errors import IndexLockedError

    folder = make_folder(tmp_path, 200)
    index = tmp_path / "idx"
    with imgindex.Index.create(index, vectorizer=FakeVectorizer(device="cpu")):
        pass
    # (--wait: the loop below may hold the lock for a moment as the build starts.)
    builder = helper(index, folder, "none", 0, "--wait", "30", env={"SLOW_COMMITS": "0.03"})
    refused = 0
    probe = np.zeros(768, dtype=np.float32)
    while builder.poll() is None:
        with imgindex.Index.open(index) as other:
            other.search_by_vector(probe, k=5)
            try:
                other.remove([tmp_path / "elsewhere"])  # nothing there: harmless if allowed
            except IndexLockedError:
                refused += 1
    _, err = builder.communicate()
    assert builder.returncode == 0, err
    assert refused >= 20, refused
    with imgindex.Index.open(index, vectorizer=FakeVectorizer(device="cpu")) as built:
        assert built.count() == 200
        assert built.check().ok
