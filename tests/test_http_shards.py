"""Shards over http from real local servers that stall, break mid-stream or die mid-epoch."""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from helpers import make_shard_set

from shards.http_stream import HttpSettings
from shards.loader import create_loader
from srmri.config import ConfigError
from srmri.ports import free_port
from trainer.config import DataConfig

FAST = HttpSettings(connect_timeout=2.0, read_timeout=0.4, retries=2, backoff=0.05)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("set")
    make_shard_set(root, {"train": [7, 2, 12], "val": [5, 2]}, size=16)
    return root


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the set; with ``misbehave`` set, a shard's first GET sends half and then stalls
    (``"stall"``) or breaks the connection (``"break"``); later GETs honour ``Range``."""

    misbehave = ""
    stalled_once: ClassVar[set[str]] = set()
    release = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.name.endswith(".tar") or not self.misbehave:
            return super().do_GET()
        data = path.read_bytes()
        first = path.name not in self.stalled_once
        if first or self.misbehave == "stall-always":
            self.stalled_once.add(path.name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if self.misbehave.startswith("stall"):
                self.release.wait(30)  # holds the connection open, sending nothing
            return  # "break": the handler returns and the server closes the connection
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def serve(shard_root: Path) -> Iterator[Any]:
    servers = []

    def start(misbehave: str) -> str:
        handler = type("H", (Handler,), {"misbehave": misbehave, "stalled_once": set()})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(shard_root))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    Handler.release.set()
    for server in servers:
        server.shutdown()
        server.server_close()
    Handler.release.clear()


def batches(root: str | Path, workers: int = 0) -> list[dict[str, Any]]:
    loader = create_loader(root, "train", 3, mode="eval", num_workers=workers, http=FAST)
    return list(loader)


@pytest.mark.parametrize("misbehave", ["stall", "break"])
def test_a_stall_or_break_is_retried_and_resumes_at_the_byte_reached(
    shard_root: Path, serve: Any, misbehave: str
) -> None:
    want = batches(shard_root)
    got = batches(serve(misbehave))
    assert [b["key"] for b in got] == [b["key"] for b in want]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_server_that_keeps_stalling_fails_within_the_timeouts(serve: Any, workers: int) -> None:
    root = serve("stall-always")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"train-000000.tar: no data within 0.4 s, after 2 ret"):
        batches(root, workers)
    # 3 reads of 0.4 s and 2 back-offs, plus start-up; far from the 30 s the server would hold.
    assert time.monotonic() - start < 15


def test_a_server_killed_mid_epoch_is_an_error_saying_what_to_do(shard_root: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=shard_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        root = f"http://127.0.0.1:{port}/"
        for _ in range(100):  # until it listens
            try:
                loader = create_loader(root, "train", 3, mode="eval", http=FAST)
                break
            except FileNotFoundError:
                time.sleep(0.1)
        it = iter(loader)
        assert len(next(it)["key"]) == 3  # the first shard is read
        server.kill()
        server.wait()
        with pytest.raises(OSError) as exc:
            list(it)
    finally:
        server.kill()
    message = str(exc.value)
    assert re.search(rf"{root}train-00000\d.tar: .*Connection ?Refused", message, re.I)
    assert "stopped answering" in message and "resume the run" in message


def test_http_settings_are_data_config_keys() -> None:
    DataConfig(root="x", http_read_timeout=5, http_retries=0).check()
    for key, value in (
        ("http_read_timeout", 0),
        ("http_connect_timeout", -1),
        ("http_retries", -1),
    ):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            DataConfig(root="x", **{key: value}).check()
