"""The command line: output people read, JSON scripts parse, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imgindex as imgindex_api

from .conftest import DATA, random_image


def test_build_then_query_then_info(run, tmp_path, photos):
    index = tmp_path / "idx"
    result = run("build", photos, "--index", index)
    assert "Embedded 36 images" in result.stdout
    assert "36 added, 0 updated, 0 renamed, 0 removed, 0 unchanged, 0 skipped" in result.stdout
    assert "Created index" in result.stderr

    again = run("build", photos, "--index", index, "--verbose")
    assert "Nothing to embed" in again.stdout and "36 unchanged" in again.stdout
    assert "open index:" in again.stderr and "loading the model" not in again.stderr

    query = photos / "stop_sign" / "image_0002.jpg"
    result = run("query", query, "--index", index, "-k", "3")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Query {query} (l2, 3 nearest of 36)")
    assert lines[1].split() == ["rank", "distance", "id", "path"]
    first = lines[2].split()
    assert first[0] == "1" and float(first[1]) == 0.0 and first[3].endswith("image_0002.jpg")
    assert len(lines) == 5

    result = run("query", query, "--index", index, "--metric", "cosine", "-k", "2")
    assert "similarity" in result.stdout.splitlines()[1]

    info = run("info", "--index", index).stdout
    assert "Images:        36" in info and "Flat (exact) (exact search; asked for: auto)" in info
    assert "l2 (Euclidean distance), cosine (similarity)" in info

    (photos / "pizza" / "image_0001.jpg").touch()  # same content: its vector is kept
    (photos / "copy.jpg").write_bytes((photos / "pizza" / "image_0002.jpg").read_bytes())
    random_image(photos / "new.png", seed=5)  # new content: the model is needed
    result = run("build", photos, "--index", index, "--verbose")
    assert "Embedded 1 image in" in result.stdout and "2 added" in result.stdout
    for stage in ("loading the model:", "reading:", "network:", "storing:", "other ("):
        assert stage in result.stderr, stage


def test_json_outputs(run, tmp_path, photos):
    index = tmp_path / "idx"
    built = json.loads(run("build", photos / "pizza", "--index", index, "--json").stdout)
    assert built["added"] == 6 and built["total"] == 6 and built["skipped"] == []

    q1, q2 = photos / "pizza" / "image_0001.jpg", photos / "pizza" / "image_0005.jpg"
    result = json.loads(run("query", q1, q2, "--index", index, "--json", "-k", "4").stdout)
    assert [r["query"] for r in result] == [str(q1), str(q2)]
    for entry in result:
        assert entry["metric"] == "l2" and len(entry["results"]) == 4
        assert set(entry["results"][0]) == {"rank", "id", "path", "distance"}
        assert [r["rank"] for r in entry["results"]] == [1, 2, 3, 4]
    assert result[0]["results"][0]["path"] == str(q1)

    cosine = json.loads(run("query", q1, "--index", index, "--json", "--metric", "cosine").stdout)
    assert set(cosine[0]["results"][0]) == {"rank", "id", "path", "similarity"}
    assert len(cosine[0]["results"]) == 6  # k=10 but only 6 indexed

    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["images"] == 6 and info["index_type"] == "Flat (exact)" and info["exact"]


def test_skipped_files_in_summary_and_info(run, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "a.jpg").write_bytes((DATA / "pizza" / "image_0001.jpg").read_bytes())
    index = tmp_path / "idx"
    result = run("build", folder, "--index", index)
    assert "1 skipped" in result.stdout
    assert "zero.jpg: empty file (0 bytes)" in result.stdout
    listed = run("info", "--index", index, "--skipped").stdout
    assert "zero.jpg: empty file (0 bytes)" in listed
    as_json = json.loads(run("info", "--index", index, "--skipped", "--json").stdout)
    assert as_json["skipped_files"][0]["reason"] == "empty file (0 bytes)"


def test_distance_table(run):
    images = [DATA / "pizza" / "image_0001.jpg", DATA / "pizza" / "image_0002.jpg"]
    result = run("distance", *images)
    lines = result.stdout.splitlines()
    assert lines[0] == "L2 distance between 2 images"
    assert lines[2].split()[:2] == ["[1]", "0.0000"]
    assert lines[3].split()[2] == "0.0000"
    assert lines[2].split()[2] == lines[3].split()[1]  # symmetric
    assert lines[-2:] == [f"[1] {images[0]}", f"[2] {images[1]}"]
    data = json.loads(run("distance", *images, "--metric", "cosine", "--json").stdout)
    assert data["metric"] == "cosine" and data["matrix"][0][0] == pytest.approx(1.0)
    assert data["matrix"][0][1] == data["matrix"][1][0] < 1


def test_default_index_location_comes_from_the_environment(run, tmp_path, photos, monkeypatch):
    monkeypatch.setenv("IMGINDEX_INDEX", str(tmp_path / "from-env"))
    run("build", photos / "bonsai")
    assert (tmp_path / "from-env" / "imgindex.db").exists()
    assert "6 nearest of 6" in run("query", photos / "bonsai" / "image_0001.jpg").stdout


# -- errors: one line on stderr, a non-zero status, never a traceback (real processes) ----------


def imgindex(*args, cwd=None, env_index=None):
    env = dict(os.environ)
    if env_index:
        env["IMGINDEX_INDEX"] = str(env_index)
    return subprocess.run(
        [sys.executable, "-m", "imgindex", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    message = lines[-1] if code == 2 else "\n".join(lines)
    if code == 1:
        assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in message, result.stderr


def test_missing_index(tmp_path):
    result = imgindex("query", DATA / "pizza" / "image_0001.jpg", "--index", tmp_path / "none")
    assert_one_line_error(result, 1, "no index at", "imgindex build FOLDER")
    result = imgindex("info", env_index=tmp_path / "none")
    assert_one_line_error(result, 1, "from $IMGINDEX_INDEX", "imgindex build FOLDER`")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    del env["IMGINDEX_INDEX"]
    result = subprocess.run(
        [sys.executable, "-m", "imgindex", "info"], capture_output=True, text=True, env=env
    )
    assert_one_line_error(result, 1, f"default location {tmp_path}/xdg/imgindex/default")


def test_usage_errors(tmp_path):
    assert_one_line_error(imgindex("query", "x.jpg", "--metric", "manhattan"), 2, "manhattan")
    assert_one_line_error(imgindex("build", tmp_path / "nowhere"), 2, "no such file or folder")
    assert_one_line_error(imgindex("query", "x.jpg", "-k", "0"), 2, "0")
    assert_one_line_error(imgindex("query", "x.jpg", "--device", "banana"), 2, "banana")
    assert_one_line_error(imgindex("frobnicate"), 2, "No such command")


@pytest.mark.slow
def test_undecodable_query_and_distance_input(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("shopping list")
    built = imgindex("build", DATA / "Leopards" / "image_0001.jpg", "--index", tmp_path / "idx")
    assert built.returncode == 0, built.stderr
    result = imgindex("query", bad, "--index", tmp_path / "idx")
    assert_one_line_error(result, 1, str(bad), "not an image")
    result = imgindex("query", tmp_path / "missing.jpg", "--index", tmp_path / "idx")
    assert_one_line_error(result, 1, "missing.jpg", "not found")
    result = imgindex("distance", DATA / "Leopards" / "image_0001.jpg", bad)
    assert_one_line_error(result, 1, str(bad), "not an image")


def test_help_and_version_start_without_torch():
    code = (
        "import sys; from imgindex.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'faiss' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False False")
    assert "imgindex build" in out.stdout
    version = imgindex("--version")
    assert version.returncode == 0 and "0.1.0" in version.stdout


def test_python_dash_m_and_console_script_agree():
    script = Path(sys.executable).parent / "imgindex"
    if script.exists():
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "Find similar images" in out.stdout
    assert "Find similar images" in imgindex("--help").stdout


@pytest.mark.slow
def test_other_weights_are_refused_with_a_way_forward(tmp_path):
    """An index built with imgsim's weights refuses a query with another checkpoint."""
    import torch

    from imgindex.weights import default_weights_path

    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    key = next(k for k in state if k.endswith("fc.bias"))
    state[key] = state[key] + 0.01  # a fine-tuned variant: same shape, other vectors
    other = tmp_path / "other.pth"
    torch.save(state, other)
    index = tmp_path / "idx"
    built = imgindex("build", DATA / "Leopards" / "image_0001.jpg", "--index", index)
    assert built.returncode == 0, built.stderr
    result = imgindex(
        "query", DATA / "pizza" / "image_0001.jpg", "--index", index, "--weights", other
    )
    assert_one_line_error(result, 1, "built with weights c2cb3cac8264", "--weights WEIGHTS")
    # eval scores the stored vectors: other weights would silently measure the index's own.
    result = imgindex("eval", "--index", index, "--weights", other)
    assert_one_line_error(result, 1, "built with weights c2cb3cac8264")
    check = imgindex("check", "--index", index, "--weights", other)
    assert check.returncode == 1 and "queries would be refused" in check.stdout
    assert imgindex("check", "--index", index).returncode == 0


