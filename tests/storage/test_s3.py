"""Checkpoints in S3, against a live S3 server (moto's) on 127.0.0.1, through s3fs over HTTP.

The server starts once per test session on a free port. Faults: the server is stopped for
real mid-upload; server errors (500, 503, throttling) and a server echoing the access key in
an error come from a small real HTTP proxy in front of it (fault injection: a local server
cannot be made to answer those on cue; said in tests/_children/_s3_server.py).
"""

from __future__ import annotations

import logging
import os
import traceback
import uuid

import pytest
import torch

from _s3_server import ACCESS_KEY, SECRET_KEY, SECRETS, SESSION_TOKEN, FaultProxy, MotoServer

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'asyncckpt[test]')")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'asyncckpt[test]')")

import asyncckpt  # noqa: E402
from asyncckpt import AsyncCheckpointIO, TorchCheckpointIO  # noqa: E402

_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ENV_NAMES = (*_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def server():
    """moto's S3 server, once per session; the environment points s3fs at it (as a user's would)."""
    srv = MotoServer()
    srv.start()
    saved = {name: os.environ.get(name) for name in _ENV_NAMES}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=srv.endpoint)
    os.environ.pop("AWS_PROFILE", None)
    s3fs.S3FileSystem.clear_instance_cache()
    yield srv
    srv.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    s3fs.S3FileSystem.clear_instance_cache()


_ADMINS = {}


def admin(endpoint: str):
    """An s3fs filesystem for the test's own checks: its own instance (not the one the code under
    test uses), made once per endpoint (building a client costs seconds), listings never cached."""
    fs = _ADMINS.get(endpoint)
    if fs is None:
        fs = _ADMINS[endpoint] = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, token=SESSION_TOKEN,
                                                   client_kwargs={"endpoint_url": endpoint},
                                                   skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


@pytest.fixture
def bucket(server):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    admin(server.endpoint).mkdir(name)
    return name


def orphans(endpoint: str, bucket: str):
    """Multipart uploads started and neither completed nor aborted."""
    return admin(endpoint).call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def options(endpoint: str, **extra):
    return {"key": ACCESS_KEY, "secret": SECRET_KEY, "token": SESSION_TOKEN,
            "client_kwargs": {"endpoint_url": endpoint}, **extra}


@pytest.fixture
def no_env_credentials(server, monkeypatch):
    """Only explicit storage_options can reach the server now (the case of issue 14)."""
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs caches filesystems, with the credentials they found
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def ckpt(value: float = 1.0, mb: float = 0.1):
    n = max(1, int(mb * 1e6 / 4))
    return {"w": torch.full((n,), float(value)), "step": int(value), "meta": {"name": "run"}}


def fast_retry(attempts: int = 3):
    from asyncckpt import RetryPolicy

    return RetryPolicy(attempts=attempts, backoff=0.01, max_backoff=0.05)


# -- round trip and credentials once -----------------------------------------------------------


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_save_load_remove_with_options_given_once_at_save(server, bucket, writer, no_env_credentials):
    io = AsyncCheckpointIO(TorchCheckpointIO(), writer=writer)
    url = f"s3://{bucket}/run/step=1.ckpt"
    try:
        io.save_checkpoint(ckpt(1.0), url, storage_options=options(server.endpoint))
        loaded = io.load_checkpoint(url)  # no options: those of the save are remembered
        assert loaded["step"] == 1 and torch.equal(loaded["w"], ckpt(1.0)["w"])
        io.remove_checkpoint(url)
        io.flush()
    finally:
        io.teardown()
    assert not admin(server.endpoint).exists(f"{bucket}/run/step=1.ckpt")
    assert orphans(server.endpoint, bucket) == []


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_options_given_at_construction(server, bucket, writer, no_env_credentials):
    io = AsyncCheckpointIO(TorchCheckpointIO(storage_options=options(server.endpoint)), writer=writer)
    url = f"s3://{bucket}/a.ckpt"
    try:
        io.save_checkpoint(ckpt(2.0), url)
        assert io.load_checkpoint(url)["step"] == 2
        io.remove_checkpoint(url)
        io.flush()
    finally:
        io.teardown()
    assert not admin(server.endpoint).exists(f"{bucket}/a.ckpt")


