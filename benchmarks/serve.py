"""What the web app costs: thumbnails for a page of 100 results, cold and warm, and search
latency through the HTTP API against the same searches through `Index` directly (the server
should add little: the ratio is the table's point).

Indexes --images photos of caltech101-dev (the real AugNet, exact preset) into a temporary
index, starts the app with uvicorn on a loopback port in this process (one Index, one loaded
model, as `imgindex serve` does), and times, each as the median of --rounds runs:

* search by id (`GET /api/search?id=`, k 20) against `Index.similar`;
* search by an uploaded photo (`POST /api/search`, k 20) against `Index.search` of its bytes;
* the 100 thumbnails of a page, requested one after another (a browser asks for 6 at a time),
  with the thumbnail cache empty (cold) and filled (warm), against `Index.thumbnail`.

    python benchmarks/serve.py [--images 300] [--rounds 5] [--dataset DIR]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import imgindex
from imgindex.files import walk_images
from imgindex.server import ServeSettings, create_app

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT.parent / "shared" / "datasets" / "caltech101-dev"


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    import httpx
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", type=Path, default=DATASET)
    args = parser.parse_args()
    every = sorted(walk_images([args.dataset]))
    photos = every[:: max(1, len(every) // args.images)][: args.images]  # from every folder
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        for n, photo in enumerate(photos):
            shutil.copy(photo, folder / f"{n:04d}{photo.suffix}")
        index = imgindex.Index.create(Path(scratch) / "idx", device="cpu")
        started = time.perf_counter()
        index.sync(folder)
        print(f"indexed {index.count()} photos in {time.perf_counter() - started:.0f} s")
        port = free_port()
        settings = ServeSettings(port=port)
        server = uvicorn.Server(uvicorn.Config(create_app(index, settings), host="127.0.0.1",
                                               port=port, log_level="warning"))  # fmt: skip
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        records = index.records()
        query = records[len(records) // 2]
        upload = Path(index.raw_path(query.id).decode()).read_bytes()
        client.get(f"/api/search?id={query.id}&k=20")  # (first requests warm up everything)
        client.post("/api/search", files={"image": ("q.jpg", upload)}, data={"k": "20"})
        rows = [
            ("search by id, k 20",
             median_ms(lambda: client.get(f"/api/search?id={query.id}&k=20").raise_for_status(),
                       args.rounds),
             median_ms(lambda: index.similar(query.id, k=20), args.rounds)),
            ("search by upload, k 20",
             median_ms(lambda: client.post("/api/search", files={"image": ("q.jpg", upload)},
                                           data={"k": "20"}).raise_for_status(), args.rounds),
             median_ms(lambda: index.search(upload, k=20), args.rounds)),
        ]  # fmt: skip
        page = [r.id for r in records[:100]]
        cache = index.path / "thumbnails"

        def thumbnails_api() -> None:
            for image_id in page:
                client.get(f"/api/images/{image_id}/thumbnail").raise_for_status()

        def thumbnails_direct() -> None:
            for image_id in page:
                index.thumbnail(image_id)

        def cold(fn):
            def run() -> None:
                shutil.rmtree(cache, ignore_errors=True)
                fn()

            return run

        rows.append(("100 thumbnails, cold", median_ms(cold(thumbnails_api), args.rounds),
                     median_ms(cold(thumbnails_direct), args.rounds)))  # fmt: skip
        thumbnails_api()
        rows.append(("100 thumbnails, warm", median_ms(thumbnails_api, args.rounds),
                     median_ms(thumbnails_direct, args.rounds)))  # fmt: skip
        server.should_exit = True
        thread.join(timeout=10)
        index.close()
    print(f"{platform.machine()}, {platform.processor() or 'cpu'}; {len(photos)} photos; "
          f"median of {args.rounds}")  # fmt: skip
    print(f"{'measure':<26}{'API ms':>10}{'Index ms':>10}{'ratio':>8}")
    for name, api_ms, direct_ms in rows:
        print(f"{name:<26}{api_ms:>10.1f}{direct_ms:>10.1f}{api_ms / direct_ms:>8.2f}")


if __name__ == "__main__":
    main()
