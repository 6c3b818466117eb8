"""Time to page: `python app.py` against a bare Gradio app, measured in one run.

Each trial starts a fresh process and polls http://127.0.0.1:PORT/ until it answers 200; the time is from
the process start to that answer. Three kinds, interleaved so machine load hits them alike:

- bare   an empty `gr.Blocks()` launched (ssr_mode=False) in a fresh interpreter: Gradio's own start
- warm   `python app.py --data-dir D` on a data directory that already exists (the usual start)
- first  `python app.py --data-dir NEW` (creates the store and the Samples session)

Prints the median of each and the ratios app/bare. Run: `.venv/bin/python bench/bench_start.py [--trials 3]`.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BARE = ("import sys\nimport gradio as gr\nwith gr.Blocks() as demo:\n    pass\n"
        "demo.launch(server_port=int(sys.argv[1]), ssr_mode=False)")
"""An empty Blocks (Gradio 6 refuses `gr.Blocks().launch()` outside a `with`: 'Blocks' object has no attribute
'exited')."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(argv: list[str], port: int, limit: float = 300.0) -> float:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited with {proc.returncode} before serving a page")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{argv} served no page in {limit:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"bare": [], "warm": [], "first": []}
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        warm_dir = Path(tmp) / "warm"
        port = free_port()
        time_to_page([sys.executable, "app.py", "--data-dir", str(warm_dir), "--port", str(port)], port)  # creates it
        for trial in range(args.trials):
            port = free_port()
            times["bare"].append(time_to_page([sys.executable, "-c", BARE, str(port)], port))
            port = free_port()
            times["warm"].append(time_to_page([sys.executable, "app.py", "--data-dir", str(warm_dir),
                                               "--port", str(port)], port))
            port = free_port()
            times["first"].append(time_to_page([sys.executable, "app.py", "--data-dir", str(Path(tmp) / f"new{trial}"),
                                                "--port", str(port)], port))
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind, values in times.items():
        print(f"{kind:6s} median {med[kind]:6.2f} s   runs: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"python app.py time-to-page / bare gr.Blocks().launch(): warm {med['warm'] / med['bare']:.2f}x, "
          f"first start {med['first'] / med['bare']:.2f}x (target <= 2.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
