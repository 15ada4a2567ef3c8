"""Reading request bodies within limits, and multipart forms kept in memory.

Starlette spools multipart files above 1 MB to a temporary file on disk; an uploaded DICOM is
patient data, so :class:`MemoryMultiPartParser` keeps every part in memory (the request size limit
bounds it) and nothing of an upload is ever written anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

MAX_FORM_FIELDS = 32


class MemoryMultiPartParser(MultiPartParser):
    spool_max_size = 2**62  # never roll over to disk: uploads may be patient data


@dataclass(frozen=True)
class Upload:
    data: bytes
    content_type: str | None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it exceeds ``limit`` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"Request body of {declared} bytes exceeds this server's limit of {limit} bytes."
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"Request body exceeds this server's limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def read_uploads(
    request: Request, *, max_bytes: int, max_files: int
) -> tuple[list[Upload], dict[str, str]]:
    """Files of a raw-body or multipart request, plus the multipart's text fields."""
    body = await read_body(request, max_bytes)
    ctype = request.headers.get("content-type", "")
    if ctype.lower().startswith("multipart/form-data"):
        parser = MemoryMultiPartParser(
            request.headers,
            _once(body),
            max_files=max_files,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=max_bytes,
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"Malformed multipart body: {exc.message}") from None
        files, fields = [], {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if data:
                    files.append(Upload(data, value.content_type))
                await value.close()
            else:
                fields[name] = value
        return files, fields
    return ([Upload(body, ctype or None)] if body else []), {}
