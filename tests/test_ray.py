"""The Ray engine on a local Ray cluster (two CPUs, no dashboard, no usage statistics): the same
index as the local engine, through the same sync rules, with hostile files skipped for the
same reasons. The real AugNet: each test embeds a few photos on the cluster's actors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imgindex import Index
from imgindex.cli import cli

from .conftest import DATA, random_image
from .test_hostile import make_hostile_folder

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'imgindex[ray]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local cluster for the module; builds join it (ray.is_initialized)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def some_photos(root: Path, folders=("pizza", "stop_sign"), per_folder: int = 4) -> Path:
    for name in folders:
        (root / name).mkdir(parents=True)
        for source in sorted((DATA / name).glob("*.jpg"))[:per_folder]:
            shutil.copy2(source, root / name / source.name)
    return root


def table(index_path: Path, root: Path) -> dict[str, tuple]:
    """path under ``root`` -> (id, sha256, width, height, vector) for every entry."""
    with Index.open(index_path) as index:
        records = index.records()
        vectors = index.vectors([r.id for r in records])
    out = {}
    for record, vector in zip(records, vectors, strict=True):
        name = os.path.relpath(os.fsencode(record.path), os.fsencode(root))
        out[name] = (record.id, record.sha256, record.width, record.height, vector)
    return out


def facts(index_path: Path, root: Path) -> dict:
    """path under ``root`` -> its photo facts."""
    with Index.open(index_path) as index:
        names = {r.id: os.path.relpath(os.fsencode(r.path), os.fsencode(root))
                 for r in index.records()}  # fmt: skip
        return {names[i]: f for i, f in index.photo_facts(list(names)).items()}


def assert_same_index(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name][:4] == theirs[name][:4], name
        assert np.abs(ours[name][4] - theirs[name][4]).max() <= 1e-5, name


def build(root: Path, index_path: Path, engine: str, **kwargs):
    """Build with ``engine``. Ids are given in the order of commits; the local engine's batches
    (by resized shape) would number new files in another order than the Ray engine's commits
    (in walk order), so it embeds one image a batch here, which commits in walk order too."""
    states = []
    batch = 1 if engine == "local" else None
    with Index.open(index_path, create=True, device="cpu", batch_size=batch) as index:
        report = index.sync(root, progress=lambda s: states.append((s.engine, s.actors)),
                            engine=engine, **kwargs)  # fmt: skip
        assert index.check().ok
    return report, states


def skipped(report) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in report.skipped}


@pytest.mark.parametrize("pillow_limit", [None, 178956970], ids=["lifted", "pillows-own"])
def test_ray_build_equals_local_build_hostile_files_included(tmp_path, monkeypatch, pillow_limit):
    """Also with Pillow's own pixel limit as this process has it (the command line lifts it):
    the workers read under the driver's."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    root = some_photos(tmp_path / "photos")
    make_hostile_folder(root)
    local, _ = build(root, tmp_path / "local", "local")
    on_ray, states = build(root, tmp_path / "ray", "ray")

    assert_same_index(table(tmp_path / "local", root), table(tmp_path / "ray", root))
    assert facts(tmp_path / "local", root) == facts(tmp_path / "ray", root)
    assert on_ray.embedded == local.embedded == local.added > 8
    assert skipped(on_ray) == skipped(local)
    assert "not a regular file" in skipped(on_ray)["pipe.jpg"]
    assert "aspect ratio" in skipped(on_ray)["thin.png"]
    pillows = "Pillow's own limit" in skipped(on_ray)["bomb.png"]
    assert pillows == (pillow_limit is not None)
    # The progress said which engine, and how many actors were sending results.
    assert ("ray", 1) in states
    assert on_ray.stage_seconds["starting the cluster"] > 0

    # Nothing changed: a second build embeds nothing (and sends only the files that could
    # not even be opened: a broken link, a loop; the local engine tries them again too).
    again, states = build(root, tmp_path / "ray", "ray")
    assert (again.embedded, again.unchanged, again.added) == (0, local.added, 0)
    assert skipped(again) == skipped(local)


