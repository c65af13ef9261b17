"""The viewer page in a real headless browser (Debian's Chromium, driven by Playwright), and
the terminal chat through a pseudo-terminal, both on the shared briefly trained model."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from serving import MAX_TOKENS, REPO, images, served, shared_workdir

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_workdir(tmp_path_factory)


def test_the_page_streams_a_coloured_answer_and_shows_heatmaps(workdir, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: `apt-get install chromium` (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    from jaxground.serve import ServeShapes

    shapes = ServeShapes(batch_sizes=(1,), max_tokens=MAX_TOKENS)
    with served(workdir, shapes, dict(text_only=False, guided=False),
                api_key="page-key") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_selector("#key-row:not([hidden])")  # the server wants a key
            page.fill("#key", "page-key")
            page.set_input_files("#file", images(workdir)[0])
            page.wait_for_function("document.getElementById('hint').hidden")
            page.fill("#question", "Describe the image.")
            page.click("#ask")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('done')",
                timeout=60_000)
            assert not errors and not page.inner_text("#error")
            words = page.query_selector_all(".turn .tok")
            assert len(words) > 1
            answer = "".join(w.inner_text() for w in words)
            # Object words are coloured (the words the grounding loss trains), the rest not
            # until "colour every word" is ticked.
            scored = page.query_selector_all(".tok.scored")
            assert scored and all(w.inner_text().strip() in shape_words() for w in scored)
            colours = {w.evaluate("e => getComputedStyle(e).backgroundColor") for w in scored}
            assert all(c.startswith("rgb(") for c in colours)
            page.check("#every")
            assert len(page.query_selector_all(".tok.scored")) > len(scored)
            page.uncheck("#every")
            # the text is the API's answer to the same request
            reply = server.client("page-key").chat.completions.create(
                model=server.loaded.model_name, temperature=0, max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": page.evaluate("imageURL")}},
                    {"type": "text", "text": "Describe the image."}]}])
            assert answer == reply.choices[0].message.content
            blank = page.evaluate(_HEAT_PIXELS)
            word = page.query_selector(".tok.has-map")
            word.click()
            assert page.evaluate(_HEAT_PIXELS) > blank == 0  # the heatmap was drawn
            assert "grounding logit" in page.inner_text("#view-label")
            assert "selected" in word.get_attribute("class")
            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("JAXGROUND_SCREENSHOT"):  # the README's picture
                shutil.copy(shot, os.environ["JAXGROUND_SCREENSHOT"])
        finally:
            browser.close()


# Opaque pixels on the heatmap canvas.
_HEAT_PIXELS = """() => {
  const c = document.getElementById('heat'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


def shape_words() -> set[str]:
    import inflect

    from jaxground.data.shapes import SHAPES

    return set(SHAPES) | {inflect.engine().plural_noun(s) for s in SHAPES}


def _read_until(fd, pattern: str, timeout: float) -> str:
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if re.search(pattern, out.decode(errors="replace")):
                return out.decode(errors="replace")
    raise AssertionError(f"no {pattern!r} in {out.decode(errors='replace')[-2000:]!r}")


def least_grounded_object_word(workdir) -> tuple[str, str, float]:
    """(image, word, threshold): over the held-out images' greedy answers, the object word
    with the lowest grounding logit, and a threshold that flags it and no other object
    word of its answer."""
    import numpy as np

    import jaxground
    from jaxground.inference.batching import left_pad
    from jaxground.serve import ServeShapes, load_engine

    engine, _ = load_engine(workdir, ServeShapes(batch_sizes=(1,), max_tokens=MAX_TOKENS))
    proc, paths = engine.processor, images(workdir)
    ids, mask = left_pad([proc.encode_chat([("Describe the image.", "")])] * len(paths),
                         engine.pad_id)
    gen = jaxground.generate(engine.model, ids, proc.pixel_values(paths), attention_mask=mask,
                             max_new_tokens=MAX_TOKENS, eos_token_id=engine.eos_ids.pop())
    tokens, g = np.asarray(gen.tokens), np.asarray(gen.grounding)
    objects = engine.flag_mask[tokens] & np.asarray(gen.valid)
    row, col = np.unravel_index(np.argmin(np.where(objects, g, np.inf)), g.shape)
    others = np.sort(g[row][objects[row]])
    threshold = (others[0] + others[1]) / 2 if len(others) > 1 else others[0] + 0.5
    return paths[row], proc.tokenizer.decode([int(tokens[row, col])]).strip(), float(threshold)


def test_the_terminal_chat_highlights_a_poorly_grounded_word(workdir):
    """The least grounded object word of the held-out answers, with a threshold just above
    its score, comes out in bold red underline and nothing else does; a second turn works."""
    image, word, threshold = least_grounded_object_word(workdir)
    fd, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxground.chat", "--workdir", workdir, "--image", image,
         "--temperature", "0", "--max_tokens", str(MAX_TOKENS),
         "--flag_threshold", str(threshold)], cwd=REPO, stdin=terminal, stdout=terminal,
        stderr=terminal, start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    os.close(terminal)
    try:
        _read_until(fd, r"USER: $", 300)
        os.write(fd, b"Describe the image.\r")
        out = _read_until(fd, r"USER: $", 300)
        answer = out.split("ASSISTANT:", 1)[1].split("\n")[0]
        highlighted = re.findall(r"\x1b\[1;4;31m(.*?)\x1b\[0m", answer)
        assert set(highlighted) == {word}, (answer, word, threshold)
        assert "the image does not support" in out
        os.write(fd, b"What else?\r")
        assert "ASSISTANT:" in _read_until(fd, r"USER: $", 300)
        os.write(fd, b"exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(fd)
