"""``imgindex serve``: a web page and a JSON API over one index, for one person's machine.

The server reads a user's files, so every request is treated as hostile:

* it listens on 127.0.0.1 unless told otherwise, and on any other address only with an access
  token, required on every request (``Authorization: Bearer``, or the cookie the page's URL
  sets);
* the ``Host`` header must name the address it serves (a DNS-rebinding page cannot reach it),
  and a request from another site is refused (``Origin``, ``Sec-Fetch-Site``), so another page
  can neither change decisions nor embed the user's images;
* no path from a request reaches the file system: images are served by id, from the paths the
  index holds; the page's own files by name from a fixed list; folder filters are matched
  against the index's names, never looked up on disk;
* uploads are capped in bytes, files and pixels (from the header, before decoding).

It is a client of :class:`~imgindex.Index` like any other, through its public API: one Index,
whose model is loaded once, serves every request (its methods take turns; embedding runs in
parallel), and sees what a build in another process commits.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import hmac
import io
import json
import os
import secrets
import socket
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from imgindex.decode import DEFAULT_MAX_PIXELS
from imgindex.duplicates import DEFAULT_THRESHOLDS
from imgindex.errors import ImageError, ImgIndexError, IndexLockedError
from imgindex.index import Index
from imgindex.search import check_metric
from imgindex.thumbnails import THUMBNAIL_SIZE, render

MAX_UPLOAD_BYTES = 50 << 20
MAX_FILES = 16
MAX_K = 500
MAX_IDS = 1000  # images in one decision
MAX_ID = 2**63 - 1  # SQLite's largest integer
UPLOADS_AT_ONCE = 4  # uploads embedded at the same time (each holds its bytes and pixels)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The page's own files: the only names the server maps to files, and not from a request path.
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


@dataclass
class ServeSettings:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required on every request when set
    allowed_hosts: tuple[str, ...] = ()  # more names the Host header may give
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_files: int = MAX_FILES
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    def host_names(self) -> set[str]:
        """What the Host header may say (without the port): the address served, the loopback
        names, names given; for a wildcard address, this machine's names and addresses."""
        names = {"127.0.0.1", "localhost", "[::1]", *self.allowed_hosts}
        names.add(f"[{self.host}]" if ":" in self.host else self.host)
        if self.host in ("0.0.0.0", "::"):
            hostname = socket.gethostname()
            names |= {hostname, socket.getfqdn(), *local_addresses()}
            with contextlib.suppress(OSError):
                names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
        return {f"[{n}]" if ":" in n and not n.startswith("[") else n.lower() for n in names}


def local_addresses() -> set[str]:
    """This machine's own addresses on its networks, as the routing table gives them (a UDP
    socket connected to an outside address: nothing is sent)."""
    found = set()
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            found.add(probe.getsockname()[0])
    return found


def new_token() -> str:
    return secrets.token_urlsafe(24)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _TooLarge(Exception):
    pass


# -- uploaded query images ------------------------------------------------------------------


@dataclass
class Upload:
    name: str
    vector: np.ndarray
    thumbnail: bytes


class Uploads:
    """The last uploaded query images, by a random reference, so that a result page of an
    upload can be bookmarked while the server runs (its URL holds the reference)."""

    def __init__(self, keep: int = 200):
        self._items: collections.OrderedDict[str, Upload] = collections.OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def add(self, upload: Upload) -> str:
        ref = secrets.token_urlsafe(9)
        with self._lock:
            self._items[ref] = upload
            while len(self._items) > self._keep:
                self._items.popitem(last=False)
        return ref

    def get(self, ref: str) -> Upload:
        with self._lock:
            upload = self._items.get(ref)
        if upload is None:
            raise ApiError(404, f"no uploaded image {ref!r} (the server was restarted?)")
        return upload


# -- the application ------------------------------------------------------------------------


