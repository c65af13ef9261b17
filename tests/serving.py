"""What the serving tests share: one briefly trained shapes model for every test process
(trained once under a lock in pytest's shared temp dir), a server on a loopback port, and
request helpers."""

from __future__ import annotations

import base64
import contextlib
import glob
import io
import os
import subprocess
import sys
import threading
import time

from filelock import FileLock
from PIL import Image

REPO = __file__.rsplit("/tests/", 1)[0]
KEY = "test-key"
MAX_TOKENS = 24
TRAIN_FLAGS = ["--config.train.steps=30", "--config.train.checkpoint_every=30",
               "--config.data.world_images=120", "--config.data.eval_world_images=16",
               "--config.train.progress=False"]


def shared_workdir(tmp_path_factory) -> str:
    """A shapes model trained for 30 steps, once for all test processes (xdist workers)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own dir below the run's
        root = root.parent
    workdir = str(root / "serve_run")
    with FileLock(str(root / "serve_run.lock")):
        if not os.path.exists(os.path.join(workdir, "trained")):
            proc = subprocess.run(
                [sys.executable, "-m", "jaxground.train", "--config", "configs/shapes.py",
                 "--workdir", workdir, *TRAIN_FLAGS], cwd=REPO, capture_output=True,
                text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            assert proc.returncode == 0, proc.stderr[-4000:]
            open(os.path.join(workdir, "trained"), "w").close()
    return workdir


def images(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "data", "heldout", "images", "*")))


def data_url(path_or_image, fmt: str = "PNG") -> str:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image: str | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": text}]}


class Served:
    """An Engine behind the app, served by uvicorn on a thread (so that tests can look at
    the engine); `url` is http://127.0.0.1:PORT."""

    def __init__(self, engine, loaded, **app_kwargs):
        import uvicorn

        from jaxground.serve import create_app

        self.engine, self.loaded = engine, loaded
        self.app = create_app(engine, loaded.model_name,
                              image_aspect_ratio=loaded.image_aspect_ratio, **app_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()

    def client(self, key: str | None = KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none",
                             max_retries=0, **kwargs)


@contextlib.contextmanager
def served(workdir: str, shapes, warm: dict, **app_kwargs):
    from jaxground.serve import load_engine

    engine, loaded = load_engine(workdir, shapes)
    engine.warm_up(**warm)
    with Served(engine, loaded, **app_kwargs) as s:
        yield s


def http(url: str, method: str, path: str, body: bytes | dict | None = None,
         key: str | None = KEY, timeout: float = 60) -> tuple[int, dict | str]:
    """A raw request with the standard library (bodies no client library would send);
    returns (status, parsed JSON or text)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text
