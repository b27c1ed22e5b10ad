"""``/api/v1/workdirs``: a job's project folder, packed (tar.gz) and stored
content-addressed, so that a job can name it (``workdir: "sha256:<hex>"``).

The CLI packs the folder (``gpuscout.workdir.pack``), asks whether its
digest is stored already (``GET``), and uploads it only if not (``POST``):
one upload per content, whatever the number of jobs that use it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Request, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from gpuscout import workdir
from gpuscout.api.deps import Reader, ServiceDep, Writer
from gpuscout.api.errors import answers

router = APIRouter(prefix="/workdirs", tags=["workdirs"], dependencies=[Reader])

# What workdir.parse_ref accepts; stated in the OpenAPI, checked by parse_ref
# (whose messages say what is wrong with a ref).
REF_PATTERN = r"^sha256:[0-9a-f]{64}$"


class WorkdirPublic(BaseModel):
    ref: str = Field(description='"sha256:<hex>" of the archive; the value of a job\'s workdir')
    size_bytes: int | None = None
    files: int | None = None
    uploaded: bool = Field(default=False, description="false when it was stored already")


def _bad(message: str, loc: tuple[str, str] = ("body", "workdir")) -> HTTPException:
    return HTTPException(422,
                         detail=[{"loc": list(loc), "field": loc[1], "msg": message,
                                  "type": "value_error"}])


@router.get("/{ref}", summary="Whether a packed workdir is stored (404 if not)",
            responses=answers({404: "no workdir with this ref is stored"}))
def get_workdir(
    ref: Annotated[str, Path(json_schema_extra={"pattern": REF_PATTERN})], service: ServiceDep,
) -> WorkdirPublic:
    try:
        key = workdir.key_of(ref)
    except ValueError as err:
        raise _bad(str(err), ("path", "ref")) from None
    if not service.plane.ctx.store.exists(key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"workdir {ref} is not stored")
    return WorkdirPublic(ref=ref)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Writer],
             summary="Upload a packed workdir (the body: a .tar.gz)",
             openapi_extra={"requestBody": {"content": {"application/gzip": {
                 "schema": {"type": "string", "format": "binary"}}}, "required": True}})
async def upload_workdir(
    request: Request, service: ServiceDep,
    content_length: Annotated[int | None, Header()] = None,
) -> WorkdirPublic:
    limit = workdir.MAX_WORKDIR_BYTES
    if content_length is not None and content_length > limit:
        raise _bad(f"the archive is {content_length} bytes, over the {limit}-byte limit")
    store = service.plane.ctx.store
    digest = hashlib.sha256()
    size = 0
    fd, path = tempfile.mkstemp(suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _bad(f"the archive is over the {limit}-byte limit")
                digest.update(chunk)
                f.write(chunk)
        if size == 0:
            raise _bad("the body is empty: send the packed folder (a .tar.gz)")
        try:
            files = await run_in_threadpool(workdir.check_archive, FilePath(path))
        except ValueError as err:
            raise _bad(str(err).replace("workdir archive upload", "the archive")) from None
        ref = f"sha256:{digest.hexdigest()}"
        key = workdir.key_of(ref)
        if await run_in_threadpool(store.exists, key):
            return WorkdirPublic(ref=ref, size_bytes=size, files=files, uploaded=False)
        await run_in_threadpool(store.put_file, key, path)
        return WorkdirPublic(ref=ref, size_bytes=size, files=files, uploaded=True)
    finally:
        os.unlink(path)