def test_add_remove_check_repair(run, tmp_path, photos):
    import sqlite3

    index = tmp_path / "idx"
    added = json.loads(run("add", photos / "pizza", "--index", index, "--json").stdout)
    assert added["added"] == 6
    one = photos / "bonsai" / "image_0001.jpg"
    assert "1 added" in run("add", one, "--index", index).stdout
    assert run("check", "--index", index, "--weights", "x.pth", ok=False).exit_code == 1

    checked = run("check", "--index", index, "--no-files", ok=False)
    # The stand-in network's weights are not the ones a query would load by default.
    assert checked.exit_code == 1 and "queries would be refused" in checked.stdout

    removed = run("remove", one, "--index", index)
    assert removed.stdout.strip() == "Removed 1 entry; 6 images remain."

    (photos / "pizza" / "image_0002.jpg").unlink()
    db = sqlite3.connect(index / "imgindex.db")
    with db:
        db.execute("INSERT INTO vectors (id, vector) VALUES (9999, x'00')")
    db.close()
    (index / "vectors.faiss").write_bytes(b"not a faiss file")

    report = json.loads(run("check", "--index", index, "--json", ok=False).stdout)
    assert not report["ok"]
    assert any("belong to no image" in p for p in report["problems"])
    assert any("cannot be read" in p for p in report["problems"])
    assert [os.path.basename(p) for p in report["missing_files"]] == ["image_0002.jpg"]
    text = run("check", "--index", index, ok=False)
    assert text.exit_code == 1 and "image_0002.jpg" in text.stdout
    assert text.stdout.rstrip().endswith("The index has problems.")

    repaired = json.loads(run("repair", "--index", index, "--remove-missing", "--json").stdout)
    assert repaired["orphan_vectors_removed"] == 1
    assert repaired["missing_files_removed"] == 1
    assert repaired["vectors_in_faiss"] == repaired["total"] == 5
    after = json.loads(run("check", "--index", index, "--json", ok=False).stdout)
    assert [p for p in after["problems"] if "queries would be refused" not in p] == []
    assert after["missing_files"] == [] and after["faiss_file"] == 5