def test_environment_credentials_keep_working(server, bucket):
    io = AsyncCheckpointIO(TorchCheckpointIO())
    url = f"s3://{bucket}/env.ckpt"
    try:
        io.save_checkpoint(ckpt(3.0), url)
        assert io.load_checkpoint(url)["step"] == 3
        io.remove_checkpoint(url)
        io.flush()
    finally:
        io.teardown()
    assert not admin(server.endpoint).exists(f"{bucket}/env.ckpt")


def test_remove_and_load_are_ordered_after_pending_saves(server, bucket):
    io = AsyncCheckpointIO(TorchCheckpointIO(), max_pending=4)
    url = f"s3://{bucket}/o.ckpt"
    try:
        for i in range(3):
            io.save_checkpoint(ckpt(float(i), mb=2), url)
            assert io.load_checkpoint(url)["step"] == i
        io.save_checkpoint(ckpt(9.0), url)
        io.remove_checkpoint(url)
        io.save_checkpoint(ckpt(10.0), f"s3://{bucket}/p.ckpt")
        io.flush()
        assert not admin(server.endpoint).exists(f"{bucket}/o.ckpt")
        assert io.load_checkpoint(f"s3://{bucket}/p.ckpt")["step"] == 10
    finally:
        io.teardown()


# -- streaming and atomicity -------------------------------------------------------------------


