"""S3 through ``s3fs``: the streaming multipart upload ``torch.save`` writes into, its retried
requests, and aborts of uploads that failed or that a killed writer left.

``torch.save`` writes into :class:`S3Upload`, which cuts the stream into parts and uploads each
one while serialization goes on (at most ``max_inflight`` parts in memory). Small checkpoints go
up as one ``PutObject``. The object appears only when ``CompleteMultipartUpload`` succeeds, which
S3 does atomically. Any failure aborts the upload; an abort that cannot reach the server is
retried before the next upload and at teardown.

``s3fs``'s private ``_call_s3`` is used here and only here: it is the one entry that goes through
s3fs's session, credentials and transport retries for an arbitrary S3 API call.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from ..errors import RemoteStorageError
from ..redaction import shown
from .fsspec import is_s3, url_to_fs
from .hashing import Sha256Tee
from .retry import Retry, RetryPolicy, call_with_retries, error_code
from .secrets import secret_values

log = logging.getLogger("asyncckpt.remote")  # the name users configure; kept from before the move

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest part, except the last one
MAX_PARTS = 10_000


def _run(fs: Any, coro: Any) -> "Future[Any]":
    """Schedule ``coro`` on the filesystem's event loop; returns a ``concurrent.futures.Future``."""
    return asyncio.run_coroutine_threadsafe(coro, fs.loop)


def s3_call(fs: Any, method: str, **kwargs: Any) -> Any:
    """One S3 API call through ``s3fs`` (its session, credentials and transport retries)."""
    return _run(fs, fs._call_s3(method, **kwargs)).result()


async def s3_call_with_retries(fs: Any, method: str, policy: RetryPolicy, url: str, secrets: List[str],
                               **kwargs: Any) -> Any:
    """One S3 API call on the filesystem's event loop, retried (no error passes through)."""
    return await Retry(policy, f"S3 {method} of", url, secrets).acall(lambda: fs._call_s3(method, **kwargs))


# -- aborts that could not reach the server ----------------------------------------------------


class _AbortNotReached(Exception):
    """An abort that did not reach the server (its error was logged where it happened)."""


_pending_aborts: Dict[Tuple[int, str, str, str], Tuple[Any, str]] = {}
_pending_lock = threading.Lock()


