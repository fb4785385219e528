"""Photo libraries as they are: HEIC, AVIF, JPEG XL and camera RAW (DNG written here), judged by
content; hostile versions of each; what photos say about themselves (date, camera, lens, GPS
only when kept) stored, summed up by `info`, and used as filters inside the vector search."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex import formats
from imgindex.decode import decode_photo, read_file
from imgindex.photos import PhotoFilter

from .conftest import DATA
from .dng import write_dng

pytest.importorskip("pillow_heif", reason="pip install 'imgindex[heif]'")
pytest.importorskip("rawpy", reason="pip install 'imgindex[raw]'")
pytest.importorskip("pillow_jxl", reason="pip install 'imgindex[jxl]'")
formats.register_installed()

SOURCE = DATA / "pizza" / "image_0001.jpg"  # 300 x 225


def exif_block(taken="2024:05:01 12:30:00", make="Apple", model="iPhone 15", gps=True) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    sub = exif.get_ifd(0x8769)
    sub[0x9003], sub[0x9011], sub[0xA434] = taken, "+02:00", "iPhone 15 back camera 6.86mm"
    if gps:
        where = exif.get_ifd(0x8825)
        where[1], where[2] = "N", (48.0, 51.0, 29.5)
        where[3], where[4] = "W", (2.0, 17.0, 40.0)
    return exif.tobytes()


def photo_library(root: Path) -> Path:
    """One photo in each format (the same picture), a HEIC named .jpg, and two DNGs."""
    root.mkdir(parents=True)
    picture = Image.open(SOURCE).convert("RGB")
    exif = exif_block()
    picture.save(root / "photo.png")
    picture.save(root / "photo.jpg", quality=95, exif=exif)
    picture.save(root / "photo.heic", quality=95, exif=exif)
    picture.save(root / "photo.avif", quality=95, exif=exif)
    picture.save(root / "photo.jxl", quality=95, exif=exif)
    picture.save(root / "photo.webp", quality=95)
    picture.save(root / "photo.tiff")
    shutil.copy(root / "photo.heic", root / "heic-named.jpg")
    write_dng(root / "camera.dng", 800, 600, preview=400)  # a preview large enough
    write_dng(root / "small.dng", 256, 192)  # none: demosaiced
    return root


EXPECTED_FORMATS = {
    "photo.png": "PNG", "photo.jpg": "JPEG", "photo.heic": "HEIF", "photo.avif": "AVIF",
    "photo.jxl": "JPEG XL", "photo.webp": "WEBP", "photo.tiff": "TIFF", "heic-named.jpg": "HEIF",
    "camera.dng": "DNG", "small.dng": "DNG",
}  # fmt: skip


def facts_by_name(index_path: Path) -> dict:
    with imgindex.Index.open(index_path) as index:
        records = {r.id: Path(r.path).name for r in index.records()}
        return {records[i]: f for i, f in index.photo_facts(list(records)).items()}


def test_formats_are_judged_by_content():
    def head(fmt: str, **save) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format=fmt, **save)
        return buffer.getvalue()[:64]

    assert formats.sniff(head("JPEG"), ".png") == "JPEG"
    assert formats.sniff(head("PNG"), ".jpg") == "PNG"
    assert formats.sniff(head("HEIF"), ".jpg") == "HEIF"
    assert formats.sniff(head("AVIF"), ".heic") == "AVIF"
    assert formats.sniff(head("JXL"), "") == "JPEG XL"
    assert formats.sniff(head("WEBP"), "") == "WEBP"
    assert formats.sniff(head("TIFF"), ".tif") == "TIFF"
    assert formats.sniff(head("TIFF"), ".nef") == "RAW"  # TIFF-based RAW: by its suffix
    assert formats.sniff(b"FUJIFILMCCD-RAW 0201", ".jpg") == "RAW"
    assert formats.sniff(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01", "") == "RAW"  # CR3
    assert formats.sniff(b"shopping list", ".jpg") is None


def test_every_format_is_indexed_with_its_facts(run, tmp_path):
    library = photo_library(tmp_path / "library")
    index = tmp_path / "index"
    report = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert report["skipped"] == [] and report["total"] == len(EXPECTED_FORMATS)
    facts = facts_by_name(index)
    assert {name: f.format for name, f in facts.items()} == EXPECTED_FORMATS
    assert facts["camera.dng"].source == "embedded preview"
    assert facts["small.dng"].source == "half-size demosaic"
    assert facts["photo.png"].source is None
    for name in ("photo.jpg", "photo.heic", "photo.avif", "photo.jxl", "heic-named.jpg"):
        f = facts[name]
        assert (f.taken_at, f.taken_offset) == ("2024-05-01T12:30:00", "+02:00"), name
        assert (f.camera_make, f.camera_model) == ("Apple", "iPhone 15"), name
        assert f.gps_latitude is None and f.gps_longitude is None, name  # not kept by default
    assert facts["photo.jpg"].lens == "iPhone 15 back camera 6.86mm"
    assert (facts["camera.dng"].camera_model, facts["camera.dng"].taken_at) == (
        "TestCam 1", "2023-07-14T09:15:00"
    )  # fmt: skip

    info = json.loads(run("info", "--index", index, "--json").stdout)["photos"]
    assert info["formats"]["HEIF"] == 2 and info["formats"]["DNG"] == 2
    assert info["cameras"]["Apple iPhone 15"] == 5
    assert info["taken"] == {"first": "2023-07-14T09:15:00", "last": "2024-05-01T12:30:00",
                             "images": 7}  # fmt: skip
    assert info["with_gps"] == 0
    text = run("info", "--index", index).stdout
    assert "Formats:" in text and "Apple iPhone 15 5" in text and "GPS" not in text


def test_gps_is_kept_only_when_asked(run, tmp_path):
    library = photo_library(tmp_path / "library")
    run("build", library, "--index", tmp_path / "kept", "--keep-gps")
    kept = facts_by_name(tmp_path / "kept")["photo.jpg"]
    assert (kept.gps_latitude, kept.gps_longitude) == (
        pytest.approx(48.8581944), pytest.approx(-2.2944444)
    )  # fmt: skip
    assert "GPS:" in run("info", "--index", tmp_path / "kept").stdout
    run("build", library, "--index", tmp_path / "not-kept")
    assert facts_by_name(tmp_path / "not-kept")["photo.jpg"].gps_latitude is None


def test_a_missing_extra_is_named_with_its_install_command(run, tmp_path, monkeypatch):
    library = photo_library(tmp_path / "library")
    monkeypatch.setattr(formats, "available", lambda kind: False)
    report = json.loads(run("build", library, "--index", tmp_path / "i", "--json").stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "photo.heic": "HEIC support not installed: pip install 'imgindex[heif]'",
        "heic-named.jpg": "HEIC support not installed: pip install 'imgindex[heif]'",
        "photo.jxl": "JPEG XL support not installed: pip install 'imgindex[jxl]'",
        "camera.dng": "camera RAW support not installed: pip install 'imgindex[raw]'",
        "small.dng": "camera RAW support not installed: pip install 'imgindex[raw]'",
    }
    assert report["total"] == len(EXPECTED_FORMATS) - len(reasons)  # AVIF is Pillow's own


def test_hostile_files_of_each_format_are_skipped_with_a_reason(run, tmp_path):
    library = photo_library(tmp_path / "library")
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for name in ("photo.heic", "photo.avif", "photo.jxl", "camera.dng"):
        data = (library / name).read_bytes()
        (hostile / f"truncated-{name}").write_bytes(data[: len(data) // 3])
        (hostile / f"header-only-{name}").write_bytes(data[:80])
    (hostile / "not-heic.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 200)
    (hostile / "png-named.heic").write_bytes((library / "photo.png").read_bytes())
    result = run("build", hostile, "--index", tmp_path / "i", "--json")
    report = json.loads(result.stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert report["total"] == 1 and "png-named.heic" not in reasons  # judged by content
    assert len(reasons) == 9 and all(reasons.values())

    # Pixel limits hold for every format, checked before decoding.
    limited = run("build", library, "--index", tmp_path / "small", "--max-pixels", "5000",
                  "--json")  # fmt: skip
    refused = {Path(s["path"]).name: s["reason"] for s in json.loads(limited.stdout)["skipped"]}
    assert set(refused) == set(EXPECTED_FORMATS)
    assert all("refused before decoding" in r for r in refused.values()), refused


def test_first_or_primary_picture_of_files_with_several():
    import pillow_heif

    burst = pillow_heif.from_pillow(Image.new("RGB", (64, 32), "blue"))
    burst.add_from_pillow(Image.new("RGB", (32, 64), "green"))
    buffer = io.BytesIO()
    burst.save(buffer, quality=90, primary_index=1)
    pixels = decode_photo(buffer.getvalue(), "burst.heic").pixels
    assert pixels.shape == (64, 32, 3) and pixels[0, 0, 1] > 100  # the primary: green
    frames = [Image.new("RGB", (30, 20), c) for c in ("red", "blue")]
    for fmt in ("TIFF", "WEBP", "AVIF", "GIF"):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
        pixels = decode_photo(buffer.getvalue(), f"many.{fmt.lower()}").pixels
        assert pixels.shape == (20, 30, 3) and pixels[0, 0, 0] > 200, fmt  # the first: red


def test_exif_orientation_in_every_format():
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: stored 80 x 40, shown 40 x 80
    for fmt in ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "JXL"):
        buffer = io.BytesIO()
        Image.new("RGB", (80, 40), "red").save(buffer, format=fmt, exif=exif.tobytes())
        assert decode_photo(buffer.getvalue(), "x").pixels.shape == (80, 40, 3), fmt


@pytest.mark.slow
def test_vectors_agree_across_formats(augnet, tmp_path):
    library = photo_library(tmp_path / "library")
    reference = augnet.vectorize(str(library / "photo.png"))

    def cosine(name: str) -> float:
        v = augnet.vectorize(str(library / name))
        return float(v @ reference / np.linalg.norm(v) / np.linalg.norm(reference))

    names = ("photo.heic", "photo.avif", "photo.jxl", "photo.jpg", "photo.webp", "photo.tiff")
    agreement = {name: cosine(name) for name in names}
    print("cosine to the PNG:", {k: round(v, 5) for k, v in agreement.items()})
    assert agreement["photo.tiff"] > 0.99999  # lossless
    assert all(v >= 0.99 for v in agreement.values()), agreement


def dated_photos(root: Path) -> dict[str, tuple[str, str, int]]:
    """Twelve photos: name -> (date taken, camera, width)."""
    root.mkdir(parents=True)
    made = {}
    sources = sorted(DATA.glob("*/*.jpg"))
    for n, source in enumerate(sources[:12]):
        taken = f"{2020 + n % 4}:0{1 + n % 9}:15 10:00:00"
        make, model = ("Canon", "EOS R5") if n % 3 == 0 else ("Apple", f"iPhone {12 + n % 2}")
        picture = Image.open(source).convert("RGB")
        if n % 4 == 0:
            picture = picture.resize((picture.width * 2, picture.height * 2))
        name = f"p{n:02d}.{'heic' if n % 2 else 'jpg'}"
        picture.save(root / name, quality=90, exif=exif_block(taken, make, model, gps=False))
        made[name] = (taken[:4], f"{make} {model}", picture.width)
    return made


def test_filters_return_exactly_the_matching_images_k_of_them(run, tmp_path):
    made = dated_photos(tmp_path / "photos")
    index = tmp_path / "index"
    run("build", tmp_path / "photos", "--index", index)
    query = tmp_path / "photos" / "p01.heic"

    def found(*options, k=20):
        result = run("query", query, "--index", index, "-k", k, "--json", *options)
        return {Path(r["path"]).name for r in json.loads(result.stdout)[0]["results"]}

    canon = {n for n, (_, camera, _) in made.items() if camera.startswith("Canon")}
    assert found("--camera", "canon") == canon
    assert len(found("--camera", "canon", k=2)) == 2 < len(canon)  # k of them, all matching
    assert found("--camera", "canon", k=2) <= canon
    assert found("--format", "heic") == {n for n in made if n.endswith(".heic")}
    assert found("--format", "JPEG") == {n for n in made if n.endswith(".jpg")}
    in_2021 = {n for n, (year, _, _) in made.items() if year == "2021"}
    assert found("--taken-after", "2021", "--taken-before", "2021") == in_2021
    wide = {n for n, (_, _, width) in made.items() if width >= 500}
    assert found("--min-width", "500") == wide
    both = {n for n in canon if n in wide}
    assert found("--camera", "EOS", "--min-width", "500") == both
    assert found("--camera", "nikon") == set()

    similar = run("similar", str(query), "--index", index, "--camera", "iphone 13", "--json")
    names = {Path(r["path"]).name for r in json.loads(similar.stdout)[0]["results"]}
    assert names == {n for n, (_, c, _) in made.items() if c == "Apple iPhone 13"} - {query.name}

    with imgindex.Index.open(index) as opened:
        where = PhotoFilter(camera="canon")
        assert len(opened.ids_matching(where)) == len(canon)
        groups = opened.duplicates(threshold=1e9, where=where)
        assert {Path(p).name for g in groups for p in g.paths} == canon

    bad = run("query", query, "--index", index, "--taken-after", "last tuesday", ok=False)
    assert bad.exit_code == 2 and "not a date" in bad.output


def test_an_older_index_gets_its_facts_without_embedding_again(run, tmp_path):
    library = photo_library(tmp_path / "library")
    index = tmp_path / "index"
    run("build", library, "--index", index)
    # As an imgindex from before the photo facts left it: no table, no migration recorded.
    db = sqlite3.connect(index / "imgindex.db")
    db.execute("DROP TABLE photo_facts")
    db.execute("DELETE FROM _migrations WHERE name = 'm006_photo_facts'")
    db.commit()
    db.close()
    text = run("info", "--index", index).stdout
    assert "not read yet for 10 images" in text  # upgraded in place on opening

    report = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert (report["embedded"], report["facts_filled"], report["unchanged"]) == (0, 10, 10)
    assert {n: f.format for n, f in facts_by_name(index).items()} == EXPECTED_FORMATS
    assert facts_by_name(index)["small.dng"].source == "half-size demosaic"
    again = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert again["facts_filled"] == 0


def test_raw_preview_and_demosaic_pictures(tmp_path):
    data, _ = read_file(write_dng(tmp_path / "a.dng", 800, 600, preview=400))
    assert decode_photo(data, "a.dng", min_side=350).facts.source == "embedded preview"
    assert decode_photo(data, "a.dng", min_side=500).facts.source == "half-size demosaic"
    demosaiced = decode_photo(data, "a.dng", min_side=500).pixels
    assert demosaiced.shape == (300, 400, 3)


def test_ten_bit_and_alpha_become_8_bit_rgb_as_16_bit_pngs_do():
    import pillow_heif

    ramp = np.linspace(0, 65535, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint16)
    ten_bit = pillow_heif.from_bytes(mode="RGB;16", size=(64, 48), data=ramp.tobytes())
    buffer = io.BytesIO()
    ten_bit.save(buffer, quality=-1, chroma=444)  # lossless, 10 bits a sample
    pixels = decode_photo(buffer.getvalue(), "hdr.heic").pixels
    assert pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - (ramp >> 8)).max() <= 1  # the high byte, as for PNGs
    translucent = Image.new("RGBA", (32, 16), (10, 200, 30, 128))
    for fmt in ("PNG", "HEIF", "AVIF", "JXL"):
        buffer = io.BytesIO()
        translucent.save(buffer, format=fmt, quality=95)
        pixel = decode_photo(buffer.getvalue(), "a").pixels[0, 0].astype(int)
        assert np.abs(pixel - (10, 200, 30)).max() <= 3, fmt  # alpha dropped, colour kept


def jxl_claiming(width: int, height: int) -> bytes:
    """A JPEG XL codestream whose SizeHeader declares ``width`` x ``height`` (30-bit sizes),
    followed by junk: what a decompression bomb looks like before its pixels."""
    bits, value = 0, 0

    def put(number: int, count: int) -> None:
        nonlocal bits, value
        value |= number << bits
        bits += count

    put(0, 1)  # not small
    put(3, 2), put(height - 1, 30)  # U32 selector 3: 30 bits
    put(0, 3)  # no ratio: the width follows
    put(3, 2), put(width - 1, 30)
    return b"\xff\x0a" + value.to_bytes((bits + 7) // 8, "little") + b"\x00" * 64


def test_a_jpeg_xl_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    assert formats.jxl_size(jxl_claiming(40000, 40000)) == (40000, 40000)
    path = tmp_path / "bomb.jxl"
    path.write_bytes(jxl_claiming(40000, 40000))
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or 1 / 0)
    with pytest.raises(imgindex.ImageError, match="refused before decoding"):
        read_file(path)
    with pytest.raises(imgindex.ImageError, match="refused before decoding"):
        decode_photo(path.read_bytes(), "bomb.jxl")
    assert opened == []  # Pillow (whose plugin decodes to open) never saw it


def test_a_raw_preview_over_the_pixel_limit_is_passed_over(tmp_path):
    data, _ = read_file(write_dng(tmp_path / "a.dng", 800, 600, preview=400))
    # The preview (533 x 400) is over 150,000 pixels; the half-size demosaic (400 x 300) is not.
    photo = decode_photo(data, "a.dng", max_pixels=150_000, min_side=350)
    assert (photo.facts.source, photo.pixels.shape) == ("half-size demosaic", (300, 400, 3))


def test_installing_a_missing_extra_lets_the_next_build_read_its_files(run, tmp_path, monkeypatch):
    library = photo_library(tmp_path / "library")
    index = tmp_path / "index"
    with monkeypatch.context() as patched:
        patched.setattr(formats, "available", lambda kind: False)
        first = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert len(first["skipped"]) == 5
    second = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert (second["added"], second["skipped"]) == (5, [])  # no --retry-skipped needed


def test_a_copy_does_not_carry_gps_into_an_index_told_not_to_keep_it(run, tmp_path):
    library = photo_library(tmp_path / "library")
    index = tmp_path / "index"
    run("build", library, "--index", index, "--keep-gps")
    shutil.copy(library / "photo.jpg", library / "copy.jpg")
    report = json.loads(run("build", library, "--index", index, "--json").stdout)
    assert report["reused"] == 1
    facts = facts_by_name(index)
    assert facts["copy.jpg"].gps_latitude is None and facts["photo.jpg"].gps_latitude is not None
    assert facts["copy.jpg"].camera_model == "iPhone 15"  # the rest is copied


@pytest.mark.parametrize("bad", ["2024-13", "2024-02-30", "last tuesday", "2024-1"])
def test_impossible_dates_are_refused(bad):
    for name in ("taken_after", "taken_before"):
        with pytest.raises(ValueError, match="not a date"):
            PhotoFilter(**{name: bad})
