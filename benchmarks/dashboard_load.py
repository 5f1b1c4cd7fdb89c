"""TensorBoard with 10 runs in headless Chromium (issue 43): requests and time until the last chart is drawn.

    python benchmarks/dashboard_load.py runs --out /tmp/dash          # 10 short fits: DoRA, DoRAN, LoRA on two backbones
    python benchmarks/dashboard_load.py measure --logdir /tmp/dash/lightning_logs --out docs/figures

`runs` fits the tiny configs (vit_tiny_digits.yaml: 2 epochs; minilm_text.yaml: 30 steps), one process at a time
with OMP_NUM_THREADS=1, each run named by the TensorBoard logger (``<method>-<backbone>-lr<lr>/version_0``).
`measure` starts TensorBoard and Chromium (``apt-get install chromium``), opens CUSTOM SCALARS, then Scalars (the run
summary's address: losses pinned first) and IMAGES, each until nothing changes for 4 s, talking to Chromium over the
DevTools protocol: requests sent, seconds to the last response, and per custom-scalars chart its "Matches (N)" count
(N > 0: the chart holds its runs' lines). It writes ``dashboard_<tab>.png`` and ``dashboard_load.json`` to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from doran_lightning.summary import TENSORBOARD_URL, scalars_url

TB_PORT, CDP_PORT = 6123, 9333
# (config, backbone label, method, lr): three methods per backbone plus a high and a low lr.
RUNS = [("vit_tiny_digits.yaml", "vit", m, lr) for m, lr in (("dora", "2e-2"), ("doran", "2e-2"), ("lora", "2e-2"),
                                                          ("doran", "3e-1"), ("dora", "5e-3"))] + \
       [("minilm_text.yaml", "minilm", m, lr) for m, lr in (("dora", "2e-3"), ("doran", "2e-3"), ("lora", "2e-3"),
                                                         ("doran", "1e-2"), ("dora", "5e-4"))]
LIMITS = {"vit": ["--trainer.max_epochs=2", "--trainer.log_every_n_steps=2"],
          "minilm": ["--trainer.max_steps=30", "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=2",
                     "--trainer.val_check_interval=15"]}


def make_runs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for config, label, method, lr in RUNS:
        name, started = f"{method}-{label}-lr{lr}", time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "doran_lightning", "fit", "--config", config,
                               f"--model.adapter.method={method}", f"--model.lr={lr}", "--trainer.logger=TensorBoardLogger",
                               "--trainer.logger.save_dir=lightning_logs", f"--trainer.logger.name={name}",
                               "--trainer.enable_progress_bar=false", *LIMITS[label]],
                              cwd=out, env=env, capture_output=True, text=True)
        print(f"{name}: exit {done.returncode}, {time.perf_counter() - started:.0f} s", flush=True)


def address(hash_: str) -> str:
    """The page of a tab; Scalars is the run summary's address (`summary.scalars_url`) on this port."""
    local = f"http://127.0.0.1:{TB_PORT}/"
    return scalars_url("accuracy").replace(TENSORBOARD_URL, local) if hash_ == "timeseries" else f"{local}#{hash_}"


# Every element under `root`, piercing shadow roots (TensorBoard's Polymer cards live in them).
DEEP = """
function deep(root, out) { for (const el of root.querySelectorAll('*')) { out.push(el);
  if (el.shadowRoot) deep(el.shadowRoot, out); } return out; }
"""
CUSTOM_STATE = DEEP + """
(() => { const all = deep(document, []);
  const cards = all.filter(e => e.tagName === 'TF-CUSTOM-SCALAR-MULTI-LINE-CHART-CARD');
  const matches = cards.map(c => { const m = (c.shadowRoot ? c.shadowRoot.textContent : '').match(/Matches \\((\\d+)\\)/);
                                   return m ? +m[1] : -1; });
  const categories = all.filter(e => e.tagName === 'TF-CATEGORY-PANE').length;
  return JSON.stringify({cards: cards.length, filled: matches.filter(n => n > 0).length, matches, categories}); })()
"""


class Page:
    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []

    async def pump(self):
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append((time.perf_counter(), data))

    async def call(self, method, **params):
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return (await asyncio.wait_for(future, 60)).get("result", {})

    async def evaluate(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def screenshot(self, path):
        data = await self.call("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(data["data"]))


async def load(page: Page, hash_: str, settle: float, limit: float) -> dict[str, Any]:
    """Navigate to TensorBoard's `hash_` tab; return (requests, seconds to the last response, states)."""
    page.events.clear()
    start = time.perf_counter()
    await page.call("Page.navigate", url=address(hash_))
    states, last_change, last = [], start, None
    while time.perf_counter() - start < limit:
        await asyncio.sleep(0.25)
        state = await page.evaluate(CUSTOM_STATE) if hash_ == "custom_scalars" else None
        requests = sum(1 for _, e in page.events if e.get("method") == "Network.requestWillBeSent")
        key = (state and json.loads(state)["filled"], requests)
        if key != last:
            last, last_change = key, time.perf_counter()
            states.append((round(last_change - start, 2), requests, state and json.loads(state)["filled"],
                           state and json.loads(state)["cards"]))
        if time.perf_counter() - last_change > settle and requests:
            break
    sent = [t for t, e in page.events if e.get("method") == "Network.requestWillBeSent"]
    done = [t for t, e in page.events if e.get("method") in ("Network.loadingFinished", "Network.loadingFailed")]
    return {"requests": len(sent), "last_response_s": round(max(done) - start, 2) if done else None,
            "states": states, "final": state and json.loads(state)}


async def measure(logdir: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    tensorboard = str(Path(sys.executable).parent / "tensorboard")
    tb = subprocess.Popen([tensorboard, "--logdir", logdir, "--port", str(TB_PORT), "--host", "127.0.0.1",
                           "--reload_interval", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1500",
                               f"--remote-debugging-port={CDP_PORT}", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import aiohttp

    try:
        for _ in range(240):  # TensorBoard reads every event file before it answers
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{TB_PORT}/data/runs", timeout=2)
                urllib.request.urlopen(f"http://127.0.0.1:{CDP_PORT}/json/version", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        runs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{TB_PORT}/data/runs"))
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{CDP_PORT}/json"))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        results: dict[str, Any] = {"runs": runs}
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = Page(ws)
            pump = asyncio.create_task(page.pump())
            for domain in ("Page", "Network", "Runtime"):
                await page.call(f"{domain}.enable")
            await page.call("Network.setCacheDisabled", cacheDisabled=True)
            for name, hash_ in (("custom_scalars", "custom_scalars"), ("scalars", "timeseries"), ("images", "images")):
                results[name] = await load(page, hash_, settle=4.0, limit=90)
                await page.screenshot(out / f"dashboard_{name}.png")
            pump.cancel()
        (out / "dashboard_load.json").write_text(json.dumps(results, indent=1))
        return results
    finally:
        chrome.terminate()
        tb.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("runs").add_argument("--out", type=Path, required=True)
    measuring = sub.add_parser("measure")
    measuring.add_argument("--logdir", required=True)
    measuring.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "runs":
        make_runs(args.out)
        return
    results = asyncio.run(measure(args.logdir, args.out))
    print(json.dumps({tab: {key: value[key] for key in ("requests", "last_response_s", "final")}
                      for tab, value in results.items() if tab != "runs"}, indent=1))


if __name__ == "__main__":
    main()