def _abort_upload(fs: Any, bucket: str, key: str, upload_id: str, url: str) -> bool:
    """Abort a multipart upload (a missing one counts as aborted); returns whether it worked."""
    try:
        s3_call(fs, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as err:  # noqa: BLE001 - kept for a later try
        if error_code(err) == "NoSuchUpload" or isinstance(err, FileNotFoundError):
            return True
        log.debug("asyncckpt: abort of an upload to %s failed: %s", shown(url), type(err).__name__)
        return False
    return True


def retry_pending_aborts() -> int:
    """Try again the aborts that failed earlier (server down); returns how many are still left.

    Runs before every S3 upload and at teardown, so a server that comes back is left with no
    orphan parts.
    """
    with _pending_lock:
        items = list(_pending_aborts.items())
    for entry, (fs, url) in items:
        _, bucket, key, upload_id = entry
        if _abort_upload(fs, bucket, key, upload_id, url):
            with _pending_lock:
                _pending_aborts.pop(entry, None)
            log.info("asyncckpt: aborted the unfinished upload of %s left by an earlier failure", url)
    with _pending_lock:
        left = len(_pending_aborts)
    return left


def pending_aborts() -> List[str]:
    """URLs of failed uploads whose abort has not reached the server yet."""
    with _pending_lock:
        return [url for _, url in _pending_aborts.values()]


# -- the streaming S3 upload ------------------------------------------------------------------


class S3Upload:
    """The file object ``torch.save`` writes into: parts upload while serialization goes on.

    Memory: at most ``max_inflight`` parts being uploaded plus the one being filled. Nothing is
    visible at the URL until :meth:`commit`; :meth:`abort` removes every uploaded part.
    """

    def __init__(
        self,
        fs: Any,
        url: str,
        fs_path: str,
        *,
        policy: RetryPolicy,
        part_bytes: int,
        max_inflight: int,
        secrets: List[str],
        sha256: bool = False,
    ) -> None:
        self._fs = fs
        self.url = shown(url)  # for messages and logs only; the upload goes to ``fs_path``
        self.bucket, self.key, _ = fs.split_path(fs_path)
        self._policy = policy
        self._part_bytes = max(int(part_bytes), MIN_PART_BYTES)
        self._max_inflight = max(1, int(max_inflight))
        self._secrets = secrets
        self._hash = Sha256Tee() if sha256 else None
        self._buf = bytearray(self._part_bytes)
        self._fill = 0
        self.error: Optional[BaseException] = None
        self._written = 0
        self._upload_id: Optional[str] = None
        self._inflight: Deque[Tuple[int, "Future[Any]", int]] = collections.deque()
        self._parts: List[Dict[str, Any]] = []
        self._finished = False

    # file protocol used by torch.save
    def write(self, data: Any) -> int:
        try:
            return self._write(data)
        except BaseException as err:
            self.error = err  # torch.save replaces it with an opaque RuntimeError; the caller re-raises this
            raise

    def _write(self, data: Any) -> int:
        if self._finished:
            raise RuntimeError(f"the upload of {self.url!r} is already finished")
        view = memoryview(data).cast("B")
        n = len(view)
        if self._hash is not None:
            self._hash.update(view)
        while len(view):
            room = len(self._buf) - self._fill
            take = min(room, len(view))
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == len(self._buf):
                self._send_part(final=False)
        self._written += n
        return n

    def _take_buffer(self, fresh: bool = True) -> bytearray:
        """The bytes filled so far (no copy), and a fresh buffer for the next part."""
        body = self._buf
        del body[self._fill :]
        self._buf, self._fill = (bytearray(self._part_bytes) if fresh else bytearray()), 0
        return body

    def flush(self) -> None:
        """Nothing to do: parts go up as they fill; :meth:`commit` sends the rest."""

    def tell(self) -> int:
        return self._written

    def writable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._written

    def sha256(self) -> Optional[str]:
        """Hex SHA-256 of everything written (with ``sha256=True``)."""
        return self._hash.hexdigest() if self._hash is not None else None

    # parts
    def _send_part(self, *, final: bool) -> None:
        if self._upload_id is None:
            created = _run(
                self._fs,
                s3_call_with_retries(self._fs, "create_multipart_upload", self._policy, self.url, self._secrets,
                                      Bucket=self.bucket, Key=self.key),
            ).result()
            self._upload_id = created["UploadId"]
        number = len(self._parts) + len(self._inflight) + 1
        if number > MAX_PARTS:
            raise RemoteStorageError(
                f"checkpoint {self.url!r} needs more than {MAX_PARTS} parts of {self._part_bytes} bytes; "
                "raise TorchCheckpointIO(part_bytes=...)",
                self.url,
            )
        if number % 1000 == 0:  # parts may differ in size: grow them so huge files fit in 10,000
            self._part_bytes *= 2
        body = self._take_buffer()
        future = _run(
            self._fs,
            s3_call_with_retries(self._fs, "upload_part", self._policy, self.url, self._secrets, Bucket=self.bucket,
                                  Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body),
        )
        self._inflight.append((number, future, len(body)))
        while len(self._inflight) >= self._max_inflight or (final and self._inflight):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        number, future, _ = self._inflight.popleft()
        result = future.result()
        self._parts.append({"PartNumber": number, "ETag": result["ETag"]})

    def commit(self, before_complete: Optional[Callable[[], None]] = None) -> None:
        """Make the object appear: upload what is left, complete, and check its size on the server.

        ``before_complete`` runs once every byte is uploaded and before the object appears.
        """
        if self._finished:
            raise RuntimeError(f"the upload of {self.url!r} is already finished")
        if self._upload_id is None:
            body = self._take_buffer(fresh=False)
            if before_complete is not None:
                before_complete()
            call_with_retries(
                "S3 PutObject of", self.url,
                lambda: s3_call(self._fs, "put_object", Bucket=self.bucket, Key=self.key, Body=body),
                self._policy, self._secrets,
            )
        else:
            if self._fill or not (self._parts or self._inflight):
                self._send_part(final=True)
            while self._inflight:
                self._wait_oldest()
            if before_complete is not None:
                before_complete()
            self._complete()
        self._finished = True
        self._check_size()

    def _complete(self) -> None:
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])

        def completed_by_earlier_try(err: BaseException, attempt: int) -> bool:
            if attempt > 1 and error_code(err) == "NoSuchUpload" and self._completed_by_earlier_try(parts):
                log.info("asyncckpt: the completion of %s had gone through before its reply was lost", self.url)
                return True
            return False

        Retry(self._policy, "S3 CompleteMultipartUpload of", self.url, self._secrets, log_what="completing",
              recover=completed_by_earlier_try).call(
            lambda: s3_call(self._fs, "complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                            UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        )

    def _completed_by_earlier_try(self, parts: List[Dict[str, Any]]) -> bool:
        """Whether the object on the server is this upload (its multipart ETag and size match)."""
        try:  # a part's ETag is the MD5 of its bytes; the object's is the MD5 of those, then "-<parts>"
            digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
        except ValueError:
            return False
        expected = hashlib.md5(digests, usedforsecurity=False).hexdigest() + f"-{len(parts)}"
        try:
            head = s3_call(self._fs, "head_object", Bucket=self.bucket, Key=self.key)
        except Exception:  # noqa: BLE001 - then it did not go through
            return False
        return head.get("ETag", "").strip('"') == expected and head.get("ContentLength") == self._written

    def _check_size(self) -> None:
        """Nothing is reported saved that is not there: the server must hold every byte written."""
        head = call_with_retries(
            "S3 HeadObject of", self.url,
            lambda: s3_call(self._fs, "head_object", Bucket=self.bucket, Key=self.key),
            self._policy, self._secrets,
        )
        if head.get("ContentLength") != self._written:
            raise RemoteStorageError(
                f"checkpoint {self.url!r} was uploaded with {self._written} bytes but the server holds "
                f"{head.get('ContentLength')}; the object is not a complete checkpoint, save it again",
                self.url,
            )

    def abort(self) -> None:
        """Drop the upload: wait for parts in flight, then abort it (later, if the server is down)."""
        self._finished = True
        self._buf, self._fill = bytearray(), 0
        for _, future, _ in self._inflight:
            future.cancel()
        for _, future, _ in self._inflight:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the upload is being dropped anyway
                pass
        self._inflight.clear()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None

        def abort_once() -> None:
            if not _abort_upload(self._fs, self.bucket, self.key, upload_id, self.url):
                raise _AbortNotReached(self.url)

        try:  # every failure is worth another try (it was logged at debug level); no warning per try
            Retry(self._policy, "aborting the upload of", self.url, self._secrets, transient=lambda err: True,
                  warn=False).call(abort_once)
            return
        except RemoteStorageError:
            pass
        with _pending_lock:
            _pending_aborts[(id(self._fs), self.bucket, self.key, upload_id)] = (self._fs, self.url)
        log.warning(
            "asyncckpt: could not abort the unfinished upload of %s (server unreachable); asyncckpt tries again "
            "before its next upload and at teardown. Its parts cost storage until then (a bucket lifecycle rule "
            "AbortIncompleteMultipartUpload cleans them up after a crash)",
            self.url,
        )



def abort_stale_uploads(url: str, older_than_seconds: float,
                        storage_options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Abort the S3 multipart uploads under ``url`` (a bucket or prefix) started more than
    ``older_than_seconds`` ago: the parts a killed writer left. Returns their keys.

    Younger uploads are kept: a writer may still be working on them.
    """
    import datetime

    fs, fs_path = url_to_fs(url, storage_options)
    if not is_s3(fs):
        raise ValueError(f"{shown(url)!r} is not an s3:// URL; only S3 multipart uploads can be left behind")
    bucket, prefix, _ = fs.split_path(fs_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    aborted: List[str] = []
    kwargs: Dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    secrets = secret_values(storage_options, url)
    while True:
        page = call_with_retries("listing the unfinished uploads under", url,
                                 lambda: s3_call(fs, "list_multipart_uploads", **kwargs), RetryPolicy(), secrets)
        for upload in page.get("Uploads", []):
            initiated = upload["Initiated"]
            if initiated.tzinfo is None:
                initiated = initiated.replace(tzinfo=datetime.timezone.utc)
            if (now - initiated).total_seconds() >= older_than_seconds:
                if _abort_upload(fs, bucket, upload["Key"], upload["UploadId"], f"s3://{bucket}/{upload['Key']}"):
                    aborted.append(f"s3://{bucket}/{upload['Key']}")
        if not page.get("IsTruncated"):
            return aborted
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