def create_app(index: Index, settings: ServeSettings | None = None) -> Any:
    """The ASGI application serving ``index`` (Starlette, behind the guard of the module's
    docstring)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    settings = settings or ServeSettings()
    api = _Api(index, settings)
    routes = [
        Route("/", api.page),
        Route("/static/{name}", api.static),
        Route("/favicon.ico", api.favicon),
        Route("/api/info", api.info),
        Route("/api/search", api.search, methods=["GET", "POST"]),
        Route("/api/uploads/{ref}/thumbnail", api.upload_thumbnail),
        Route("/api/images", api.images),
        Route("/api/folders", api.folders),
        Route("/api/images/{image_id:int}", api.image),
        Route("/api/images/{image_id:int}/thumbnail", api.thumbnail),
        Route("/api/images/{image_id:int}/file", api.file),
        Route("/api/duplicates", api.duplicates),
        Route("/api/reviews", api.reviews, methods=["GET", "POST"]),
        Route("/api/reviews/undo", api.undo, methods=["POST"]),
        Route("/api/reviews/export.{kind}", api.export),
    ]
    app = Starlette(routes=routes)
    return Guard(app, settings)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    body = json.dumps(data, ensure_ascii=False).encode()
    return Response(body, status, headers=headers, media_type="application/json")


def _error(status: int, message: str) -> Any:
    return _json({"error": message}, status)


def endpoint(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Library errors as JSON: 400 bad input, 404 unknown, 409 the index cannot do it now (read
    only, damaged), 413 too large, 423 locked by a writer."""

    @functools.wraps(fn)
    async def wrapper(self: _Api, request: Any) -> Any:
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect
        from starlette.responses import Response

        try:
            return await fn(self, request)
        except ClientDisconnect:  # the client went away mid-request: nobody to answer
            return Response(status_code=400)
        except OverflowError:  # an id beyond SQLite's integers
            return _error(404, "no such image")
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except _TooLarge:
            return _error(413, f"the upload is over {self.settings.max_upload_bytes >> 20} MB")
        except ImageError as exc:
            return _error(400, str(exc))
        except IndexLockedError as exc:
            return _error(423, str(exc))
        except KeyError as exc:
            return _error(404, str(exc.args[0]) if exc.args else "not found")
        except ImgIndexError as exc:
            return _error(409, str(exc))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        except HTTPException as exc:  # (Starlette's own: too many files or fields in a form)
            detail = str(exc.detail)
            if "Too many files" in detail:
                detail = f"at most {self.settings.max_files} images at once"
            return _error(exc.status_code, detail)

    return wrapper