_MEMORY_CHILD = """
import sys, tracemalloc, torch
from asyncckpt import TorchCheckpointIO
part = 5 * 1024 * 1024
io = TorchCheckpointIO(part_bytes=part, max_inflight_parts=1)
big = {"w": torch.ones(32 * 1024 * 1024)}  # 128 MiB of tensor bytes (torch memory, not traced)
tracemalloc.start()
io.save_checkpoint(big, sys.argv[1])
print(tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
def test_large_save_streams_into_a_multipart_upload_with_bounded_memory(server, bucket):
    """The save runs in a child process, so only the client's memory is traced (the server is here)."""
    from _subproc import run_python

    part = 5 * 1024 * 1024
    url = f"s3://{bucket}/big.ckpt"
    out = run_python(_MEMORY_CHILD, url, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    head = admin(server.endpoint).call_s3("head_object", Bucket=bucket, Key="big.ckpt")
    assert head["ETag"].strip('"').endswith(f"-{head['ContentLength'] // part + 1}")  # one part per 5 MiB
    assert head["ContentLength"] > 128 * 1024 * 1024
    # Python-side buffers: the parts being filled and sent, the transport's copies of them, and
    # botocore's service models; never the whole 128 MiB file.
    assert peak < 64 * 1024 * 1024, f"peak Python memory {peak / 1e6:.1f} MB during a 128 MiB upload"
    assert orphans(server.endpoint, bucket) == []


def test_unpicklable_checkpoint_commits_nothing_and_keeps_the_previous_object(server, bucket):
    io = TorchCheckpointIO(part_bytes=5 * 1024 * 1024)
    url = f"s3://{bucket}/keep.ckpt"
    io.save_checkpoint(ckpt(1.0), url)
    with pytest.raises(asyncckpt.NotSerializableError):
        io.save_checkpoint({"w": torch.zeros(4 << 20), "f": lambda: None}, url)
    assert io.load_checkpoint(url)["step"] == 1
    assert orphans(server.endpoint, bucket) == []


# -- faults ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _session_proxy(server):
    p = FaultProxy(server.port)
    yield p
    p.close()


@pytest.fixture
def proxy(_session_proxy):
    """The fault proxy in front of the session's server; one endpoint, so s3fs reuses its clients."""
    _session_proxy.clear()
    yield _session_proxy
    _session_proxy.clear()


def no_transport_retries(endpoint: str):
    """Options whose botocore does no retries of its own, so the test counts asyncckpt's."""
    return options(endpoint, config_kwargs={"retries": {"total_max_attempts": 1}})


@pytest.mark.parametrize("error", ["500", "503", "slowdown"])
def test_server_errors_are_retried_then_the_save_succeeds(proxy, bucket, error):
    io = TorchCheckpointIO(storage_options=no_transport_retries(proxy.endpoint), retry=fast_retry(4),
                           part_bytes=5 * 1024 * 1024)
    url = f"s3://{bucket}/r.ckpt"
    value = ckpt(5.0, mb=12)
    proxy.fail("UploadPart", error, times=2, after=1)
    io.save_checkpoint(value, url)
    assert [a for _, a in proxy.injected] == [error, error]
    proxy.clear()
    assert torch.equal(io.load_checkpoint(url)["w"], value["w"])
    assert orphans(proxy.endpoint, bucket) == []


def test_persistent_errors_fail_loudly_after_bounded_retries(proxy, bucket, caplog):
    inner = TorchCheckpointIO(storage_options=no_transport_retries(proxy.endpoint), retry=fast_retry(3),
                              part_bytes=5 * 1024 * 1024, max_inflight_parts=1)
    io = AsyncCheckpointIO(inner)
    url = f"s3://{bucket}/fail.ckpt"
    io.save_checkpoint(ckpt(1.0), url)
    io.flush()
    proxy.fail("UploadPart", "503")
    io.save_checkpoint(ckpt(2.0, mb=12), url)
    with pytest.raises(asyncckpt.CheckpointSaveError) as info:
        io.flush()
    assert url in str(info.value) and "3 tries" in str(info.value) and "HTTP 503" in str(info.value)
    assert proxy.count("UploadPart") == 3  # exactly the policy's attempts (s3fs skips 503s; botocore is off)
    assert isinstance(info.value.__cause__, asyncckpt.RemoteStorageError)
    proxy.clear()
    assert io.load_checkpoint(url)["step"] == 1  # the previous object is intact
    assert orphans(proxy.endpoint, bucket) == []  # the failed upload was aborted
    io.save_checkpoint(ckpt(3.0), url)  # and the engine works on
    io.flush()
    assert io.load_checkpoint(url)["step"] == 3
    io.teardown()


def test_server_stopped_mid_upload_then_back(server, bucket):
    """The server really stops while parts are uploading; the save fails naming the URL; the
    previous object is intact; once the server is back the engine works and no upload is orphaned."""
    own = MotoServer()
    own.start()
    front = FaultProxy(own.port)
    try:
        inner = TorchCheckpointIO(storage_options=no_transport_retries(front.endpoint), retry=fast_retry(2),
                                  part_bytes=5 * 1024 * 1024)
        io = AsyncCheckpointIO(inner)
        url = f"s3://{bucket}/down.ckpt"
        io.save_checkpoint(ckpt(1.0), url)
        io.flush()
        front.fail("UploadPart", "forward", times=1, after=1, then=own.stop)  # stop at the 2nd part
        io.save_checkpoint(ckpt(2.0, mb=16), url)
        with pytest.raises(asyncckpt.CheckpointSaveError) as info:
            io.flush()
        assert url in str(info.value)
        assert asyncckpt.remote.pending_aborts() == [url]  # the abort could not reach the server
        own.start()  # the server comes back on the same address
        front.clear()
        assert io.load_checkpoint(url)["step"] == 1
        io.save_checkpoint(ckpt(3.0, mb=8), url)
        io.flush()
        assert io.load_checkpoint(url)["step"] == 3
        assert asyncckpt.remote.pending_aborts() == []
        assert orphans(server.endpoint, bucket) == []
        io.teardown()
    finally:
        front.close()
        own.stop()


def test_lost_reply_to_complete_is_not_a_failure(proxy, bucket):
    """The completion goes through but its reply is lost; the retry finds the object complete."""
    io = TorchCheckpointIO(storage_options=no_transport_retries(proxy.endpoint), retry=fast_retry(3),
                           part_bytes=5 * 1024 * 1024)
    url = f"s3://{bucket}/c.ckpt"
    value = ckpt(4.0, mb=12)
    proxy.fail("CompleteMultipartUpload", "lost-reply", times=1)
    io.save_checkpoint(value, url)
    assert proxy.injected == [("CompleteMultipartUpload", "lost-reply")]
    assert proxy.count("CompleteMultipartUpload") == 2
    proxy.clear()
    assert torch.equal(io.load_checkpoint(url)["w"], value["w"])


# -- secrets -----------------------------------------------------------------------------------


def _all_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(err)) + repr(err)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_secrets_never_appear_in_logs_messages_reprs_or_stats(proxy, bucket, caplog, writer):
    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    opts = no_transport_retries(proxy.endpoint)
    inner = TorchCheckpointIO(storage_options=opts, retry=fast_retry(2))
    io = AsyncCheckpointIO(inner, writer=writer)
    url = f"s3://{bucket}/secret.ckpt"
    io.save_checkpoint(ckpt(1.0), url, storage_options=opts)
    io.flush()
    texts = [repr(io), repr(inner), str(io.stats), repr(io.stats)]
    # A server that echoes the access key in its error message (some S3-compatible ones do).
    proxy.fail("PutObject", "bad-key")
    io.save_checkpoint(ckpt(2.0), url, storage_options=opts)
    with pytest.raises(asyncckpt.CheckpointSaveError) as info:
        io.flush()
    assert url in str(info.value) and "credentials" in str(info.value)
    texts.append(_all_text(info.value))
    proxy.fail("PutObject", "503")
    io.save_checkpoint(ckpt(3.0), url)
    with pytest.raises(asyncckpt.CheckpointSaveError) as info:
        io.flush()
    texts.append(_all_text(info.value))
    proxy.clear()
    from asyncckpt.writer import Operation

    texts.append(repr(Operation("save", url, url, storage_options=opts)))
    io.teardown()
    texts += [record.getMessage() for record in caplog.records]
    texts += [_all_text(r.exc_info[1]) for r in caplog.records if r.exc_info]
    joined = "\n".join(texts)
    assert "secret.ckpt" in joined and "503" in joined  # the text is there, only the secrets are not
    for secret in SECRETS:
        assert secret not in joined


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_signed_query_in_an_s3_url_never_appears_in_errors_logs_stats_reprs_or_the_cli(
    server, bucket, caplog, capsys, writer
):
    from asyncckpt.__main__ import main

    caplog.set_level(logging.DEBUG, logger="asyncckpt")
    query = "?X-Amz-Signature=SIGvalue-0a1b2c3d&X-Amz-Credential=CREDvalue-4e5f6a7b"
    shown = "?X-Amz-Signature=***&X-Amz-Credential=***"
    url = f"s3://{bucket}/signed.ckpt{query}"
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/signed.ckpt{query}"
    io = AsyncCheckpointIO(TorchCheckpointIO(retry=fast_retry(2)), writer=writer)
    io.save_checkpoint(ckpt(1.0), url)
    io.flush()
    assert [s.path for s in io.stats] == [f"s3://{bucket}/signed.ckpt{shown}"]
    texts = [repr(io), repr(io.stats)]
    io.save_checkpoint(ckpt(2.0), missing)  # the bucket does not exist: the save fails for real
    with pytest.raises(asyncckpt.CheckpointSaveError) as info:
        io.flush()
    assert shown in str(info.value) and info.value.path.endswith(shown)
    texts.append(_all_text(info.value))
    assert main(["verify", url, missing]) == 1
    texts.append(str(capsys.readouterr()))
    io.teardown()
    texts += [record.getMessage() for record in caplog.records]
    texts += [_all_text(r.exc_info[1]) for r in caplog.records if r.exc_info]
    joined = "\n".join(texts)
    assert "signed.ckpt" in joined and "X-Amz-Signature=***" in joined and f"OK s3://{bucket}" in joined
    assert "SIGvalue" not in joined and "CREDvalue" not in joined


