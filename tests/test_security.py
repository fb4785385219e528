"""Issue 12's security part: nothing planted in an index folder is written through, file names
cannot drive the terminal, and an index can be kept private."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import imgindex
import imgindex.store
from imgindex.errors import ImgIndexError
from imgindex.folder import FAISS_NAME, LOCK_NAME
from imgindex.schema import DB_NAME
from imgindex.store import Store

from .conftest import FakeVectorizer, random_image

FINGERPRINT = {"model": "m", "weights_sha256": "a" * 64, "dim": 768, "preprocessing": {"x": 1}}


# -- 8. links planted in the index folder ---------------------------------------------------------


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite me")
    (tmp_path / "idx" / LOCK_NAME).unlink()
    os.symlink(victim, tmp_path / "idx" / LOCK_NAME)
    with pytest.raises(ImgIndexError, match="symbolic link"):
        Store.open(tmp_path / "idx", writable=True)
    reader = Store.open(tmp_path / "idx")
    with pytest.raises(ImgIndexError, match="symbolic link"):
        reader.lock()  # the lock itself refuses it too
    reader.close()
    assert victim.read_text() == "do not overwrite me"


def test_a_lock_file_that_is_a_hard_link_is_refused(tmp_path):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    victim = tmp_path / "idx" / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "idx" / LOCK_NAME).unlink()
    os.link(victim, tmp_path / "idx" / LOCK_NAME)
    with pytest.raises(ImgIndexError, match="hard link"):
        Store.open(tmp_path / "idx", writable=True)
    reader = Store.open(tmp_path / "idx")
    with pytest.raises(ImgIndexError, match="hard link"):
        reader.lock()  # the lock itself refuses it too
    reader.close()
    assert victim.read_text() == "mine"


def test_temporary_files_have_unpredictable_names_and_are_never_written_through(tmp_path):
    """The temporary FAISS file was `.vectors.faiss.<pid>.tmp`, and the pid is in the lock
    file: a link planted under that name was overwritten with FAISS data."""
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite me")
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.lock()
    planted = tmp_path / "idx" / f".{FAISS_NAME}.{os.getpid()}.tmp"
    os.symlink(victim, planted)
    names = []
    real_replace = os.replace

    def replace(src, dst):
        names.append(Path(src).name)
        return real_replace(src, dst)

    imgindex.store.os.replace = replace
    try:
        for _ in range(2):
            store.save_vector_index(force=True)
    finally:
        imgindex.store.os.replace = real_replace
    store.close()
    assert victim.read_text() == "do not overwrite me"
    assert len(set(names)) == 2 and str(os.getpid()) not in "".join(names)


def test_a_database_file_that_is_a_link_is_not_written_through(tmp_path):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    real = tmp_path / "elsewhere.db"
    os.replace(tmp_path / "idx" / DB_NAME, real)
    os.symlink(real, tmp_path / "idx" / DB_NAME)
    with pytest.raises(ImgIndexError, match="symbolic link"):
        Store.open(tmp_path / "idx", writable=True)


def test_an_index_folder_of_another_user_is_not_written_unless_asked(tmp_path, monkeypatch):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    owner = (tmp_path / "idx").stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # as if someone else ran imgindex
    with pytest.raises(ImgIndexError, match="belongs to another user") as refused:
        Store.open(tmp_path / "idx", writable=True)
    assert "IMGINDEX_TRUST_FOLDER=1" in str(refused.value)
    with pytest.raises(ImgIndexError, match="belongs to another user"):
        Store.create(tmp_path / "idx" / "..", FINGERPRINT)
    Store.open(tmp_path / "idx").close()  # reading it is fine
    monkeypatch.setenv("IMGINDEX_TRUST_FOLDER", "1")
    Store.open(tmp_path / "idx", writable=True).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_root_does_not_write_into_a_users_index_folder(tmp_path, run):
    random_image(tmp_path / "pics" / "a.png")
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    os.chown(index, 65534, 65534)  # nobody
    result = run("build", tmp_path / "pics", "--index", index, ok=False)
    assert result.exit_code == 1 and "belongs to another user (uid 65534)" in result.stderr
    assert run("info", "--index", index).exit_code == 0


# -- 9. file names reach the terminal escaped -----------------------------------------------------


def test_control_characters_in_file_names_are_escaped_on_the_terminal(run, tmp_path):
    folder = tmp_path / "pics"
    random_image(folder / "clear\x1b[2Jscreen.png", seed=1)
    random_image(folder / "ok.png", seed=2)
    (folder / "forged\nSkipped 0 file(s).jpg").write_text("not an image")
    index = tmp_path / "idx"
    built = run("build", folder, "--index", index)
    assert "\x1b" not in built.output
    assert "clear\\x1b[2Jscreen.png" not in built.output  # indexed, so not listed at all
    [skip_line] = [line for line in built.stdout.splitlines() if "forged" in line]
    assert "forged\\x0aSkipped 0 file(s).jpg: not an image" in skip_line
    assert not any(line.startswith("Skipped 0") for line in built.stdout.splitlines())
    similar = run("similar", folder / "ok.png", "--index", index)
    assert "\x1b" not in similar.output and "clear\\x1b[2Jscreen.png" in similar.stdout
    info = run("info", "--index", index, "--skipped")
    assert "\n" not in info.stdout.strip() and "forged\\x0a" in info.stdout
    query = run("query", folder / "clear\x1b[2Jscreen.png", "--index", index)
    assert "\x1b" not in query.output
    missing = run("similar", "no\x1b]0;title\x07.png", "--index", index, ok=False)
    assert "\x1b" not in missing.output and "\x07" not in missing.output
    # JSON keeps the names exact (JSON escapes the control characters itself).
    report = json.loads(run("info", "--index", index, "--skipped", "--json").stdout)
    assert [Path(s["path"]).name for s in report["skipped_files"]] == [
        "forged\nSkipped 0 file(s).jpg"
    ]


def test_bidirectional_overrides_are_escaped_in_text_and_in_json(run, tmp_path):
    name = "photo\u202egnp.exe.png"  # reads as "photoexe.png" on a terminal
    random_image(tmp_path / "pics" / name)
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    text = run("similar", "1", "--index", index)
    assert "\u202e" not in text.output and "photo\\u202egnp.exe.png" in text.stdout
    raw = run("similar", "1", "--index", index, "--json").stdout
    assert "\u202e" not in raw and "\\u202e" in raw
    assert Path(json.loads(raw)[0]["query"]).name == name


# -- 10. private index folders --------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_index_folders(tmp_path, run):
    old = os.umask(0o022)
    tmp_path = tmp_path / "shared"
    tmp_path.mkdir()
    os.chmod(tmp_path, 0o755)  # (pytest's own folders are private)
    random_image(tmp_path / "pics" / "a.png")
    try:
        run("build", tmp_path / "pics", "--index", tmp_path / "open" / "idx")
        assert mode(tmp_path / "open" / "idx") == 0o755  # the umask's choice, as documented
        run("build", tmp_path / "pics", "--index", tmp_path / "mine" / "idx", "--private")
        assert mode(tmp_path / "mine" / "idx") == 0o700
        assert mode(tmp_path / "mine") == 0o700  # made for it, so private too
        (tmp_path / "home").mkdir(mode=0o700)
        run("build", tmp_path / "pics", "--index", tmp_path / "home" / "a" / "idx")
        assert mode(tmp_path / "home" / "a" / "idx") == 0o700  # its parent is private
        run("build", tmp_path / "pics", "--index", tmp_path / "open" / "idx", "--private")
        assert mode(tmp_path / "open" / "idx") == 0o700  # an existing index made private
    finally:
        os.umask(old)
    with imgindex.Index.create(
        tmp_path / "api" / "idx", vectorizer=FakeVectorizer(device="cpu"), private=True
    ):
        assert mode(tmp_path / "api" / "idx") == 0o700


# -- found by a second look (an audit of the fixes above) -----------------------------------------


def test_hard_links_pipes_and_folders_among_the_index_files_are_refused(tmp_path):
    Store.create(tmp_path / "idx", FINGERPRINT).close()
    folder = tmp_path / "idx"
    victim = tmp_path / "victim.txt"
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        victim.write_text("mine")
        (folder / name).unlink(missing_ok=True)
        os.link(victim, folder / name)
        with pytest.raises(ImgIndexError, match="hard link"):
            Store.open(folder, writable=True)
        with pytest.raises(ImgIndexError, match="hard link"):
            Store.open(folder)  # a reader too: SQLite writes its shared-memory file
        (folder / name).unlink()
        assert victim.read_text() == "mine"
    os.mkdir(folder / FAISS_NAME)
    with pytest.raises(ImgIndexError, match="not a plain file"):
        Store.open(folder, writable=True)
    os.rmdir(folder / FAISS_NAME)


def test_a_pipe_named_like_the_faiss_file_does_not_hang_a_reader(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    random_image(tmp_path / "pics" / "a.png")
    index = tmp_path / "idx"
    helper = [sys.executable, "-m", "tests.crash_helper", "none", "0", "--"]
    subprocess.run([*helper, "build", str(tmp_path / "pics"), "--index", str(index)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    (index / FAISS_NAME).unlink()
    os.mkfifo(index / FAISS_NAME)
    for command in (["info"], ["similar", "1"], ["check"]):
        done = subprocess.run([*helper, *command, "--index", str(index)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "Traceback" not in done.stderr
    assert "not a plain file" in done.stdout  # check says what the file is


def test_a_folder_named_like_a_temporary_file_does_not_stop_writers(tmp_path):
    store = Store.create(tmp_path / "idx", FINGERPRINT)
    store.close()
    os.mkdir(tmp_path / "idx" / f".{FAISS_NAME}.deadbeef.tmp")
    store = Store.open(tmp_path / "idx", writable=True)
    store.lock()  # used to fail: "Is a directory", for every writer
    store.save_vector_index(force=True)
    assert store.check(check_files=False).warnings == []  # nor is it a leftover of ours
    store.close()


def test_a_folder_anyone_may_write_is_refused_and_ours_never_are(tmp_path, run):
    random_image(tmp_path / "pics" / "a.png")
    old = os.umask(0)
    try:
        run("build", tmp_path / "pics", "--index", tmp_path / "new" / "idx")
        assert mode(tmp_path / "new" / "idx") & 0o002 == 0  # not world-writable, umask 000
        os.chmod(tmp_path / "new" / "idx", 0o777)
        refused = run("build", tmp_path / "pics", "--index", tmp_path / "new" / "idx", ok=False)
        assert refused.exit_code == 1 and "anyone may write the index folder" in refused.stderr
    finally:
        os.umask(old)


def test_undecodable_bytes_of_a_name_are_shown_escaped(run, tmp_path):
    """A name that is not UTF-8 comes from the command line as lone surrogates, which would be
    printed as the raw bytes again: 0x9b is an 8-bit CSI."""
    random_image(tmp_path / "pics" / "a.png")
    name = os.path.join(os.fsencode(tmp_path / "pics"), b"c1\x9b2J.png")
    with open(name, "wb") as fh:
        fh.write((tmp_path / "pics" / "a.png").read_bytes())
    index = tmp_path / "idx"
    run("build", tmp_path / "pics", "--index", index)
    query = run("query", os.fsdecode(name), "--index", index)
    assert "c1\\x9b2J.png" in query.stdout and "\udc9b" not in query.stdout
    assert "\x9b" not in query.stdout_bytes.decode("utf-8", "replace")
    digits = run("similar", "\u0661", "--index", index, ok=False)  # Arabic-Indic one: no id
    assert "not in the index" in digits.stderr


def test_csv_on_a_terminal_is_escaped(tmp_path):
    import shutil
    import subprocess
    import sys

    from .conftest import ROOT

    if shutil.which("script") is None:
        pytest.skip("no `script` to give the command a terminal")
    random_image(tmp_path / "pics" / "a\x1b[2J.png", seed=1)
    (tmp_path / "pics" / "b.png").write_bytes((tmp_path / "pics" / "a\x1b[2J.png").read_bytes())
    index = tmp_path / "idx"
    helper = [sys.executable, "-m", "tests.crash_helper", "none", "0", "--"]
    subprocess.run([*helper, "build", str(tmp_path / "pics"), "--index", str(index)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    command = " ".join([*helper, "duplicates", "--csv", "--index", str(index)])
    on_terminal = subprocess.run(["script", "-qc", command, "/dev/null"], cwd=ROOT,
                                 capture_output=True, timeout=60).stdout  # fmt: skip
    assert b"\x1b" not in on_terminal and b"a\\x1b[2J.png" in on_terminal
    piped = subprocess.run([*helper, "duplicates", "--csv", "--index", str(index)], cwd=ROOT,
                           capture_output=True, timeout=60).stdout  # fmt: skip
    assert b"a\x1b[2J.png" in piped  # exact for a file or a pipe