class _Api:
    def __init__(self, index: Index, settings: ServeSettings):
        from starlette.templating import Jinja2Templates

        self.index = index
        self.settings = settings
        self.uploads = Uploads()
        self._embedding: Any = None  # (an asyncio.Semaphore, made in the server's loop)
        folder = resources.files("imgindex") / "web"
        self.templates = Jinja2Templates(directory=str(folder))
        self._static = {name: (folder / name).read_bytes() for name in STATIC}

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(fn, *args, **kwargs)

    # -- the page ---------------------------------------------------------------------------

    async def page(self, request: Any) -> Any:
        info = await self.run(self.index.info)
        context = {"index_name": os.path.basename(info["path"]) or info["path"],
                   "images": info["images"]}  # fmt: skip
        return self.templates.TemplateResponse(request, "index.html", context)

    async def favicon(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(status_code=204)

    async def static(self, request: Any) -> Any:
        from starlette.responses import Response

        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, "no such file")
        return Response(self._static[name], media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})  # fmt: skip

    # -- reading ----------------------------------------------------------------------------

    @endpoint
    async def info(self, request: Any) -> Any:
        info = await self.run(self.index.info)
        info["thresholds"] = DEFAULT_THRESHOLDS
        info["limits"] = {"max_upload_bytes": self.settings.max_upload_bytes,
                          "max_files": self.settings.max_files, "max_k": MAX_K,
                          "max_pixels": self.settings.max_pixels}  # fmt: skip
        return _json(info)

    @endpoint
    async def image(self, request: Any) -> Any:
        record = await self.run(self.index.get, request.path_params["image_id"])
        return _json(self._record(record))

    def _record(self, record: Any) -> dict[str, Any]:
        return {**record.as_dict(), "folder": os.path.dirname(record.path),
                "name": os.path.basename(record.path),
                "thumbnail": f"/api/images/{record.id}/thumbnail",
                "file": f"/api/images/{record.id}/file"}  # fmt: skip

    @endpoint
    async def images(self, request: Any) -> Any:
        q = request.query_params
        offset = _int(q.get("offset", "0"), "offset", 0, 10**12)
        limit = _int(q.get("limit", "60"), "limit", 1, MAX_K)
        order = q.get("order", "newest")
        under = q.get("under") or None
        if order not in ("newest", "path"):
            raise ApiError(400, "order must be newest or path")
        within = await self.run(self.index.ids_under, under, resolve=False) if under else None
        records, total = await self.run(self.index.page, offset, limit, order, within=within)
        return _json({"total": total, "offset": offset, "limit": limit, "order": order,
                      "images": [self._record(r) for r in records]})  # fmt: skip

    @endpoint
    async def folders(self, request: Any) -> Any:
        counts = await self.run(self.index.folders)
        return _json({"folders": [{"path": p, "count": n} for p, n in counts.items()]})

    @endpoint
    async def thumbnail(self, request: Any) -> Any:
        from starlette.responses import Response

        thumbnail = await self.run(self.index.thumbnail, request.path_params["image_id"])
        headers = {"Cache-Control": "private, max-age=3600"}
        if thumbnail.problem:
            headers["X-Imgindex-Problem"] = _header_text(thumbnail.problem)
            headers["Cache-Control"] = "no-store"
        return Response(thumbnail.data, media_type=thumbnail.content_type, headers=headers)

    @endpoint
    async def file(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        record = await self.run(self.index.get, request.path_params["image_id"])
        fh = await self.run(_open_indexed_file, self.index, record)
        head = fh.read(16)
        fh.seek(0)
        kind = _image_type(head)
        name = os.path.basename(record.path)
        how = "inline" if kind else "attachment"  # (anything but an image: downloaded, not shown)
        headers = {"Content-Disposition": f"{how}; filename*=UTF-8''{_quote(name)}",
                   "Cache-Control": "private, max-age=60",
                   "Content-Length": str(record.size)}  # fmt: skip
        return StreamingResponse(_chunks(fh, record.size), media_type=kind or
                                 "application/octet-stream", headers=headers)  # fmt: skip

    @endpoint
    async def upload_thumbnail(self, request: Any) -> Any:
        from starlette.responses import Response

        upload = self.uploads.get(request.path_params["ref"])
        return Response(upload.thumbnail, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip

    # -- searching --------------------------------------------------------------------------

    def _options(self, q: Any) -> dict[str, Any]:
        metric = check_metric(q.get("metric", "l2"))
        k = _int(q.get("k", "20"), "k", 1, MAX_K)
        options: dict[str, Any] = {"k": k, "metric": metric}
        cutoff = q.get("cutoff")
        if cutoff not in (None, ""):
            value = _float(cutoff, "cutoff")
            options["max_distance" if metric == "l2" else "min_similarity"] = value
        return options

    async def _within(self, q: Any) -> Any:
        under = q.get("under") or None
        if under is None:
            return None
        return await self.run(self.index.ids_under, under, resolve=False)

    @endpoint
    async def search(self, request: Any) -> Any:
        if request.method == "POST":
            return await self._search_uploads(request)
        q = request.query_params
        options = self._options(q)
        within = await self._within(q)
        like = _tokens(q.get("like", "")) + _tokens(q.get("id", ""))
        unlike = _tokens(q.get("unlike", ""))
        if not like:
            raise ApiError(400, "give id=ID, or like=ID,ID,... (and unlike=...)")
        if len(like) == 1 and not unlike and isinstance(like[0], int):
            record = await self.run(self.index.get, like[0])
            hits = await self.run(self.index.similar, record.id, within=within, **options)
            return _json([self._answer(record.path, options["metric"], hits, id=record.id)])
        if len(like) == 1 and not unlike:  # one uploaded image, as POST answered it
            upload = self.uploads.get(str(like[0]))
            hits = await self.run(self.index.search_by_vector, upload.vector, within=within,
                                  **options)  # fmt: skip
            return _json([self._answer(upload.name, options["metric"], hits, upload=like[0])])
        examples = [self._example(t) for t in like], [self._example(t) for t in unlike]
        hits = await self.run(self._search_like, examples, options, within)
        names = [self._example_name(t) for t in like], [self._example_name(t) for t in unlike]
        return _json([self._combined(names, options["metric"], hits)])

    def _search_like(self, examples: Any, options: dict[str, Any], within: Any) -> Any:
        return self.index.search_like(examples[0], examples[1], within=within, **options)

    def _example(self, token: int | str) -> Any:
        if isinstance(token, int):
            return token
        return self.uploads.get(token).vector

    def _example_name(self, token: int | str) -> str:
        if isinstance(token, int):
            return self.index.get(token).path
        return self.uploads.get(token).name

    def _answer(self, query: str, metric: str, hits: list[Any], **extra: Any) -> dict[str, Any]:
        return {"query": query, **extra, "metric": metric,
                "results": [{**h.as_dict(), "thumbnail": f"/api/images/{h.id}/thumbnail"}
                            for h in hits]}  # fmt: skip

    def _combined(self, names: Any, metric: str, hits: list[Any]) -> dict[str, Any]:
        like, unlike = names
        query = "like " + ", ".join(like) + ("; unlike " + ", ".join(unlike) if unlike else "")
        return self._answer(query, metric, hits, like=like, unlike=unlike)

    async def _search_uploads(self, request: Any) -> Any:
        form = await request.form(max_files=self.settings.max_files, max_fields=50,
                                  max_part_size=64 << 10)  # fmt: skip
        options = self._options(form)
        within = await self._within(form)
        files = [f for f in form.getlist("image") if hasattr(f, "read")]
        unlike_files = [f for f in form.getlist("unlike") if hasattr(f, "read")]
        if not files:
            raise ApiError(400, "no image: send one or more files as 'image'")
        if len(files) + len(unlike_files) > self.settings.max_files:
            raise ApiError(400, f"at most {self.settings.max_files} images at once")
        combine = form.get("combine") in ("1", "true", "yes") or bool(unlike_files)
        if not combine:
            return await self._search_each(files, options, within)
        # One query of them all: every example must be readable.
        uploads = [await self._upload(f) for f in files]
        negatives = [await self._upload(f) for f in unlike_files]
        examples = [u.vector for u in uploads], [u.vector for u in negatives]
        hits = await self.run(self._search_like, examples, options, within)
        answer = self._combined(([u.name for u in uploads], [u.name for u in negatives]),
                                options["metric"], hits)  # fmt: skip
        answer["uploads"] = [self.uploads.add(u) for u in uploads]
        answer["unlike_uploads"] = [self.uploads.add(u) for u in negatives]
        return _json([answer])

    async def _search_each(self, files: list[Any], options: dict[str, Any], within: Any) -> Any:
        """One answer per uploaded image, as `imgindex query` gives: an image that cannot be
        read is an entry ``{"query", "error"}`` in its place, and the others are answered (400
        only if none could be)."""
        answers = []
        for part in files:
            try:
                upload = await self._upload(part)
            except ApiError as exc:
                if exc.status != 400:
                    raise
                answers.append({"query": os.path.basename(part.filename or "upload"),
                                "error": exc.message})  # fmt: skip
                continue
            ref = self.uploads.add(upload)
            hits = await self.run(self.index.search_by_vector, upload.vector, within=within,
                                  **options)  # fmt: skip
            answers.append(self._answer(upload.name, options["metric"], hits, upload=ref))
        if all("error" in a for a in answers):
            raise ApiError(400, "; ".join(a["error"] for a in answers))
        return _json(answers)

    async def _upload(self, part: Any) -> Upload:
        """An uploaded image, embedded: refused from its header if it has too many pixels,
        before anything is decoded. At most UPLOADS_AT_ONCE are read and embedded at a time,
        which bounds the memory uploads take."""
        import asyncio

        if self._embedding is None:
            self._embedding = asyncio.Semaphore(UPLOADS_AT_ONCE)
        async with self._embedding:
            return await self._embed_upload(part)

    async def _embed_upload(self, part: Any) -> Upload:
        name = os.path.basename(part.filename or "upload")
        data = await part.read(self.settings.max_upload_bytes + 1)
        if len(data) > self.settings.max_upload_bytes:
            raise _TooLarge
        if not data:
            raise ApiError(400, f"{name}: empty file")
        try:
            vector = await self.run(self.index.vectorizer.vectorize, data)
            picture = await self.run(render, data, name, THUMBNAIL_SIZE, self.settings.max_pixels)
        except ImageError as exc:
            raise ApiError(400, f"{name}: {exc.reason}") from None
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        return Upload(name, vector, buffer.getvalue())

    # -- duplicates and decisions -----------------------------------------------------------

    @endpoint
    async def duplicates(self, request: Any) -> Any:
        q = request.query_params
        metric = check_metric(q.get("metric", "l2"))
        threshold = _float(q.get("threshold", str(DEFAULT_THRESHOLDS[metric])), "threshold")
        include = q.get("all") in ("1", "true", "yes")
        within = await self._within(q)
        groups = await self.run(self.index.duplicates, threshold, metric,
                                include_reviewed=include, within=within)  # fmt: skip
        out = []
        for group in groups:
            entry = group.as_dict()
            for image in entry["images"]:  # what a person needs to choose which to keep
                image.update(self._record(await self.run(self.index.get, image["id"])))
            out.append(entry)
        return _json({"metric": metric, "threshold": threshold, "groups": out})

    @endpoint
    async def reviews(self, request: Any) -> Any:
        if request.method == "GET":
            return _json({"marked_for_removal": await self.run(self._marked)})
        body = await _json_body(request)
        ids = _id_list(body.get("ids"))
        keep = body.get("keep")
        if keep is not None and not _is_id(keep):
            raise ApiError(400, "keep must be an image id, or null for 'not duplicates'")
        await self.run(self.index.review_duplicates, ids, keep=keep)
        return _json({"ok": True, "ids": sorted(ids), "keep": keep})

    @endpoint
    async def undo(self, request: Any) -> Any:
        body = await _json_body(request)
        gone = await self.run(self.index.forget_reviews, _id_list(body.get("ids")))
        return _json({"ok": True, "forgotten": gone})

    def _marked(self) -> list[dict[str, Any]]:
        return [{"id": r.id, "path": r.path, "keep_id": k.id if k else None,
                 "keep_path": k.path if k else None}
                for r, k in self.index.marked_for_removal()]  # fmt: skip

    @endpoint
    async def export(self, request: Any) -> Any:
        from starlette.responses import Response

        kind = request.path_params["kind"]
        rows = await self.run(self._marked)
        disposition = {"Content-Disposition": f"attachment; filename=marked-for-removal.{kind}"}
        if kind == "json":
            return _json({"marked_for_removal": rows}, headers=disposition)
        if kind != "csv":
            raise ApiError(404, "export as csv or json")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "path", "keep_id", "keep_path"])
        for row in rows:
            writer.writerow([row["id"], row["path"], row["keep_id"], row["keep_path"] or ""])
        return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8",
                        headers=disposition)  # fmt: skip


