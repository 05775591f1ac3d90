"""``csmcir serve``: a local search page over an index written by ``csmcir index``.

Routes (127.0.0.1 only): ``GET /`` the upload form; ``POST /search`` (multipart: ``image``,
``text``) the hits; ``GET /image/<n>`` the thumbnail of gallery row ``n`` (an integer row of the
index, never a path, so nothing outside the index's gallery can be reached). Uploads larger than
the limit, without a text, or that do not decode as an image are refused with a message on the
page (status 400 or 413).
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from ..errors import CsmcirError
from .html import content_words, highlight, thumbnail_bytes

__all__ = ["SearchApp", "make_server", "serve"]

_STYLE = """<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}.row{display:flex;gap:.6em;flex-wrap:wrap}
.card{width:150px;font-size:12px}.card img{width:96px;height:96px;object-fit:contain;background:#f4f4f4}
mark{background:#ffe27a}.error{color:#b00;font-weight:bold}</style>"""


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchApp:
    """The state behind the server: encoder, index, gallery images and captions."""

    def __init__(self, index_dir: str | Path, ckpt: str | Path, device: str = "auto", k: int = 10, max_upload_mb: float = 10.0):
        from ..data.custom import read_captions
        from ..data.registry import open_dataset
        from ..inference import Encoder
        from ..retrieval.index import GalleryIndex

        self.index = GalleryIndex.load(index_dir)
        self.encoder = Encoder.from_checkpoint(ckpt, device)
        if self.index.dim != self.encoder.dim:
            raise CsmcirError(
                f"index {index_dir} holds {self.index.dim}-d embeddings but checkpoint {ckpt} makes {self.encoder.dim}-d ones"
            )
        info = self.index.info
        if "root" not in info or "dataset" not in info:
            raise CsmcirError(f"{index_dir}: index_info.json names no dataset root (re-run `csmcir index`)")
        self.dataset = open_dataset(info["dataset"], info["root"], info.get("category"))
        if "split" in info:
            self.dataset.gallery(info["split"])  # real benchmarks resolve image paths per split
        self.ids = self.index.ids
        self.row = {i: n for n, i in enumerate(self.ids)}
        cap_file = Path(index_dir) / "captions.jsonl"
        self.captions = read_captions(cap_file) if cap_file.is_file() else {}
        self.k, self.max_bytes = k, int(max_upload_mb * 2**20)
        self._thumbs: dict[int, bytes] = {}

    # -- pages --------------------------------------------------------------------------------
    def form(self, message: str = "", text: str = "") -> str:
        err = f"<p class='error' id='error'>{html.escape(message)}</p>" if message else ""
        return (
            f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>csmcir search</title>"
            f"<link rel='icon' href='data:,'>{_STYLE}</head><body><h1>csmcir search</h1>{err}"
            "<form method='post' action='/search' enctype='multipart/form-data'>"
            "<p>reference image <input type='file' name='image' id='image' accept='image/*' required></p>"
            f"<p>modification text <input type='text' name='text' id='text' size='60' required value='{html.escape(text, quote=True)}'></p>"
            f"<p><button type='submit' id='go'>search</button> ({len(self.ids)} gallery images)</p></form>"
        )

    def results(self, image, text: str) -> str:
        q = self.encoder.encode([image], [text], side="query")
        scores, ids = self.index.search(q, self.k)
        words = content_words(text)
        ref = base64.b64encode(thumbnail_bytes(image, 96, "PNG")).decode()
        cards = []
        for rank, (i, s) in enumerate(zip(ids[0], scores[0]), start=1):
            cap = self.captions.get(i)
            caption = "" if cap is None else highlight(cap.final, words)
            cards.append(
                f"<div class='card hit' data-id='{html.escape(i, quote=True)}'><img src='/image/{self.row[i]}' alt='{html.escape(i, quote=True)}'>"
                f"<div>#{rank} {float(s):.3f} {html.escape(i)}</div><div>{caption}</div></div>"
            )
        return (
            self.form(text=text) + f"<h2>results for &ldquo;{html.escape(text)}&rdquo;</h2><div class='row'>"
            f"<div class='card ref'><img src='data:image/png;base64,{ref}' alt='reference'><div>reference</div></div>"
            + "".join(cards)
            + "</div></body></html>"
        )

    def thumbnail(self, row: int) -> bytes:
        if row not in self._thumbs:
            self._thumbs[row] = thumbnail_bytes(self.dataset.load_image(self.ids[row]), 96, "PNG")
        return self._thumbs[row]

    # -- uploads ------------------------------------------------------------------------------
    def parse_upload(self, content_type: str, body: bytes):
        """``(PIL image, text)`` from a multipart body, or :class:`UploadError`."""
        from PIL import Image, UnidentifiedImageError

        if not content_type.startswith("multipart/form-data"):
            raise UploadError(400, "expected a multipart/form-data upload")
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                fields[name] = part.get_payload(decode=True) or b""
        text = fields.get("text", b"").decode("utf-8", errors="replace").strip()
        data = fields.get("image", b"")
        if not data:
            raise UploadError(400, "no reference image uploaded")
        if not text:
            raise UploadError(400, "no modification text given")
        try:
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
                raise UploadError(400, f"unsupported image type {img.format}: upload a PNG, JPEG, WebP, GIF or BMP")
            img.load()
            return img.convert("RGB"), text
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise UploadError(400, "the uploaded file is not an image (or is corrupt)") from None


def _handler(app: SearchApp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "csmcir"

        def log_message(self, fmt, *args):  # one line per request on stderr
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

        def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = unquote(self.path.split("?", 1)[0])
            if path == "/":
                return self._send(200, app.form().encode())
            if path.startswith("/image/"):
                n = path[len("/image/") :]
                if n.isdigit() and int(n) < len(app.ids):  # a row number, never a file path
                    return self._send(200, app.thumbnail(int(n)), "image/png")
            return self._send(404, b"not found", "text/plain; charset=utf-8")

        def do_POST(self):
            if self.path != "/search":
                return self._send(404, b"not found", "text/plain; charset=utf-8")
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            try:
                if length < 0:
                    raise UploadError(411, "the upload has no length")
                if length > app.max_bytes:
                    self.close_connection = True  # the body is not read
                    raise UploadError(413, f"the upload is larger than {app.max_bytes / 2**20:.0f} MB")
                image, text = app.parse_upload(self.headers.get("Content-Type", ""), self.rfile.read(length))
                return self._send(200, app.results(image, text).encode())
            except UploadError as e:
                return self._send(e.status, (app.form(str(e)) + "</body></html>").encode())

    return Handler


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer((host, port), _handler(app))
    except OSError as e:
        raise CsmcirError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(
    index_dir, ckpt, host: str = "127.0.0.1", port: int = 8765, device: str = "auto", k: int = 10, max_upload_mb: float = 10.0
) -> None:
    app = SearchApp(index_dir, ckpt, device, k, max_upload_mb)
    server = make_server(app, host, port)
    print(json.dumps({"url": f"http://{host}:{server.server_address[1]}/", "gallery": len(app.ids)}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
