"""The Ray engine under faults: an actor killed on a simulated two-node cluster, the driver
SIGKILLed mid-build, Ctrl-C. The real AugNet on this machine's CPUs; seconds per test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imgindex import Index

from .test_ray import some_photos

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'imgindex[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow

PHOTOS = ("pizza", "stop_sign", "Leopards", "airplanes", "bonsai", "sea_horse")


def actor_processes() -> list[int]:
    """The pids of this machine's embedding actors (Ray names its processes after them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"EmbedActor" in cmdline and b"MapWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def two_nodes():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_an_actor_killed_mid_build_on_two_nodes(tmp_path, two_nodes):
    root = some_photos(tmp_path / "photos", folders=PHOTOS, per_folder=4)
    killed = []

    def kill_one_actor(state):
        if not killed and state.embedded >= 1:
            pids = actor_processes()  # one actor per node (the second may still be starting)
            assert pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    with Index.open(tmp_path / "index", create=True, device="cpu") as index:
        report = index.sync(root, progress=kill_one_actor, engine="ray")
        assert killed, "the build ended before an actor could be killed"
        assert (report.embedded, report.added, len(report.skipped)) == (24, 24, 0)
        assert index.check().ok
        paths = [r.path for r in index.records()]
        assert len(paths) == len(set(paths)) == 24  # nothing lost, nothing twice
        vectors = index.vectors([r.id for r in index.records()])
        assert len({v.tobytes() for v in vectors}) == 24


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgindex", *args]


def _committed(index: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{index / 'imgindex.db'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0  # not created yet


def _start_build(root: Path, index: Path) -> subprocess.Popen:
    """``imgindex build --engine ray`` in its own session (its own local Ray cluster), started
    once the index exists (so the child does not spend the test's time creating it)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    args = _cli("build", str(root), "--index", str(index), "--engine", "ray", "--device", "cpu")
    return subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_commits(child: subprocess.Popen, index: Path, total: int) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        count = _committed(index)
        if 0 < count < total:
            return count
        time.sleep(0.05)
    child.kill()
    out, err = child.communicate()
    pytest.fail(f"no partial commit seen (exit {child.returncode}): {out}{err}")


def _cleanup(child: subprocess.Popen) -> None:
    """Whatever the child's Ray cluster left running is killed with its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def _signalled_build(tmp_path: Path, signal_number: int) -> tuple[Path, Path, Any, str]:
    """A Ray build of 24 photos in a child process, sent ``signal_number`` once it committed
    some of them but not all: the photos, the index, the child (its session still to be cleaned
    up by the caller) and what it wrote on stderr."""
    root = some_photos(tmp_path / "photos", folders=PHOTOS, per_folder=4)
    index = tmp_path / "index"
    with Index.open(index, create=True, device="cpu"):
        pass
    child = _start_build(root, index)
    try:
        _wait_for_commits(child, index, 24)
        child.send_signal(signal_number)
        if signal_number == signal.SIGKILL:
            child.wait(timeout=30)
            _cleanup(child)  # its cluster's processes, which hold its output pipes open
        _out, err = child.communicate(timeout=60)
    except BaseException:
        _cleanup(child)
        raise
    return root, index, child, err


def test_driver_sigkilled_then_built_again_embeds_only_the_rest(tmp_path):
    root, index, child, _err = _signalled_build(tmp_path, signal.SIGKILL)
    _cleanup(child)
    with Index.open(index) as opened:
        kept = opened.count()
        assert 0 < kept < 24
        assert opened.check().ok

    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    args = _cli("build", str(root), "--index", str(index), "--engine", "ray", "--json")
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["embedded"], report["unchanged"], report["total"]) == (24 - kept, kept, 24)
    with Index.open(index) as opened:
        assert opened.check().ok


def test_ctrl_c_stops_the_cluster_and_says_what_was_kept(tmp_path):
    _root, index, child, err = _signalled_build(tmp_path, signal.SIGINT)
    try:
        assert child.returncode == 130, err
        assert "Interrupted. The index keeps what was committed" in err
        # The cluster's work stopped with it: no embedding actor is left running.
        deadline = time.monotonic() + 30
        while actor_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert actor_processes() == []
    finally:
        _cleanup(child)
    with Index.open(index) as opened:
        assert 0 < opened.count() < 24
        assert opened.check().ok
        assert f"({opened.count()} images now)" in err