# -- helpers --------------------------------------------------------------------------------


def _int(text: Any, name: str, low: int, high: int) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be from {low} to {high}, not {value}")
    return value


def _float(text: Any, name: str) -> float:
    try:
        value = float(str(text))
    except ValueError:
        raise ApiError(400, f"{name} must be a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, f"{name} must be a finite number")
    return value


def _tokens(text: str) -> list[int | str]:
    """Examples in a URL: image ids, or ``u:REF`` for an uploaded image."""
    out: list[int | str] = []
    parts = list(filter(None, (p.strip() for p in text.split(","))))
    if len(parts) > MAX_IDS:
        raise ApiError(400, f"at most {MAX_IDS} examples")
    for part in parts:
        if part.startswith("u:") and len(part) > 2:
            out.append(part[2:])
        elif part.isascii() and part.isdigit() and int(part) <= MAX_ID:
            out.append(int(part))
        else:
            raise ApiError(400, f"{part!r} is neither an image id nor an upload (u:REF)")
    return out


def _id_list(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(_is_id(i) for i in value):
        raise ApiError(400, "ids must be a list of image ids")
    if len(value) > MAX_IDS:
        raise ApiError(400, f"at most {MAX_IDS} images in one decision")
    return sorted(set(value))


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


async def _json_body(request: Any) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise ApiError(415, "send JSON (Content-Type: application/json)")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not JSON (or nested too deeply)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _open_indexed_file(index: Index, record: Any) -> Any:
    """An indexed file, opened from the path the index holds (never one a request gave), if it
    is still the file that was indexed: a regular file of the same size and time."""
    raw = index.raw_path(record.id)
    try:
        st = os.stat(raw)
        if not stat.S_ISREG(st.st_mode):  # (a pipe would block the request for ever)
            raise ApiError(409, f"{record.path}: not a regular file any more")
        fh = open(raw, "rb")  # noqa: SIM115 - streamed by the response, which closes it
    except FileNotFoundError:
        raise ApiError(404, f"{record.path}: the file is gone (deleted or moved)") from None
    except PermissionError:
        raise ApiError(409, f"{record.path}: permission denied") from None
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime) != (record.size, record.mtime):
        fh.close()
        raise ApiError(409, f"{record.path}: changed since it was indexed (build again)")
    return fh


def _chunks(fh: Any, size: int) -> Any:
    """The first ``size`` bytes of ``fh`` in blocks, then closed."""
    try:
        left = size
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            left -= len(block)
            yield block
    finally:
        fh.close()


_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def _image_type(data: bytes) -> str | None:
    """The MIME type of an image from its first bytes (never from a file name)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _header_text(text: str) -> str:
    """A header value: printable ASCII only."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:300]


# -- the guard ------------------------------------------------------------------------------


@dataclass
class Guard:
    """ASGI middleware in front of the application: Host, token, origin and size checks, and
    security headers on every response (see the module's docstring)."""

    app: Any
    settings: ServeSettings
    hosts: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.hosts = self.settings.host_names()
        self.cookie = f"imgindex_token_{self.settings.port}"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}  # fmt: skip
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _respond(send, *refusal)
            return
        if self.settings.token and _query_token(scope) and scope["path"] == "/":
            # The printed URL carries the token: keep it in a cookie, and out of the address
            # bar (and the history). Cookies are per host, not per port: the name says which
            # server's it is.
            cookie = (f"{self.cookie}={self.settings.token}; HttpOnly; SameSite=Strict; "
                      "Path=/")  # fmt: skip
            await _respond(send, 303, None, [("location", "/"), ("set-cookie", cookie)])
            return
        limit = self.settings.max_upload_bytes + (1 << 20)  # the form's own bytes beside
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _respond(send, 413, f"the request is over {limit >> 20} MB")
            return
        seen = 0

        async def bounded_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        async def secured_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, bounded_receive, secured_send)
        except _TooLarge:
            await _respond(send, 413, f"the request is over {limit >> 20} MB")

    def _refusal(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else ""
        if name.lower() not in self.hosts or (port and port != str(self.settings.port)):
            return 400, "unexpected Host header: this server answers for its own address only"
        if self.settings.token:
            given = _query_token(scope) or _bearer(headers) or _cookie(headers, self.cookie)
            if not given:
                return 401, "an access token is required (the URL imgindex serve printed)"
            if not hmac.compare_digest(given.encode(), self.settings.token.encode()):
                return 403, "wrong access token"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return 403, "requests from other sites are refused"
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None:
            allowed = {f"http://{h}:{self.settings.port}" for h in self.hosts}
            if origin.lower() not in allowed:
                return 403, "requests from other sites are refused"
        return None


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]