def test_the_cli_names_a_url_it_cannot_read_without_its_credentials(server, bucket, capsys):
    """A URL the S3 client refuses before any request (user info read as the bucket name) or a
    bucket that does not exist: ``verify`` and ``cleanup`` print FAIL and exit 1, and neither the
    output nor a traceback shows the password."""
    from asyncckpt.__main__ import main

    userinfo = f"s3://KEYID:pw-Secret-42@{bucket}/p.ckpt"
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/prefix"
    assert main(["verify", userinfo]) == 1
    assert main(["cleanup", userinfo]) == 1
    assert main(["cleanup", missing]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert "pw-Secret-42" not in text
    assert f"FAIL s3://***@{bucket}/p.ckpt" in out.err and f"FAIL {missing}" in out.err


def test_verify_cli_and_load_verify_on_s3(server, bucket, capsys):
    from asyncckpt.__main__ import main

    io = TorchCheckpointIO(checksum=True)
    url = f"s3://{bucket}/v.ckpt"
    io.save_checkpoint(ckpt(1.0, mb=1), url)
    io.save_checkpoint(ckpt(2.0, mb=1), url)
    fs = admin(server.endpoint)
    assert len(fs.cat_file(f"{bucket}/v.ckpt.sha256").splitlines()) == 1
    assert io.load_checkpoint(url, verify=True)["step"] == 2
    assert main(["verify", url]) == 0
    assert "sha256" in capsys.readouterr().out
    plain = f"s3://{bucket}/plain.ckpt"
    TorchCheckpointIO().save_checkpoint(ckpt(3.0, mb=1), plain)
    assert main(["verify", plain]) == 0
    assert "CRC32" in capsys.readouterr().out
    data = bytearray(fs.cat_file(f"{bucket}/plain.ckpt"))
    data[len(data) // 2] ^= 0xFF  # a flipped bit in tensor data
    fs.pipe_file(f"{bucket}/plain.ckpt", bytes(data))
    assert main(["verify", plain]) == 1
    assert "corrupted" in capsys.readouterr().err
    with pytest.raises(asyncckpt.IntegrityError):
        TorchCheckpointIO().load_checkpoint(plain, verify=True)
    io.remove_checkpoint(url)
    assert not fs.exists(f"{bucket}/v.ckpt.sha256")


# -- Lightning ---------------------------------------------------------------------------------


def _objects(endpoint: str, prefix: str):
    """Object name -> the global_step stored in it."""
    fs = admin(endpoint)
    out = {}
    for path in fs.find(prefix):
        with fs.open(path, "rb") as f:
            out[path[len(prefix) + 1:]] = torch.load(f, weights_only=False)["global_step"]
    return out


@pytest.mark.lightning
@pytest.mark.slow
@pytest.mark.parametrize("base", ["asyncckpt", "lightning"])
@pytest.mark.parametrize("family", ["lightning", "pytorch_lightning"])
def test_lightning_model_checkpoint_to_s3_matches_sync_and_resumes(server, bucket, family, base, tmp_path):
    from _lightning_helpers import load_family, make_module, make_trainer

    fam = load_family(family)
    config = dict(save_top_k=2, monitor="score", mode="max", save_last=True, every_n_train_steps=1, filename="{step}")
    sync_mc = fam.pl.callbacks.ModelCheckpoint(dirpath=f"s3://{bucket}/sync", **config)
    make_trainer(fam, tmp_path, callbacks=[sync_mc]).fit(make_module(fam.pl))

    io = fam.ours.AsyncCheckpointIO(TorchCheckpointIO() if base == "asyncckpt" else None, max_pending=4)
    mc = fam.pl.callbacks.ModelCheckpoint(dirpath=f"s3://{bucket}/run", **config)
    make_trainer(fam, tmp_path, plugins=[io], callbacks=[mc, fam.ours.AsyncCheckpointCallback()]).fit(
        make_module(fam.pl)
    )
    assert io.pending == 0
    synced, ours = _objects(server.endpoint, f"{bucket}/sync"), _objects(server.endpoint, f"{bucket}/run")
    assert ours == synced
    assert ours["last.ckpt"] == 8 and len(ours) == 3
    assert orphans(server.endpoint, bucket) == []

    # Resume from the s3:// checkpoint, through the plugin's load.
    module = make_module(fam.pl)
    io2 = fam.ours.AsyncCheckpointIO(TorchCheckpointIO() if base == "asyncckpt" else None)
    trainer = make_trainer(fam, tmp_path, plugins=[io2], max_steps=10,
                           callbacks=[fam.pl.callbacks.ModelCheckpoint(dirpath=f"s3://{bucket}/run", **config)])
    trainer.fit(module, ckpt_path=f"s3://{bucket}/run/last.ckpt")
    assert module.start_step == 8 and trainer.global_step == 10
    assert _objects(server.endpoint, f"{bucket}/run")["last.ckpt"] == 10


def test_cleanup_aborts_uploads_a_killed_writer_left(server, bucket, capsys):
    """A writer killed mid-upload cannot abort; `asyncckpt cleanup s3://...` does, by age."""
    from asyncckpt.__main__ import main

    fs = admin(server.endpoint)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="run/step=5.ckpt")
    fs.call_s3("upload_part", Bucket=bucket, Key="run/step=5.ckpt", UploadId=upload["UploadId"], PartNumber=1,
               Body=b"x" * 1024)
    # moto reports every upload as initiated in 2010, so "younger than the limit" needs a long limit here.
    assert main(["cleanup", "--older-than-hours", str(200 * 365 * 24), f"s3://{bucket}/run"]) == 0
    assert len(orphans(server.endpoint, bucket)) == 1  # younger than the limit: kept (a writer may be on it)
    assert main(["cleanup", "--older-than-hours", "0", f"s3://{bucket}/other"]) == 0  # another prefix
    assert len(orphans(server.endpoint, bucket)) == 1
    assert main(["cleanup", "--older-than-hours", "0", f"s3://{bucket}/run"]) == 0
    assert orphans(server.endpoint, bucket) == []
    assert f"s3://{bucket}/run/step=5.ckpt" in capsys.readouterr().out


_EXIT_CHILD = """
import sys, torch, asyncckpt
io = asyncckpt.AsyncCheckpointIO(asyncckpt.TorchCheckpointIO())
io.save_checkpoint({"w": torch.ones(4 << 20)}, sys.argv[1])
"""  # and exits at once, the upload still pending


@pytest.mark.slow
def test_pending_upload_is_finished_at_interpreter_exit(server, bucket):
    from _subproc import run_python

    url = f"s3://{bucket}/exit.ckpt"
    out = run_python(_EXIT_CHILD, url, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "pending checkpoint operations finished" in out.stderr
    assert TorchCheckpointIO().load_checkpoint(url)["w"].numel() == 4 << 20
    assert orphans(server.endpoint, bucket) == []


# -- Retry: the one retry loop (no server needed: the failures are real exceptions of fn) -------


def test_retry_retries_a_transient_error_with_backoff_then_raises_a_remote_error(caplog):
    import time

    from asyncckpt import RetryPolicy
    from asyncckpt._storage.retry import Retry
    from asyncckpt.errors import RemoteStorageError

    caplog.set_level(logging.WARNING, logger="asyncckpt")
    tries = []

    def lost_connection():
        tries.append(time.monotonic())
        raise ConnectionResetError("connection reset by peer, key=s3cr3tv4lue")

    retry = Retry(RetryPolicy(attempts=3, backoff=0.05, max_backoff=1.0), "writing checkpoint", "s3://b/k",
                  ["s3cr3tv4lue"])
    with pytest.raises(RemoteStorageError, match="gave up after 3 tries") as info:
        retry.call(lost_connection)
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 0.025 and tries[2] - tries[1] >= 0.05  # backoff doubles, jitter in [0.5, 1]
    assert "s3cr3tv4lue" not in str(info.value) and "s3cr3tv4lue" not in caplog.text
    warnings = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0].startswith("asyncckpt: writing checkpoint s3://b/k failed (try 1 of 3)")


def test_retry_raises_a_passthrough_error_at_once_and_recovers_when_told():
    import asyncio

    from asyncckpt import RetryPolicy
    from asyncckpt._storage.retry import Retry
    from asyncckpt.errors import IntegrityError

    policy = RetryPolicy(attempts=5, backoff=0.0)
    tries = []

    def damaged():
        tries.append(1)
        raise IntegrityError("checkpoint is damaged", "s3://b/k")

    with pytest.raises(IntegrityError, match="damaged"):
        Retry(policy, "verifying checkpoint", "s3://b/k", [], passthrough=(IntegrityError,)).call(damaged)
    assert len(tries) == 1

    def reply_lost():
        tries.append(2)
        raise TimeoutError("reply lost")

    recovered = Retry(policy, "completing", "s3://b/k", [], recover=lambda err, attempt: attempt == 2)
    assert recovered.call(reply_lost) is None and tries.count(2) == 2

    async def flaky(state={"n": 0}):  # noqa: B006 - the call count across tries
        state["n"] += 1
        if state["n"] < 3:
            raise ConnectionError("down")
        return state["n"]

    assert asyncio.run(Retry(policy, "S3 upload_part of", "s3://b/k", []).acall(flaky)) == 3


def test_backend_for_an_s3_url_is_s3files_and_reads_the_object(server, bucket):
    import hashlib

    from asyncckpt._storage.backend import LocalFiles, S3Files, backend_for

    url = f"s3://{bucket}/run/x.ckpt"
    data = os.urandom(300_000)
    admin(server.endpoint).pipe_file(f"{bucket}/run/x.ckpt", data)
    backend = backend_for(url, options(server.endpoint))
    assert isinstance(backend, S3Files) and backend.is_s3 and not backend.is_local and backend.local_path is None
    assert SECRET_KEY in backend.secrets  # what its retries keep out of messages
    assert backend.exists() and not backend.isdir() and backend.size() == len(data)
    assert backend.sha256() == hashlib.sha256(data).hexdigest() and backend.read_record_text() is None
    assert backend.remove() and not backend.exists()
    assert not admin(server.endpoint).exists(f"{bucket}/run/x.ckpt")
    assert isinstance(backend_for(f"file://{bucket}/x.ckpt"), LocalFiles)  # never an object store
