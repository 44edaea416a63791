"""Ingestion of PDFs (good, corrupt, empty, encrypted), images and folders into Pages, in one batch."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from minirerank_core.errors import InvalidImageError, PdfError
from minirerank_core.pages import Page, PixelBudget
from minirerank_core.pages.ingest import ingest, reload_page
from minirerank_core.testing import make_pdf, random_page_image


def hand_written_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF from raw object bodies (numbered from 1; object 1 is the catalog) with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer_extra, xref)
    return bytes(out)


_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes = b"secret", owner_password: bytes = b"owner") -> bytes:
    """A genuinely encrypted one-page PDF (standard security handler, RC4 40-bit, revision 2; PDF 1.7 spec
    algorithms 2-4): it opens only with ``user_password`` and then shows a blue square."""
    pad = lambda pw: (pw + _PAD)[:32]  # noqa: E731
    file_id = hashlib.md5(b"minirerank-test").digest()
    p = -4
    o = _rc4(hashlib.md5(pad(owner_password)).digest()[:5], pad(user_password))
    key = hashlib.md5(pad(user_password) + o + struct.pack("<i", p) + file_id).digest()[:5]
    u = _rc4(key, _PAD)
    content = _rc4(hashlib.md5(key + b"\x04\x00\x00\x00\x00").digest()[:10], b"0 0 1 rg 10 10 100 100 re f")
    return hand_written_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (o.hex().encode(), u.hex().encode(), p),
        ],
        b"/Encrypt 5 0 R /ID [<%s> <%s>] " % (file_id.hex().encode(), file_id.hex().encode()),
    )


@pytest.fixture()
def batch(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    make_pdf(d / "report.pdf", [(200, 300), (300, 200), (200, 300)])
    make_pdf(d / "sub" / "copy of report.pdf", [(200, 300)])  # same page 1 as report.pdf: a duplicate
    (d / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage\n")
    good = (d / "report.pdf").read_bytes()
    (d / "truncated.pdf").write_bytes(good[: len(good) // 2])
    (d / "zero.pdf").write_bytes(b"")
    (d / "no pages.pdf").write_bytes(hand_written_pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                                                       b"<< /Type /Pages /Kids [] /Count 0 >>"]))
    (d / "locked.pdf").write_bytes(encrypted_pdf())
    random_page_image(120, 160, seed=7).save(d / "scan.png")
    random_page_image(120, 160, seed=7).save(d / "sub" / "scan again.png")  # same bytes: duplicate
    random_page_image(90, 60, seed=8).save(d / "photo.JPG", format="JPEG")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / "notes.txt").write_text("ignored: not a page")
    return d


def test_mixed_batch(batch):
    report = ingest([batch], show_progress=False)
    failed = {Path(e.source).name: e.error for e in report.errors}
    assert set(failed) == {"corrupt.pdf", "truncated.pdf", "zero.pdf", "no pages.pdf", "locked.pdf", "broken.png"}
    for name in ("corrupt.pdf", "truncated.pdf", "zero.pdf", "no pages.pdf", "locked.pdf"):
        assert isinstance(failed[name], PdfError), name
        assert str(batch / name) in str(failed[name])
    assert "password" in str(failed["locked.pdf"])
    assert "no pages" in str(failed["no pages.pdf"])
    assert "empty" in str(failed["zero.pdf"])
    assert isinstance(failed["broken.png"], InvalidImageError) and not isinstance(failed["broken.png"], PdfError)

    ids = [p.id for p in report.pages]
    assert len(ids) == len(set(ids)) == 5  # 3 PDF pages + 2 distinct images
    pdf_pages = [p for p in report.pages if p.metadata.get("document") == "report"]
    assert [p.metadata["page"] for p in pdf_pages] == [1, 2, 3]
    assert all(p.id.startswith(f"report-p{n:04d}-") and p.id.endswith(p.content_hash[:12])
               for n, p in zip([1, 2, 3], pdf_pages))
    assert pdf_pages[0].image().size == (400, 600)  # 144 dpi: 2 pixels per point
    assert pdf_pages[1].metadata == {"source": str(batch / "report.pdf"), "document": "report", "page": 2,
                                     "page_count": 3, "width": 600, "height": 400,
                                     "render": {"dpi": 144.0, "max_pixels": None}}
    assert {(Path(d.source).name, d.page) for d in report.duplicates} == {("copy of report.pdf", 1),
                                                                       ("scan again.png", None)}
    dup = next(d for d in report.duplicates if d.page == 1)
    assert dup.duplicate_of == pdf_pages[0].id and dup.content_hash == pdf_pages[0].content_hash
    assert report.summary() == "5 pages, 6 errors, 2 duplicates skipped" and not report.ok


def test_ids_are_stable_and_pages_reload(batch, tmp_path):
    first = ingest([batch], show_progress=False).pages
    assert [p.id for p in ingest([batch], show_progress=False).pages] == [p.id for p in first]
    for page in first:  # from id + metadata alone (what an index stores): the identical page
        again = reload_page(page.id, page.metadata)
        assert (again.id, again.content_hash, again.metadata) == (page.id, page.content_hash, page.metadata)
    with pytest.raises(InvalidImageError):
        reload_page("x", {"document": "x"})
    with pytest.raises(PdfError, match="no page 9"):
        reload_page("x", {**next(p for p in first if "page" in p.metadata).metadata, "page": 9})


def test_encrypted_fixture_is_genuine(batch):
    doc = pdfium.PdfDocument(str(batch / "locked.pdf"), password="secret")  # the error above was the lock
    assert doc[0].render().to_pil().convert("RGB").getpixel((50, 150)) == (0, 0, 255)


def test_image_dir_budget_known_and_missing(batch, tmp_path):
    budget = PixelBudget(max_pixels=100 * 100)
    report = ingest([batch / "report.pdf", batch / "scan.png", tmp_path / "missing.pdf"], pixel_budget=budget,
                    image_dir=tmp_path / "pages", known={}, show_progress=False)
    assert [Path(e.source).name for e in report.errors] == ["missing.pdf"]
    pdf_pages = report.pages[:3]
    for p in pdf_pages:
        w, h = p.image().size
        assert w * h <= budget.max_pixels and w * h > 0.9 * budget.max_pixels
        assert p.source == p.metadata["image_path"] and Path(p.source).parent == tmp_path / "pages"
        assert Path(p.source).name == f"{p.id}.png"
        assert Page(p.source).content_hash == p.content_hash  # the file holds exactly the hashed PNG
    again = ingest([batch / "report.pdf"], pixel_budget=budget, show_progress=False,
                   known={p.content_hash: p.id for p in pdf_pages})
    assert again.pages == [] and [d.duplicate_of for d in again.duplicates] == [p.id for p in pdf_pages]
    assert ingest(batch / "scan.png", show_progress=False).pages[0].metadata["image_path"] == str(batch / "scan.png")
    with pytest.raises(ValueError):
        ingest([batch], dpi=None)
    with pytest.raises(ValueError):
        ingest([batch], dpi=0)


@pytest.mark.parametrize("order", [["no pages.pdf"], ["locked.pdf", "no pages.pdf"], ["corrupt.pdf", "no pages.pdf"],
                                   ["no pages.pdf", "locked.pdf"]])
def test_each_pdf_failure_gets_its_own_message_in_any_order(batch, order):
    """PDFium's last error is global and stale after a failed document: a zero-page PDF read after an encrypted one
    must still say "no pages", alone or in any order."""
    want = {"no pages.pdf": "no pages", "locked.pdf": "password", "corrupt.pdf": "not a valid PDF"}
    for name in order:
        report = ingest([batch / name], show_progress=False)
        (err,) = report.errors
        assert want[name] in str(err), (order, name, str(err))


def test_an_odd_strip_is_reported_and_the_rest_ingested(tmp_path):
    from PIL import Image

    Image.new("RGB", (2, 500), "white").save(tmp_path / "strip.png")
    random_page_image(120, 160, seed=3).save(tmp_path / "page.png")
    make_pdf(tmp_path / "doc.pdf", [(200, 300), (2, 600)])  # page 2 is a strip too
    report = ingest([tmp_path], show_progress=False)
    failed = sorted((Path(e.source).name, e.page) for e in report.errors)
    assert failed == [("doc.pdf", 2), ("strip.png", None)]
    assert all("aspect ratio" in str(e) for e in report.errors)
    assert sorted(p.metadata.get("page") or 0 for p in report.pages) == [0, 1]