async def _respond(
    send: Any, status: int, message: str | None, headers: list[tuple[str, str]] = ()
) -> None:
    body = json.dumps({"error": message}).encode() if message else b""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if message:
        raw.append((b"content-type", b"application/json"))
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status,
                "headers": [*raw, *SECURITY_HEADERS]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def _cookie(headers: dict[str, str], cookie: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == cookie:
            return value
    return None


def _query_token(scope: dict[str, Any]) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


# -- running ---------------------------------------------------------------------------------


def serve(index: Index, settings: ServeSettings, on_ready: Callable[[str], None]) -> None:
    """Run the server until Ctrl-C (or SIGTERM); ``on_ready(url)`` once it listens. The model
    loads in the background meanwhile, so the first uploaded query does not wait as long."""
    import uvicorn

    app = create_app(index, settings)
    # (timeout_graceful_shutdown: Ctrl-C does not wait for ever for a slow client's upload)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, server_header=False, date_header=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    host = settings.host
    if host in ("0.0.0.0", "::"):  # a URL to reach it by: this machine's address
        host = sorted(local_addresses() - {"127.0.0.1", "::1"} or {"127.0.0.1"})[0]
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.port}/"
    if settings.token:
        url += f"?token={settings.token}"
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        if server.started:
            on_ready(url)
            threading.Thread(target=_warm_up, args=(index,), daemon=True).start()

    server.startup = startup  # type: ignore[method-assign]
    _check_address(settings.host, settings.port)
    server.run()
    if not server.started:
        raise ImgIndexError(f"the server could not start on {host}:{settings.port}")


def _check_address(host: str, port: int) -> None:
    """OSError now, rather than uvicorn's own log line and exit status, if the address cannot
    be listened on (a port already in use, an address not of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        probe.bind((host, port))


def _warm_up(index: Index) -> None:
    with contextlib.suppress(Exception):  # (the first upload will report it)
        index.vectorizer  # noqa: B018 - load the model once, now, not on the first upload
