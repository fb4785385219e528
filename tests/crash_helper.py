"""Run the imgindex CLI in a child process with the fast stand-in network and, optionally, a pause
at a chosen moment of a write, so that a test can kill it there with SIGKILL.

    python -m tests.crash_helper [--real] PAUSE_AT N -- imgindex arguments...

PAUSE_AT names the moment (see POINTS); the child prints ``PAUSED <point>`` on stdout when it
gets there for the N-th time and then sleeps (for a minute, or PAUSE_SECONDS from the
environment, after which it carries on). ``none`` never pauses. ``--real`` keeps the real AugNet.
SLOW_COMMITS=SECONDS in the environment makes every commit take that much longer.
The production code has no hooks for this: the helper wraps the functions it needs.
"""

from __future__ import annotations

import os
import sys
import time

import imgindex.ann
import imgindex.index
import imgindex.model
import imgindex.store as store_module
from imgindex.cli import main as cli_main

POINTS = {
    "before-commit": "a batch is embedded; its transaction has not begun",
    "in-transaction": "inside a batch's transaction, after some rows were inserted",
    "after-commit": "a batch's transaction has committed; the FAISS file is not yet saved",
    "faiss-partial": "half of the new FAISS file is written to its temporary name",
    "faiss-replaced": "the new FAISS file has been renamed into place",
    "in-remove": "inside the transaction removing the entries of deleted files",
    "in-rename": "inside the transaction moving an entry to its new path",
}


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    time.sleep(float(os.environ.get("PAUSE_SECONDS", "60")))


def install(point: str, nth: int) -> None:
    seen = {"n": 0}

    def arrive(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == nth:
                pause(name)

    original_write = store_module.Store.write_batch

    def write_batch(self, images, vectors, skipped=()):
        if len(images):
            arrive("before-commit")
        ids = original_write(self, images, vectors, skipped)
        if len(images):
            arrive("after-commit")
            time.sleep(float(os.environ.get("SLOW_COMMITS", "0")))
        return ids

    store_module.Store.write_batch = write_batch

    original_connect = store_module._connect

    def connect(path, *args, **kwargs):
        db = original_connect(path, *args, **kwargs)
        execute = db.execute

        def traced(sql, *args, **kwargs):
            result = execute(sql, *args, **kwargs)
            if sql.startswith("INSERT INTO vectors"):
                arrive("in-transaction")
            elif sql.startswith("DELETE FROM images WHERE id IN"):
                arrive("in-remove")
            elif sql.startswith("UPDATE images SET path"):
                arrive("in-rename")
            return result

        db.execute = traced
        return db

    store_module._connect = connect

    original_write_temporary = imgindex.ann.write_temporary

    def write_temporary(faiss_module, index, target):
        temp, digest = original_write_temporary(faiss_module, index, target)
        if point == "faiss-partial":
            data = temp.read_bytes()
            with open(temp, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            arrive("faiss-partial")
            temp.write_bytes(data)
        return temp, digest

    imgindex.ann.write_temporary = write_temporary

    original_replace = os.replace

    def replace(src, dst):
        original_replace(src, dst)
        if str(dst).endswith(store_module.FAISS_NAME):
            arrive("faiss-replaced")

    store_module.os.replace = replace


def main() -> None:
    args = sys.argv[1:]
    real = args[:1] == ["--real"]
    if real:
        args = args[1:]
    point, nth, separator, *cli_args = args
    assert separator == "--", "usage: crash_helper [--real] POINT N -- ARGS"
    assert point == "none" or point in POINTS, f"unknown point {point}"
    install(point, int(nth))
    if not real:
        from tests.conftest import FakeVectorizer

        imgindex.index.Vectorizer = FakeVectorizer
        imgindex.model.Vectorizer = FakeVectorizer
    sys.argv = ["imgindex", *cli_args]
    cli_main()


if __name__ == "__main__":
    main()
