"""The streaming upload of `POST /v1/files` (routes.py): a multipart/form-data body parsed chunk by chunk
as it arrives, its one part named `file` written straight to disk (files.py's incoming file), within a
bound on the file, on the whole body and on the room left in its key's upload quota; `UPLOAD_BODY` is the
request body the OpenAPI document shows for it. Plain Python and python-multipart: no Ray, no FastAPI."""


class TooLarge(Exception):
    pass


class Upload:
    """A multipart/form-data body parsed as it streams: its one part named `file` written to `path`, at
    most `limit` bytes of it, and at most `limit` + 1 MiB of body in all. `quota`: (bytes, error), a second
    bound on the file (the room left in its key's upload quota) and the error past it."""

    def __init__(self, path, boundary: bytes, limit: int, quota: tuple[int, str] | None = None):
        from python_multipart.multipart import MultipartParser

        self.path, self.limit, self.quota = path, limit, quota
        self.parts, self.size, self.body = 0, 0, 0
        self.filename: str | None = None
        self._out = None
        self._header: list[bytes] = [b"", b""]
        self._headers: dict[bytes, bytes] = {}
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": lambda d, a, b: self._add(0, d[a:b]),
            "on_header_value": lambda d, a, b: self._add(1, d[a:b]), "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._end})

    def _begin(self):
        self._headers, self._out = {}, None

    def _add(self, i: int, data: bytes):
        self._header[i] += data

    def _header_end(self):
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self):
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if params.get(b"name") == b"file":
            self.parts += 1
            if self.parts == 1:
                self.filename = params.get(b"filename", b"").decode("utf-8", "replace")
                self._out = open(self.path, "wb")

    def _data(self, data: bytes, start: int, end: int):
        if self._out is not None:
            self.size += end - start
            if self.size > self.limit:
                raise TooLarge(f"file of more than {self.limit} bytes, at most {self.limit}")
            if self.quota is not None and self.size > self.quota[0]:
                raise TooLarge(self.quota[1])
            self._out.write(data[start:end])

    def _end(self):
        if self._out is not None:
            self._out.close()
            self._out = None

    def write(self, chunk: bytes):
        self.body += len(chunk)
        if self.body > self.limit + 2**20:
            raise TooLarge(f"body of more than {self.limit + 2**20} bytes (a file of at most {self.limit})")
        self.parser.write(chunk)

    def close(self):
        self.parser.finalize()
        self._end()

    def abort(self):
        """Stop: the partial file is removed."""
        self._end()
        self.path.unlink(missing_ok=True)


UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "An image (PNG, JPEG, WebP...) or a video (MP4, WebM...)."}}}}}}