def change(root: Path) -> None:
    """Renames, a copy, an edit, a deletion and a new file, the same under any root."""
    pizza = sorted((root / "pizza").glob("*.jpg"))
    stop = sorted((root / "stop_sign").glob("*.jpg"))
    os.rename(pizza[0], root / "pizza" / "renamed.jpg")
    (root / "moved").mkdir()
    os.rename(stop[0], root / "moved" / stop[0].name)
    shutil.copy2(pizza[1], root / "copy-of-pizza.jpg")
    shutil.copy2(DATA / "Leopards" / "image_0001.jpg", pizza[2])  # edited: other content
    pizza[3].unlink()
    random_image(root / "new.png", size=(120, 90), seed=7)


@pytest.mark.parametrize("crowded", [16, 0], ids=["hashes-per-path", "hashes-sent-once"])
def test_second_ray_build_after_changes_is_the_local_engines(tmp_path, monkeypatch, crowded):
    """Also with every size counted as crowded: the stored contents then reach the workers
    once, through the object store, instead of with each path."""
    from imgindex import distributed

    monkeypatch.setattr(distributed, "CROWDED", crowded)
    roots = {engine: some_photos(tmp_path / engine / "photos") for engine in ("local", "ray")}
    reports = {}
    for engine, root in roots.items():
        build(root, tmp_path / engine / "index", engine)
        change(root)
        reports[engine], _ = build(root, tmp_path / engine / "index", engine)

    local, on_ray = reports["local"], reports["ray"]
    counts = ("added", "updated", "renamed", "removed", "unchanged", "reused", "embedded")
    assert {c: getattr(on_ray, c) for c in counts} == {c: getattr(local, c) for c in counts}
    assert (on_ray.renamed, on_ray.removed, on_ray.reused, on_ray.embedded) == (2, 1, 3, 2)
    assert_same_index(
        table(tmp_path / "local" / "index", roots["local"]),
        table(tmp_path / "ray" / "index", roots["ray"]),
    )


def test_command_line_engine_ray(tmp_path):
    root = some_photos(tmp_path / "photos", folders=("pizza",), per_folder=3)
    runner = CliRunner()
    index = tmp_path / "index"
    args = ["build", str(root), "--index", str(index), "--engine", "ray", "--device", "cpu"]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["embedded"], report["total"]) == (3, 3)

    refused = runner.invoke(cli, [*args, "--workers", "2"])
    assert refused.exit_code != 0
    assert "--workers and --decode device are for the local engine" in refused.output
    nowhere = tmp_path / "nowhere"
    unreachable = runner.invoke(
        cli, ["build", str(root), "--index", str(nowhere), "--engine", "ray",
              "--ray-address", "127.0.0.1:1"],
    )  # fmt: skip
    assert unreachable.exit_code == 1
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in unreachable.output
    assert not nowhere.exists()
    local_only = runner.invoke(cli, ["add", str(root), "--index", str(index), "--ray-actors", "2"])
    assert local_only.exit_code != 0
    assert "--ray-address and --ray-actors are for --engine ray" in local_only.output


def test_an_actor_with_other_weights_is_refused(tmp_path):
    from imgindex.distributed import EmbedderSpec
    from imgindex.errors import ImgIndexError

    with Index.open(tmp_path / "index", create=True, device="cpu") as index:
        spec = index._embedder_spec(None)
    spec.make()  # the index's own weights: accepted
    other = dict(spec.expected, weights_sha256="f" * 64)
    with pytest.raises(ImgIndexError, match="install the same imgindex and weights"):
        EmbedderSpec(preset=spec.preset, expected=other, device="cpu").make()


def test_a_file_a_worker_cannot_read_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """As a file on a disk one node does not mount: here, gone between planning and reading."""
    from imgindex import distributed

    root = some_photos(tmp_path / "photos", folders=("pizza",), per_folder=3)
    victim = sorted((root / "pizza").glob("*.jpg"))[1]
    plan = distributed.RayBuild._candidates

    def candidates_then_unmount(self, paths):
        found = plan(self, paths)
        victim.unlink()  # the driver saw it; the workers will not
        return found

    monkeypatch.setattr(distributed.RayBuild, "_candidates", candidates_then_unmount)
    report, _ = build(root, tmp_path / "index", "ray")
    assert (report.embedded, report.total) == (2, 2)
    assert [(Path(s.path).name, s.reason) for s in report.skipped] == [
        (victim.name, "file not found (deleted, or a broken link)")
    ]
