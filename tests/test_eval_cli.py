"""`imgindex eval`: retrieval quality through the command line, checked against an independent
exact computation on the same vectors."""

import json

import numpy as np
import pytest

import imgindex
from imgindex.evaluate import evaluate_vectors


def folder_truth(index_path, metric):
    with imgindex.Index.open(index_path) as index:
        records = index.records()
        vectors = index.vectors([r.id for r in records])
    labels = [r.path.split("/")[-2] for r in records]
    return evaluate_vectors(vectors, labels, metric=metric, ks=(1, 5, 10)).as_dict()


def test_eval_on_a_temporary_and_an_existing_index(run, tmp_path, photos):
    index = tmp_path / "idx"
    run("build", photos, "--index", index)
    existing = json.loads(run("eval", photos, "--index", index, "--json").stdout)
    temporary = json.loads(run("eval", photos, "--json").stdout)
    assert existing["images"] == temporary["images"] == 36
    assert existing["labels"] == 6 and existing["depth"] == 35
    for metric in ("l2", "cosine"):
        truth = folder_truth(index, metric)
        assert existing["metrics"][metric] == pytest.approx(truth)
        assert temporary["metrics"][metric] == pytest.approx(truth)
    # The stand-in model groups these photos better than chance (6 labels: about 1/6).
    assert existing["metrics"]["l2"]["mAP"] > 0.2

    table = run("eval", photos, "--index", index, "--metric", "cosine", "--at", "1,3").stdout
    lines = table.splitlines()
    assert lines[0].startswith("Evaluated 36 images with 6 labels (labels from folders")
    assert lines[1].split() == ["metric", "queries", "mAP", "R@1", "R@3", "P@1", "P@3"]
    assert lines[2].split()[:2] == ["cosine", "36"] and len(lines) == 3


def test_eval_only_under_the_given_folders(run, tmp_path, photos):
    index = tmp_path / "idx"
    run("build", photos, "--index", index)
    two = json.loads(
        run("eval", photos / "pizza", photos / "bonsai", "--index", index, "--json").stdout
    )
    assert two["images"] == 12 and two["labels"] == 2


def test_eval_with_csv_labels_and_groups(run, tmp_path, photos):
    # Label every photo by its folder, but put each label's photos in two "cameras".
    rows = ["path,label,camera"]
    for i, path in enumerate(sorted(photos.rglob("*.jpg"))):
        rows.append(f"{path.relative_to(photos)},{path.parent.name},cam{i % 2}")
    (photos / "labels.csv").write_text("\n".join(rows) + "\n")
    plain = json.loads(run("eval", "--labels", photos / "labels.csv", "--json").stdout)
    grouped = json.loads(
        run("eval", "--labels", photos / "labels.csv", "--group-column", "camera", "--json").stdout
    )
    assert plain["images"] == grouped["images"] == 36
    # Independent computation of the grouped case on the same vectors.
    index = tmp_path / "idx"
    run("build", photos, "--index", index)
    with imgindex.Index.open(index) as opened:
        records = opened.records()
        vectors = opened.vectors([r.id for r in records])
    order = {str(p): i for i, p in enumerate(sorted(photos.rglob("*.jpg")))}
    labels = [r.path.split("/")[-2] for r in records]
    groups = [f"cam{order[r.path] % 2}" for r in records]
    truth = evaluate_vectors(vectors, labels, groups, metric="l2", ks=(1, 5, 10))
    assert grouped["metrics"]["l2"] == pytest.approx(truth.as_dict())
    assert grouped["metrics"]["l2"] != pytest.approx(plain["metrics"]["l2"])


def test_eval_errors(run, tmp_path, photos):
    result = run("eval", ok=False)
    assert result.exit_code == 2 and "give FOLDERS" in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.jpg,a\n")
    result = run("eval", "--labels", bad, ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {bad}: the header must name the columns path and label (found: file, class)"
    )
    result = run("eval", photos, "--at", "0,5", ok=False)
    assert result.exit_code == 2 and "positive numbers" in result.stderr
    empty = tmp_path / "idx"
    run("build", photos / "pizza", "--index", empty)
    result = run("eval", photos / "bonsai", "--index", empty, ok=False)
    assert result.exit_code == 1 and "no labelled images to evaluate" in result.stderr
    single = tmp_path / "single.csv"
    rows = [f"{p},{p.parent.name}-{p.name}\n" for p in photos.glob("*/*")]
    single.write_text("".join(["path,label\n", *rows]))
    result = run("eval", "--labels", single, ok=False)
    assert result.exit_code == 1 and "has a label of its own" in result.stderr
    result = run("eval", "--labels", single, "--group-column", "camera", ok=False)
    assert result.exit_code == 1 and "no column 'camera' for the groups" in result.stderr


def test_eval_csv_relative_to_its_folder_and_missing_files(run, tmp_path, photos):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(
        "path,label\n"
        + "".join(f"photos/pizza/{p.name},pizza\n" for p in sorted((photos / "pizza").iterdir()))
        + "".join(f"photos/bonsai/{p.name},tree\n" for p in sorted((photos / "bonsai").iterdir()))
        + "photos/gone.jpg,pizza\n"
    )
    out = json.loads(run("eval", "--labels", sheet, "--json").stdout)
    assert out["images"] == 12 and out["labels"] == 2 and out["not_indexed"] == 1
    assert 0.0 <= out["metrics"]["l2"]["mAP"] <= 1.0
    assert np.isclose(out["metrics"]["l2"]["recall@10"], 1.0)


def test_eval_ranks_with_an_approximate_index_own_search(run, tmp_path, photos):
    flat, hnsw = tmp_path / "flat", tmp_path / "hnsw"
    run("build", photos, "--index", flat)
    run("build", photos, "--index", hnsw, "--index-type", "hnsw")
    assert "HNSW" in run("info", "--index", hnsw).stdout
    exact = json.loads(run("eval", photos, "--index", flat, "--json").stdout)
    approximate = json.loads(run("eval", photos, "--index", hnsw, "--json").stdout)
    # HNSW serves the metric it was built for; on 36 images its search finds everything.
    assert list(approximate["metrics"]) == ["l2"] and approximate["depth"] == 35
    assert approximate["metrics"]["l2"] == pytest.approx(exact["metrics"]["l2"])
