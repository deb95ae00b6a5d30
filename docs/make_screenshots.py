"""Take the web chat's screenshots shown in docs/serve.md (docs/img/chat-*.png, 1000x700) in headless Chromium.

The server runs with a scripted stand-in engine (`flywheel.serve.scripted.ScriptedEngine`) so that the answers are
readable and the same every time; everything else (the pages, the API, the database) is the real `flywheel serve`.
Needs the serve extra, the `playwright` package and a Chromium binary (Debian's `chromium` works; no browser
download is needed):

    python docs/make_screenshots.py                                   # writes docs/img/chat-*.png
    python docs/make_screenshots.py --out /tmp/shots --chromium /usr/bin/chromium
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

VIEWPORT = {"width": 1000, "height": 700}
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
SYSTEM = "You are a concise assistant. Answer in Markdown."

REVERSE = """There are two common ways:

1. **Slicing** makes a reversed *copy*: `items[::-1]`
2. **`list.reverse()`** reverses the list *in place* and returns `None`

```python
items = [1, 2, 3]
backwards = items[::-1]   # [3, 2, 1]; items is unchanged
items.reverse()           # items is now [3, 2, 1]
```

Use `reversed(items)` when you only need to iterate backwards: it makes no copy. See the \
[Python tutorial](https://docs.python.org/3/tutorial/datastructures.html) for more."""
CAT_NAMES = [
    "How about **Miso**? It is short, warm and easy to call across a room.",
    "**Pixel**: small, quick and a little bit mischievous.",
    "Maybe *Captain Whiskers*, if your cat has a sense of occasion.",
]


def script() -> Callable[[str], str]:
    """The answer to each question of the screenshots; the cat-name answers in turn (one per regeneration)."""
    turns = {"cat": 0}

    def answer(prompt: str) -> str:
        question = prompt.rsplit("<|im_start|>user\n", 1)[-1]
        if "reverse" in question:
            return REVERSE
        if "Why" in question:
            return "Because it is quick to say and fits a playful cat."
        if "shorter" in question:
            return "**Bo**, **Pip** or **Kit**: one syllable each."
        if "cat" in question:
            turns["cat"] += 1
            return CAT_NAMES[(turns["cat"] - 1) % len(CAT_NAMES)]
        return "Happy to help. What would you like to know?"

    return answer


def ask(page: Any, text: str) -> None:
    count = page.locator(".msg.assistant[data-id] .vote-up").count()
    page.fill("#input", text)
    page.click("#send")
    page.locator(".msg.assistant[data-id] .vote-up").nth(count).wait_for(timeout=30_000)


def regenerate(page: Any) -> None:
    old = page.get_attribute(".msg.assistant[data-id]", "data-id")
    page.click(".regenerate")
    page.wait_for_function(
        "old => { const m = document.querySelector('.msg.assistant[data-id]');"
        " return m && m.dataset.id !== old && m.querySelector('.vote-up'); }",
        arg=old,
        timeout=30_000,
    )


def take_screenshots(out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    from flywheel.serve.app import ServeSettings, create_app
    from flywheel.serve.live import LiveServer
    from flywheel.serve.scripted import ScriptedEngine
    from flywheel.serve.worker import ServedModel
    from flywheel.tokenization import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([REVERSE, *CAT_NAMES, SYSTEM] * 10, vocab_size=600)
    engine = ScriptedEngine(tokenizer, script(), delay=0.002)
    shots = [out / "chat-markdown.png", out / "chat-branches.png", out / "chat-settings.png"]
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServeSettings(model="scripted", db=str(Path(tmp) / "feedback.db"), default_max_tokens=400)
        app = create_app(settings, model=ServedModel(engine, tokenizer, "scripted-demo", tmp))
        with LiveServer(app) as server, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.goto(server.url + "/")
            ask(page, "Suggest a name for a cat.")
            regenerate(page)
            regenerate(page)
            page.click(".msg.assistant .nav-prev")  # the second of the three answers
            ask(page, "Why that one?")
            page.locator(".msg.user").nth(1).locator("button.edit").click()
            page.fill(".edit-box", "Any shorter ones?")
            page.click(".edit-send")
            page.locator(".msg.assistant[data-id] .vote-up").nth(1).wait_for(timeout=30_000)
            page.click("#new-chat")
            ask(page, "How do I reverse a list in Python?")
            page.screenshot(path=str(shots[0]))
            page.click("#conversations li:has-text('cat') .title")
            page.wait_for_selector(".msg.user .nav-count")
            page.screenshot(path=str(shots[1]))
            page.click("#open-settings")
            page.fill("#set-system", SYSTEM)
            page.fill("#set-temperature", "0.7")
            page.fill("#set-max-tokens", "256")
            page.screenshot(path=str(shots[2]))
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "img"), help="directory for the PNG files")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "", help="path of the Chromium binary")
    args = parser.parse_args(argv)
    if not args.chromium:
        print("no Chromium found: pass --chromium PATH", file=sys.stderr)
        return 2
    for path in take_screenshots(Path(args.out), args.chromium):
        print(f"{path}  {path.stat().st_size / 1024:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
