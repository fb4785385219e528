"""The web app's JSON API, in process (Starlette's TestClient): its answers equal the library's
and the command line's, every error is JSON with the right status, and hostile requests (other
hosts, other sites, paths, tokens, huge or false uploads) are refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgindex
import imgindex.catalog
import imgindex.store

from .conftest import DATA, FakeVectorizer, random_image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient

from imgindex.server import ServeSettings, create_app

BASE = "http://127.0.0.1:8000"


@pytest.fixture
def collection(tmp_path):
    """data/pizza and data/bonsai, with an exact copy and a resized copy (duplicates)."""
    folder = tmp_path / "pics"
    for name in ("pizza", "bonsai"):
        shutil.copytree(DATA / name, folder / name)
    shutil.copy(folder / "pizza" / "image_0001.jpg", folder / "pizza" / "copy.jpg")
    return folder


@pytest.fixture
def index(tmp_path, collection):
    path = tmp_path / "idx"
    with imgindex.Index.create(path, vectorizer=FakeVectorizer(device="cpu")) as created:
        created.sync(collection)
    opened = imgindex.Index.open(path, vectorizer=FakeVectorizer(device="cpu"))
    yield opened
    opened.close()


@pytest.fixture
def client(index):
    return TestClient(create_app(index, ServeSettings()), base_url=BASE)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming a huge size, with no pixels behind it (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# -- answers equal the library's and the command line's -------------------------------------------


def test_search_by_id_equals_similar(client, index, run, tmp_path):
    record = index.find(tmp_path / "pics" / "pizza" / "image_0002.jpg")
    [answer] = client.get(f"/api/search?id={record.id}&k=5").json()
    expected = index.similar(record.id, k=5)
    assert [r["id"] for r in answer["results"]] == [h.id for h in expected]
    assert [r["distance"] for r in answer["results"]] == [h.score for h in expected]
    assert answer["query"] == record.path
    cli = json.loads(run("similar", record.id, "--index", index.path, "-k", "5", "--json").stdout)
    assert [r["id"] for r in cli[0]["results"]] == [r["id"] for r in answer["results"]]
    cosine = client.get(f"/api/search?id={record.id}&k=3&metric=cosine").json()[0]
    assert [r["similarity"] for r in cosine["results"]] == [
        h.score for h in index.similar(record.id, k=3, metric="cosine")
    ]


def test_search_by_upload_equals_query(client, index, run, collection):
    photo = collection / "bonsai" / "image_0003.jpg"
    response = client.post("/api/search", files={"image": ("b.jpg", photo.read_bytes())},
                           data={"k": "4"})  # fmt: skip
    assert response.status_code == 200, response.text
    [answer] = response.json()
    expected = index.search(photo, k=4)
    got = [(r["id"], r["distance"]) for r in answer["results"]]
    assert got == [(h.id, h.score) for h in expected]
    cli = json.loads(run("query", photo, "--index", index.path, "-k", "4", "--json").stdout)
    assert [r["id"] for r in cli[0]["results"]] == [r["id"] for r in answer["results"]]
    # The upload can be searched again by its reference (a bookmarked page of it).
    [again] = client.get(f"/api/search?like=u:{answer['upload']}&k=4").json()
    assert again["results"] == answer["results"] and again["query"] == "b.jpg"
    thumb = client.get(f"/api/uploads/{answer['upload']}/thumbnail")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] <= 256


def test_like_and_unlike_equal_search_like(client, index, collection):
    a = index.find(collection / "pizza" / "image_0003.jpg").id
    b = index.find(collection / "pizza" / "image_0004.jpg").id
    c = index.find(collection / "bonsai" / "image_0001.jpg").id
    [answer] = client.get(f"/api/search?like={a},{b}&unlike={c}&k=6").json()
    expected = index.search_like([a, b], [c], k=6)
    assert [r["id"] for r in answer["results"]] == [h.id for h in expected]
    assert not {a, b, c} & {r["id"] for r in answer["results"]}  # examples are left out
    assert answer["like"] and answer["unlike"] == [index.get(c).path]
    pizza, bonsai = collection / "pizza", collection / "bonsai"
    files = [
        ("image", ("1.jpg", (pizza / "image_0003.jpg").read_bytes())),
        ("image", ("2.jpg", (pizza / "image_0004.jpg").read_bytes())),
        ("unlike", ("3.jpg", (bonsai / "image_0001.jpg").read_bytes())),
    ]
    [uploaded] = client.post("/api/search", files=files, data={"k": "6"}).json()
    embedded = index.search_like(
        [collection / "pizza" / "image_0003.jpg", collection / "pizza" / "image_0004.jpg"],
        [collection / "bonsai" / "image_0001.jpg"], k=6,
    )  # fmt: skip
    assert [r["id"] for r in uploaded["results"]] == [h.id for h in embedded]


def test_records_thumbnails_files_browse_and_folders(client, index, collection):
    record = index.find(collection / "bonsai" / "image_0002.jpg")
    body = client.get(f"/api/images/{record.id}").json()
    assert body["path"] == record.path and body["width"] == record.width
    thumb = client.get(f"/api/images/{record.id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumb.content))
    assert max(picture.size) == 256 or max(picture.size) == max(record.width, record.height)
    original = client.get(f"/api/images/{record.id}/file")
    assert original.content == (collection / "bonsai" / "image_0002.jpg").read_bytes()
    assert original.headers["content-type"] == "image/jpeg"
    page = client.get("/api/images?limit=5&order=path").json()
    assert page["total"] == index.count() and len(page["images"]) == 5
    assert [i["path"] for i in page["images"]] == sorted(r.path for r in index.records())[:5]
    newest = client.get("/api/images?limit=3").json()["images"]
    assert [i["id"] for i in newest] == sorted((r.id for r in index.records()), reverse=True)[:3]
    folders = {f["path"]: f["count"] for f in client.get("/api/folders").json()["folders"]}
    assert folders == {str(collection / "bonsai"): 6, str(collection / "pizza"): 7}
    under = client.get("/api/images", params={"under": str(collection / "bonsai")}).json()
    assert under["total"] == 6
    hits = client.get("/api/search", params={"id": record.id, "under": str(collection / "pizza")})
    assert all("/pizza/" in r["path"] for r in hits.json()[0]["results"])


def test_duplicate_decisions_are_kept_and_exported(client, index, collection):
    groups = client.get("/api/duplicates?threshold=0.5").json()["groups"]
    assert [sorted(os.path.basename(i["path"]) for i in g["images"]) for g in groups] == [
        ["copy.jpg", "image_0001.jpg"]
    ]
    ids = [i["id"] for i in groups[0]["images"]]
    keep = index.find(collection / "pizza" / "image_0001.jpg").id
    decided = client.post("/api/reviews", json={"ids": ids, "keep": keep})
    assert decided.status_code == 200, decided.text
    assert client.get("/api/duplicates?threshold=0.5").json()["groups"] == []  # not back
    shown = client.get("/api/duplicates?threshold=0.5&all=1").json()["groups"]
    assert shown[0]["reviewed"] and any(i.get("marked_for_removal") for i in shown[0]["images"])
    [marked] = client.get("/api/reviews").json()["marked_for_removal"]
    assert marked["path"].endswith("copy.jpg") and marked["keep_id"] == keep
    csv_text = client.get("/api/reviews/export.csv").text
    assert csv_text.splitlines()[1].endswith(f"copy.jpg,{keep},{index.get(keep).path}")
    assert "attachment" in client.get("/api/reviews/export.json").headers["content-disposition"]
    with imgindex.Index.open(index.path) as other:  # stored in the index: the CLI sees it too
        assert other.duplicates(0.5) == []
    assert client.post("/api/reviews/undo", json={"ids": [keep]}).json()["forgotten"] >= 1
    assert len(client.get("/api/duplicates?threshold=0.5").json()["groups"]) == 1
    different = client.post("/api/reviews", json={"ids": ids, "keep": None})
    assert (
        different.status_code == 200
        and client.get("/api/duplicates?threshold=0.5").json()["groups"] == []
    )


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, status",
    [("id=1&k=0", 400), ("id=1&k=100000", 400), ("id=1&k=abc", 400), ("id=1&metric=manhattan", 400),
     ("id=99999", 404), ("like=../etc", 400), ("", 400), ("id=1&cutoff=nan", 400),
     ("like=u:nosuchupload", 404)],
)  # fmt: skip
def test_bad_searches_are_json_errors(client, query, status):
    response = client.get(f"/api/search?{query}")
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json" and response.json()["error"]


def test_bad_uploads_are_refused_quickly(client):
    not_image = client.post("/api/search", files={"image": ("x.jpg", b"<html>not a picture")})
    assert not_image.status_code == 400 and "x.jpg" in not_image.json()["error"]
    started = time.perf_counter()
    bomb = client.post("/api/search", files={"image": ("bomb.png", png_claiming(60000, 60000))})
    assert bomb.status_code == 400 and "over the limit" in bomb.json()["error"]
    assert time.perf_counter() - started < 5  # refused from the header, never decoded
    empty = client.post("/api/search", files={"image": ("e.jpg", b"")})
    assert empty.status_code == 400
    nothing = client.post("/api/search", data={"k": "3"})
    assert nothing.status_code == 400 and "no image" in nothing.json()["error"]


def test_upload_limits(index, collection):
    settings = ServeSettings(max_upload_bytes=50_000, max_files=2)
    client = TestClient(create_app(index, settings), base_url=BASE)
    big = client.post("/api/search", files={"image": ("big.png", os.urandom(200_000))})
    assert big.status_code == 413
    small = (collection / "pizza" / "image_0002.jpg").read_bytes()[:20_000]
    many = client.post("/api/search", files=[("image", (f"{n}.jpg", small)) for n in range(3)])
    assert many.status_code == 400, many.text
    assert "Too many files" in many.json()["error"] or "at most 2" in many.json()["error"]
    too_long = client.post("/api/search", content=b"x" * 2_000_000,
                           headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert too_long.status_code == 413


def test_unknown_images_and_missing_files(client, index, collection):
    assert client.get("/api/images/99999").status_code == 404
    assert client.get("/api/images/99999/thumbnail").status_code == 404
    record = index.find(collection / "bonsai" / "image_0004.jpg")
    (collection / "bonsai" / "image_0004.jpg").unlink()
    thumb = client.get(f"/api/images/{record.id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert "file not found" in thumb.headers["x-imgindex-problem"]
    gone = client.get(f"/api/images/{record.id}/file")
    assert gone.status_code == 404 and "gone" in gone.json()["error"]


def test_writes_while_read_only_or_locked_are_refused_with_the_reason(
    client, index, monkeypatch, collection
):
    ids = [index.find(collection / "pizza" / n).id for n in ("image_0001.jpg", "copy.jpg")]
    real_access = os.access

    def no_writing(path, mode):
        return False if mode == os.W_OK else real_access(path, mode)

    monkeypatch.setattr(imgindex.store.os, "access", no_writing)  # a read-only folder
    read_only = client.post("/api/reviews", json={"ids": ids, "keep": ids[0]})
    assert read_only.status_code == 409 and "cannot be written" in read_only.json()["error"]
    monkeypatch.undo()
    assert client.get(f"/api/search?id={ids[0]}").status_code == 200  # still serving
    with imgindex.Index.open(index.path) as writer, writer.write_lock():  # as a build holds it
        locked = client.post("/api/reviews", json={"ids": ids, "keep": ids[0]})
    assert locked.status_code == 423 and "writing to this index" in locked.json()["error"]


def test_bad_review_requests(client):
    assert client.post("/api/reviews", json={"ids": "1,2"}).status_code == 400
    assert client.post("/api/reviews", json={"ids": [1], "keep": 1}).status_code == 400
    assert client.post("/api/reviews", json={"ids": [1, 99999], "keep": 1}).status_code == 404
    assert client.post("/api/reviews", content=b"ids=1", headers={
        "content-type": "application/x-www-form-urlencoded"}).status_code == 415  # fmt: skip
    assert client.get("/api/reviews/export.exe").status_code == 404


# -- hostile requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/1/../../imgindex.db",
     "/static/../imgindex.db", "/static/%2e%2e%2fimgindex.db", "/static/..%2f..%2fetc%2fpasswd",
     "/api/images//etc/passwd/file", "/static/index.html", "/imgindex.db", "/vectors.faiss",
     "/api/images/-1/file", "/api/images/1e3/file", "/thumbnails/"],
)  # fmt: skip
def test_no_request_path_reaches_the_file_system(client, path, monkeypatch):
    opened = []
    real_open = open

    def watch(file, *args, **kwargs):
        opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    response = client.get(path)
    assert response.status_code in (400, 404), (path, response.status_code)
    assert not [f for f in opened if "passwd" in f or f.endswith(("imgindex.db", ".faiss"))]


def test_folder_filters_never_look_at_the_disk(client, monkeypatch):
    import imgindex.files

    def refuse(path):
        raise AssertionError(f"the file system was asked about {path}")

    monkeypatch.setattr(imgindex.files, "resolve", refuse)
    monkeypatch.setattr(imgindex.catalog, "resolve", refuse)
    assert client.get("/api/images", params={"under": "/etc/../../"}).json()["total"] == 0
    assert client.get("/api/search", params={"id": 1, "under": "/"}).status_code == 200
    assert client.get("/api/duplicates", params={"under": "/nowhere"}).status_code == 200


def test_a_file_swapped_for_a_link_to_a_secret_is_not_served(client, index, collection, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2")
    victim = collection / "bonsai" / "image_0005.jpg"
    record = index.find(victim)
    victim.unlink()
    os.symlink(secret, victim)
    response = client.get(f"/api/images/{record.id}/file")
    assert response.status_code == 409 and "hunter2" not in response.text


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1:9999", "localhost.evil.example:8000",
                                  "", "127.0.0.1:8000@evil"])  # fmt: skip
def test_other_host_headers_are_refused(client, host):
    response = client.get("/api/info", headers={"host": host})
    assert response.status_code == 400 and "Host" in response.json()["error"]


def test_loopback_names_are_accepted(client):
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host


def test_requests_from_other_sites_are_refused(client, index, collection):
    ids = [index.find(collection / "pizza" / n).id for n in ("image_0001.jpg", "copy.jpg")]
    review = {"ids": ids, "keep": ids[0]}
    evil = client.post("/api/reviews", json=review, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403
    framed = client.get(f"/api/images/{ids[0]}/thumbnail", headers={"sec-fetch-site": "cross-site"})
    assert framed.status_code == 403  # another page may not even embed the user's images
    sibling = client.post("/api/reviews", json=review, headers={"sec-fetch-site": "same-site"})
    assert sibling.status_code == 403  # another server on localhost is another site
    assert index.marked_for_removal() == []
    ours = client.post("/api/reviews", json=review,
                       headers={"origin": BASE, "sec-fetch-site": "same-origin"})  # fmt: skip
    assert ours.status_code == 200
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cross-origin-resource-policy"] == "same-origin"


def test_a_token_is_required_on_every_request_when_set(index):
    settings = ServeSettings(host="0.0.0.0", token="s3cret-token", allowed_hosts=("photos.lan",))
    client = TestClient(create_app(index, settings), base_url="http://photos.lan:8000")
    assert client.get("/api/info").status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/api/images/1/thumbnail").status_code == 401
    good = client.get("/api/info", headers={"authorization": "Bearer s3cret-token"})
    assert good.status_code == 200
    entry = client.get("/?token=s3cret-token", follow_redirects=False)
    assert entry.status_code == 303 and entry.headers["location"] == "/"
    assert (
        "HttpOnly" in entry.headers["set-cookie"]
        and "SameSite=Strict" in entry.headers["set-cookie"]
    )
    fresh = TestClient(create_app(index, settings), base_url="http://photos.lan:8000")
    fresh.cookies.set("imgindex_token_8000", "s3cret-token")
    assert fresh.get("/api/info").status_code == 200  # the page's cookie, named for its port
    fresh.cookies.set("imgindex_token_8000", "another-servers-token")
    entry = fresh.get("/?token=s3cret-token", follow_redirects=False)
    assert entry.status_code == 303  # the URL's token wins over a stale cookie


def test_the_page_and_its_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "imgindex" in page.text and "/static/app.js" in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript"
    )
    assert "innerHTML" not in script.text  # file names are set as text, never parsed as HTML


def test_the_server_sees_a_build_in_another_process(client, index, tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    for i in range(12):
        random_image(tmp_path / "more" / f"{i}.png", size=(40, 30), seed=i)
    before = client.get("/api/info").json()["images"]
    build = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_helper", "none", "0", "--", "add",
         str(tmp_path / "more"), "--index", str(index.path), "--batch-size", "2"],
        cwd=ROOT, env={**os.environ, "SLOW_COMMITS": "0.1"}, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen = set()
    while build.poll() is None:
        seen.add(client.get("/api/info").json()["images"])
        assert client.get("/api/search?id=1&k=3").status_code == 200
        time.sleep(0.05)
    assert build.returncode == 0, build.stderr.read()
    assert client.get("/api/info").json()["images"] == before + 12
    assert len(seen) >= 2  # it saw the build's batches as they were committed


def test_a_vector_example_and_the_index_api(index, collection):
    """Index.search_like takes ids, records, files and vectors alike."""
    record = index.find(collection / "pizza" / "image_0002.jpg")
    vector = index.vectors([record.id])[0]
    by_vector = index.search_like([vector], k=3)
    by_id = index.search_like([record.id], k=4)
    assert by_vector[0].id == record.id and by_vector[0].score == 0.0
    assert record.id not in [h.id for h in by_id]  # an indexed example is left out
    assert [h.id for h in by_vector[1:]] == [h.id for h in by_id[:2]]
    assert np.isfinite([h.score for h in by_id]).all()


# -- the server as a real process -----------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index_path: Path, *extra: str) -> tuple[object, str]:
    """`imgindex serve` in a child process (the stand-in network): the process and its URL."""
    import subprocess
    import sys

    from .conftest import ROOT

    port = free_port()
    command = [sys.executable, "-m", "tests.crash_helper", "none", "0", "--", "serve",
               "--index", str(index_path), "--port", str(port), *extra]  # fmt: skip
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    line = child.stdout.readline()
    assert line.startswith("Serving "), line + child.stderr.read()
    return child, line.split(" at ", 1)[1].strip()


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(index):
    import signal
    import urllib.request

    child, url = start_server(index.path)
    try:
        assert url == url.split("?")[0] and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            assert json.loads(response.read())["images"] == index.count()
    finally:
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "Stopped." in out and "Traceback" not in err


def test_serve_on_another_address_prints_a_token_and_requires_it(index):
    import signal
    import urllib.error
    import urllib.request

    child, url = start_server(index.path, "--host", "0.0.0.0")
    try:
        assert "?token=" in url
        token = url.split("?token=", 1)[1]
        base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/info", timeout=30)
        assert refused.value.code == 401
        request = urllib.request.Request(base + "api/info",
                                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        child.send_signal(signal.SIGINT)
        child.communicate(timeout=30)


def test_one_unreadable_upload_does_not_cost_the_others_their_answers(client, collection):
    good = (collection / "pizza" / "image_0002.jpg").read_bytes()
    files = [("image", ("good.jpg", good)), ("image", ("bad.jpg", b"not a picture"))]
    answers = client.post("/api/search", files=files, data={"k": "2"}).json()
    assert [a["query"] for a in answers] == ["good.jpg", "bad.jpg"]
    assert len(answers[0]["results"]) == 2 and "not an image" in answers[1]["error"]
    combined = client.post("/api/search", files=files, data={"combine": "1"})
    assert combined.status_code == 400 and "bad.jpg" in combined.json()["error"]


def test_a_port_in_use_is_one_line(run, index):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--index", index.path, "--port", port, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.stderr.strip()
        == f"Error: cannot listen on 127.0.0.1:{port} (Address already in use)"
    )


@pytest.mark.parametrize(
    "method, path, body",
    [("get", "/api/images/99999999999999999999", None),
     ("get", "/api/images/99999999999999999999/thumbnail", None),
     ("get", "/api/search?id=99999999999999999999", None),
     ("get", "/api/search?like=1,99999999999999999999", None),
     ("post", "/api/reviews", {"ids": [99999999999999999999, 1], "keep": None}),
     ("post", "/api/reviews", {"ids": [1, 2], "keep": 99999999999999999999}),
     ("post", "/api/reviews/undo", {"ids": [99999999999999999999]}),
     ("post", "/api/reviews", {"ids": list(range(1, 5000)), "keep": None})],
)  # fmt: skip
def test_absurd_ids_are_client_errors(client, method, path, body):
    response = client.post(path, json=body) if method == "post" else client.get(path)
    assert response.status_code in (400, 404), (path, response.status_code, response.text)
    assert response.json()["error"]


def test_json_nested_too_deeply_is_a_client_error(client):
    deep = "[" * 100_000 + "]" * 100_000
    response = client.post("/api/reviews", content=deep,
                           headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400


def test_a_thumbnail_shows_only_the_indexed_content(client, index, collection, tmp_path):
    """A file swapped for a link to a picture elsewhere: the server must not show that one."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), (250, 0, 250)).save(secret)
    victim = collection / "bonsai" / "image_0006.jpg"
    record = index.find(victim)
    victim.unlink()
    os.symlink(secret, victim)
    thumb = client.get(f"/api/images/{record.id}/thumbnail")
    assert thumb.headers["content-type"] == "image/png"  # a placeholder
    assert "changed since it was indexed" in thumb.headers["x-imgindex-problem"]


def test_a_wildcard_address_answers_for_this_machines_addresses(index):
    from imgindex.server import local_addresses

    settings = ServeSettings(host="0.0.0.0", token="s3cret-token-123")
    client = TestClient(create_app(index, settings), base_url=BASE)
    for address in local_addresses():
        host = f"[{address}]:8000" if ":" in address else f"{address}:8000"
        headers = {"host": host, "authorization": "Bearer s3cret-token-123"}
        response = client.get("/api/info", headers=headers)
        assert response.status_code == 200, host


def test_tokens_that_cannot_go_into_a_url_are_refused(run, index):
    result = run("serve", "--index", index.path, "--host", "0.0.0.0", "--token", "a+b c", ok=False)
    assert result.exit_code == 2 and "at least 16 letters" in result.stderr
