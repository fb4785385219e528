"""imgindex export / import: a round trip keeps every vector bit for bit, and vectors of other
weights or another preset are refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

import imgindex
from imgindex.catalog import NewImage

from .conftest import FakeVectorizer


def test_export_then_import_round_trips_every_vector_bit_for_bit(run, photos, tmp_path):
    run("build", photos, "--index", tmp_path / "a")
    out = tmp_path / "a.parquet"
    run("export", out, "--index", tmp_path / "a")
    table = pq.read_table(out)
    assert table.column_names == ["path", "sha256", "size", "mtime", "width", "height", "vector"]
    vector_type = table.schema.field("vector").type
    assert vector_type.list_size == 768 and str(vector_type.value_type) == "float"
    meta = json.loads(table.schema.metadata[b"imgindex"])
    with imgindex.Index.open(tmp_path / "a") as a:
        assert meta["weights_sha256"] == a.fingerprint()["weights_sha256"]
        assert meta["preprocessing"]["preset"] == "exact"
        fingerprint = a.fingerprint()
        before = {r.path: (r.sha256, r.size, r.width, r.height) for r in a.records()}
        vectors_a = {r.path: a.vectors([r.id])[0] for r in a.records()}
    done = run("import", out, "--index", tmp_path / "b", "--json")
    assert json.loads(done.stdout)["rows"] == len(before)
    # (Opened with the stand-in network that made the vectors: check compares the weights.)
    with imgindex.Index.open(tmp_path / "b", vectorizer=FakeVectorizer(device="cpu")) as b:
        assert b.fingerprint() == fingerprint
        after = {r.path: (r.sha256, r.size, r.width, r.height) for r in b.records()}
        assert after == before
        for record in b.records():
            got = b.vectors([record.id])[0]
            assert got.tobytes() == vectors_a[record.path].tobytes()  # bit for bit
        assert b.check(check_files=False).problems == []
        assert b.similar(b.records()[0].id, k=1)  # the FAISS index was built
    run("import", out, "--index", tmp_path / "b")  # again: the entries are replaced, not doubled
    with imgindex.Index.open(tmp_path / "b") as b:
        assert b.count() == len(before)


def test_import_refuses_vectors_of_other_weights_and_a_file_without_metadata(run, photos, tmp_path):
    run("build", photos, "--index", tmp_path / "a")
    with imgindex.Index.open(tmp_path / "a") as a:
        other = {**a.fingerprint(), "weights_sha256": "1" * 64}
        indexed = a.count()
    with imgindex.Index.create(tmp_path / "other", fingerprint=other) as o:
        o.add_vectors([NewImage(photos / "x.jpg", "2" * 64, 1, 0.0, 4, 3)], np.ones((1, 768)))
    run("export", tmp_path / "other.parquet", "--index", tmp_path / "other")
    refused = run("import", tmp_path / "other.parquet", "--index", tmp_path / "a", ok=False)
    assert refused.exit_code == 1 and "weights_sha256 111111111111" in refused.stderr
    assert "cannot be mixed" in refused.stderr
    run("export", tmp_path / "a.parquet", "--index", tmp_path / "a")
    mixed = run("import", tmp_path / "a.parquet", tmp_path / "other.parquet",
                "--index", tmp_path / "new", ok=False)  # fmt: skip
    assert mixed.exit_code == 1 and "cannot be mixed" in mixed.stderr
    assert imgindex.Index.state(tmp_path / "new") == "none"  # nothing was created
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(tmp_path / "a.parquet").replace_schema_metadata({}), plain)
    bare = run("import", plain, "--index", tmp_path / "a", ok=False)
    assert bare.exit_code == 1 and "has no imgindex metadata" in bare.stderr
    with imgindex.Index.open(tmp_path / "a") as a:
        assert a.count() == indexed  # nothing lost, nothing added


def test_a_file_with_a_broken_vector_is_refused_by_name_and_nothing_of_it_is_indexed(
    run, photos, tmp_path
):
    import pyarrow as pa

    run("build", photos, "--index", tmp_path / "a")
    run("export", tmp_path / "a.parquet", "--index", tmp_path / "a")
    table = pq.read_table(tmp_path / "a.parquet")
    flat = table.column("vector").combine_chunks().flatten().to_numpy().copy()
    flat[5] = np.nan
    broken = table.set_column(
        table.column_names.index("vector"),
        table.schema.field("vector"),
        pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 768),
    )
    pq.write_table(broken, tmp_path / "broken.parquet")
    refused = run("import", tmp_path / "broken.parquet", "--index", tmp_path / "b", ok=False)
    assert refused.exit_code == 1 and "broken.parquet" in refused.stderr
    assert "NaN" in refused.stderr
    with imgindex.Index.open(tmp_path / "b") as b:
        assert b.count() == 0  # the batch was one transaction: none of it went in