def test_full_disk_is_one_line_and_keeps_committed_batches(run, tmp_path, photos, monkeypatch):
    import sqlite3

    import imgindex.store

    real_write = imgindex.store.Store.write_batch
    calls = {"n": 0}

    def write_batch(self, images, vectors, skipped=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real_write(self, images, vectors, skipped)

    monkeypatch.setattr(imgindex.store.Store, "write_batch", write_batch)
    index = tmp_path / "idx"
    result = run("build", photos, "--index", index, "--batch-size", "4", ok=False)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "Error: OperationalError: database or disk is full"
    monkeypatch.setattr(imgindex.store.Store, "write_batch", real_write)
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["images"] > 0  # the batches committed before the failure are there
    assert json.loads(run("build", photos, "--index", index, "--json").stdout)["total"] == 36


def test_index_types_similar_duplicates_and_tune(run, tmp_path, photos):
    from PIL import Image

    original = photos / "bonsai" / "image_0002.jpg"
    Image.open(original).save(photos / "bonsai" / "copy.png")  # lossless copy: distance 0
    index = tmp_path / "idx"
    run("build", photos, "--index", index, "--index-type", "hnsw:M=16")
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["index"] == {
        "kind": "hnsw",
        "metric": "l2",
        "params": {"M": 16, "ef_construction": 80},
    }
    assert "HNSW (M=16" in run("info", "--index", index).stdout

    result = json.loads(
        run("query", original, "--index", index, "--json", "--ef-search", "32", "-k", "3").stdout
    )
    assert result[0]["results"][0]["distance"] == 0.0
    wrong = run("query", original, "--index", index, "--metric", "cosine", ok=False)
    assert wrong.exit_code == 1 and "answers l2 queries only" in wrong.stderr
    both = run(
        "query", original, "--index", index, "--max-distance", "1", "--metric", "cosine", ok=False
    )
    assert both.exit_code == 2 and "--max-distance goes with --metric l2" in both.stderr

    by_path = json.loads(run("similar", original, "--index", index, "--json", "-k", "2").stdout)
    first = by_path[0]["results"][0]
    assert first["path"].endswith("copy.png") and first["distance"] == 0.0
    image_id = json.loads(run("info", "--index", index, "--json").stdout)["images"]
    by_id = json.loads(
        run("similar", str(first["id"]), "--index", index, "--json", "-k", "1").stdout
    )
    assert by_id[0]["results"][0]["path"] == str(original)
    # The query is named as the index names the image, whether given by id or by path.
    assert by_id[0]["query"] == first["path"] and by_path[0]["query"] == str(original)
    missing = run("similar", "999999", "--index", index, ok=False)
    assert missing.exit_code == 1 and "not in the index" in missing.stderr
    assert image_id == 37

    dupes = json.loads(run("duplicates", "--index", index, "--json", "--threshold", "0.5").stdout)
    assert [sorted(os.path.basename(i["path"]) for i in g["images"]) for g in dupes["groups"]] == [
        ["copy.png", "image_0002.jpg"]
    ]
    assert dupes["groups"][0]["pairs"][0]["score"] == 0.0
    csv_lines = run(
        "duplicates", "--index", index, "--csv", "--threshold", "0.5"
    ).stdout.splitlines()
    assert csv_lines[0] == "group,id,path" and len(csv_lines) == 3
    text = run("duplicates", "--index", index, "--threshold", "0.5").stdout
    assert text.startswith("1 group, 2 images (distance <= 0.5)")
    nan = run("duplicates", "--index", index, "--threshold", "nan", ok=False)
    assert nan.exit_code == 2 and "threshold nan is not an L2 distance" in nan.stderr

    tuned = json.loads(run("tune", "--index", index, "--json", "--queries", "10", "-k", "5").stdout)
    assert tuned["rows"][0]["setting"] == "ef_search=16" and tuned["rows"][-1]["recall"] == 1.0
    assert (
        "recall@5 against exact search"
        in run("tune", "--index", index, "--queries", "5", "-k", "5").stdout
    )

    bad = run("build", photos, "--index", index, "--index-type", "annoy", ok=False)
    assert bad.exit_code == 2 and "unknown index type 'annoy'" in bad.stderr
    # Bad values are refused before anything is stored (they used to fail every later build,
    # or crash FAISS: M=0 aborted, M=-5 took 24 GB).
    for value, reason in (("hnsw:M=abc", "M must be a whole number from 2 to 256"),
                          ("hnsw:M=-5", "M must be a whole number"),
                          ("ivf-pq:m=7", "m must divide the vector size 768"),
                          ("factory:Garbage", "could not parse index string Garbage")):  # fmt: skip
        bad = run("build", photos, "--index", index, "--index-type", value, ok=False)
        assert bad.exit_code == 2 and reason in bad.stderr, bad.stderr
    assert run("build", photos, "--index", index).exit_code == 0
    with pytest.raises(ValueError, match="M must be"), imgindex_api.Index.open(index) as opened:
        opened.set_index_type("hnsw:M=0")
    back = run("build", photos, "--index", index, "--index-type", "flat")
    assert "Nothing to embed" in back.stdout
    assert json.loads(run("info", "--index", index, "--json").stdout)["index"]["kind"] == "flat"


def test_json_names_a_query_as_the_index_names_its_file(run, tmp_path):
    """A file name that is not UTF-8 is written the same way (escaped) as the query and as the
    hit, so the JSON is valid and a script can match the two."""
    folder = tmp_path / "pics"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    random_image(Path(os.fsdecode(raw)))
    run("build", folder, "--index", tmp_path / "idx")
    result = run("query", os.fsdecode(raw), "--index", tmp_path / "idx", "--json")
    [entry] = json.loads(result.stdout_bytes.decode("utf-8"))
    assert entry["query"] == entry["results"][0]["path"] == f"{folder}/caf\\xe9.png"
    matrix = json.loads(run("distance", os.fsdecode(raw), "--json").stdout_bytes.decode("utf-8"))
    assert matrix["images"] == [entry["query"]]


def test_the_pixel_limit_is_imgindexs_own(run, tmp_path, monkeypatch):
    """Pillow refuses images above twice its own limit before imgindex's check can allow them
    (--max-pixels above 179 MP did nothing); the command lifts Pillow's, ours applies."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 images exceed twice this
    image = random_image(tmp_path / "pics" / "a.png")
    built = json.loads(run("build", image.parent, "--index", tmp_path / "idx", "--json").stdout)
    assert built["added"] == 1 and built["skipped"] == []
    refused = run("query", image, "--index", tmp_path / "idx", "--max-pixels", "100", ok=False)
    assert refused.exit_code == 1 and "over the limit of 0.0 MP" in refused.stderr
    run("query", image, "--index", tmp_path / "idx", "--max-pixels", "5000")


def test_ctrl_c_says_what_the_index_kept(run, tmp_path, photos, monkeypatch):
    import imgindex.store

    original = imgindex.store.Store.write_batch
    calls = []

    def write_batch(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(imgindex.store.Store, "write_batch", write_batch)
    result = run("build", photos, "--index", tmp_path / "idx", "--batch-size", "4", ok=False)
    assert result.exit_code == 130
    assert "Interrupted. The index keeps what was committed (4 images now)" in result.stderr
    monkeypatch.undo()
    info = json.loads(run("info", "--index", tmp_path / "idx", "--json").stdout)
    assert info["images"] == 4


def test_an_unreadable_query_image_does_not_cost_the_others_their_answers(run, tmp_path, photos):
    run("build", photos / "pizza", "--index", tmp_path / "idx")
    bad = tmp_path / "notes.jpg"
    bad.write_text("shopping list")
    good = photos / "pizza" / "image_0001.jpg"
    result = run("query", bad, good, "--index", tmp_path / "idx", "-k", "1", ok=False)
    assert result.exit_code == 1
    assert "image_0001.jpg" in result.stdout and result.stdout.count("Query ") == 1
    assert result.stderr.strip() == f"Error: {bad}: not an image, or a format imgindex cannot read"
    result = run("query", bad, good, "--index", tmp_path / "idx", "--json", ok=False)
    [failed, answered] = json.loads(result.stdout)
    assert failed == {"query": str(bad), "error": "not an image, or a format imgindex cannot read"}
    assert answered["query"] == str(good) and answered["results"][0]["path"] == str(good)


def test_every_unreadable_query_image_is_named(run, tmp_path, photos):
    run("build", photos / "pizza", "--index", tmp_path / "idx")
    bad, gone = tmp_path / "notes.jpg", tmp_path / "gone.jpg"
    bad.write_text("shopping list")
    result = run("query", bad, gone, "--index", tmp_path / "idx", "--json", ok=False)
    assert result.exit_code == 1
    assert [e["query"] for e in json.loads(result.stdout)] == [str(bad), str(gone)]
    assert result.stderr.count("Error: ") == 2


def test_an_empty_folder_keeps_its_entries_and_the_build_says_so(run, tmp_path, photos):
    run("build", photos / "pizza", "--index", tmp_path / "idx")
    for path in (photos / "pizza").iterdir():
        path.unlink()
    result = run("build", photos / "pizza", "--index", tmp_path / "idx")
    assert f"Warning: {photos / 'pizza'} is empty, but 6 indexed images were in it" in result.stdout
    assert "Index " in result.stdout and ": 6 images" in result.stdout


# -- issue 12, item 14: the smaller things --------------------------------------------------------


def test_duplicates_csv_has_unix_line_ends(run, tmp_path):
    random_image(tmp_path / "pics" / "a.png", seed=1)
    (tmp_path / "pics" / "b.png").write_bytes((tmp_path / "pics" / "a.png").read_bytes())
    run("build", tmp_path / "pics", "--index", tmp_path / "idx")
    out = run("duplicates", "--index", tmp_path / "idx", "--csv").stdout_bytes  # as written
    assert b"\r" not in out and out.splitlines()[0] == b"group,id,path" and out.count(b"\n") == 3


def test_similar_answers_the_known_images_and_names_the_unknown(run, tmp_path):
    for i in range(3):
        random_image(tmp_path / "pics" / f"{i}.png", seed=i)
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    result = run("similar", "1", "999", "3", "--index", index, "--json", ok=False)
    assert result.exit_code == 1
    entries = json.loads(result.stdout)
    assert [e.get("error", "answered")[:10] for e in entries] == [
        "answered", "not in the", "answered"
    ]  # fmt: skip
    assert entries[1]["query"] == "999" and "Error: 999: not in the index" in result.stderr
    text = run("similar", "999", "2", "--index", index, ok=False)
    assert text.exit_code == 1 and "Query 2 (" in text.stdout


def test_remove_everything_asks_first_and_dry_runs_change_nothing(run, tmp_path):
    for i in range(3):
        random_image(tmp_path / "pics" / f"{i}.png", seed=i)
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    refused = run("remove", "/", "--index", index, ok=False)  # not a terminal: no one to ask
    assert refused.exit_code == 2 and "would remove all 3 entries" in refused.stderr
    assert "--yes" in refused.stderr
    dry = run("remove", "/", "--index", index, "--dry-run")
    assert "3 entries would be removed; 0 images would remain. Nothing was changed." in dry.stdout
    some = run("remove", tmp_path / "pics" / "0.png", "--index", index)  # not all: no question
    assert "Removed 1 entry" in some.stdout
    (tmp_path / "pics" / "1.png").unlink()
    random_image(tmp_path / "pics" / "new.png", seed=9)
    plan = json.loads(run("build", tmp_path / "pics", "--index", index, "--dry-run", "--json")
                      .stdout)  # fmt: skip
    assert plan["dry_run"] and [Path(p).name for p in plan["to_read"]] == ["0.png", "new.png"]
    assert [Path(p).name for p in plan["to_remove"]] == ["1.png"] and plan["unchanged"] == 1
    text = run("build", tmp_path / "pics", "--index", index, "--dry-run").stdout
    assert text.startswith("Dry run: 2 files to read") and "Nothing was changed." in text
    info = json.loads(run("info", "--index", index, "--json").stdout)
    assert info["images"] == 2  # the dry runs changed nothing
    new = run("build", tmp_path / "pics", "--index", tmp_path / "none", "--dry-run").stdout
    assert "a build would create it and read 3 files" in new and not (tmp_path / "none").exists()
    assert "Removed 2 entries" in run("remove", "/", "--index", index, "--yes").stdout


def test_under_a_folder_that_does_not_exist_is_warned_of(run, tmp_path):
    random_image(tmp_path / "pics" / "a.png")
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    result = run("similar", "1", "--index", index, "--under", tmp_path / "pcis")
    assert "Warning: --under" in result.stderr and "no such folder or file" in result.stderr
    assert "Warning" not in run("similar", "1", "--index", index, "--under", tmp_path).stderr


def test_the_progress_line_says_the_model_is_loading():
    from imgindex.cli import ProgressLine
    from imgindex.ingest import Progress

    shown = []
    line = ProgressLine(True)
    line.enabled, line.terminal, line.show = True, True, shown.append
    line(Progress(total=5))
    assert "images/s" not in shown[-1]  # nothing measured yet
    line(Progress(total=5, loading_model=True))
    assert shown[-1] == "Loading the model ... (5 files to read)"
    state = Progress(total=5, done=5, embedded=5, model_seconds=0.0)
    line(state)
    assert "images/s" in shown[-1] and "0.0 images/s" not in shown[-1]


def test_get_with_a_path_says_to_use_find(tmp_path):
    from .conftest import FakeVectorizer

    with imgindex_api.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer()) as index:
        with pytest.raises(TypeError, match=r"use Index\.find\(path\)"):
            index.get("photo.jpg")
        with pytest.raises(KeyError):
            index.get(7)


def test_random_bytes_as_weights_are_not_said_to_run_code(tmp_path):
    from imgindex.errors import WeightsError
    from imgindex.weights import read_checkpoint

    junk = tmp_path / "junk.pth"
    for seed in range(30):  # (random bytes fail in several ways inside torch.load)
        junk.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(WeightsError) as refused:
            read_checkpoint(junk)
        message = str(refused.value)
        assert "not a PyTorch checkpoint" in message or "not a loadable" in message, message
        assert "run code" not in message


def test_engine_ray_without_ray_says_how_to_install_it(run, tmp_path, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    index = tmp_path / "idx"
    result = run("build", photos, "--index", index, "--engine", "ray", ok=False)
    assert result.exit_code == 1
    assert "--engine ray needs Ray: pip install 'imgindex[ray]'" in result.stderr
    assert not index.exists()  # refused before an index was created for nothing
