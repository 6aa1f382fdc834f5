"""Benchmark `vilbert fetch cc` against img2dataset 1.47 on the same loopback server and URL list.

For each latency the script starts `python -m vilbert synth serve` (a fresh server per tool and
latency, so both meet the same planned failures), runs the tool as a subprocess, and measures:
images saved per second of wall time (start-up included), CPU ms per saved image (the whole process
tree: `getrusage(RUSAGE_CHILDREN)` around the run), and peak RSS of the tree (sampled from /proc).

    python benchmarks/fetch.py --install-baseline   # once: img2dataset into benchmarks/.venv-img2dataset
    python benchmarks/fetch.py --quick              # ~1 minute: 800 URLs, 0 and 50 ms
    python benchmarks/fetch.py                      # 20,000 URLs at 0, 50 and 300 ms

Settings: both tools get the same per-request timeout; img2dataset runs with processes_count 2,
thread_count 64, image_size 224, center_crop, JPEG quality 90, a header row added to its copy of the
TSV, other options at their defaults. Ours runs with `--per-host 0`: the one loopback host stands in
for the many hosts of a real list (img2dataset has no per-host limit). The failure mix leaves out
`endless` bodies by default: img2dataset's timeout is per socket read, so a trickling body holds it
until the server shuts down and its figure would measure our cut-off (`--kinds all` includes it).
The last line printed is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE_VENV = HERE / ".venv-img2dataset"
BASELINE_PYTHON = BASELINE_VENV / "bin" / "python"
KINDS_WITHOUT_ENDLESS = ("not-found,server-error-then-ok,rate-limited,unavailable,reset,truncated,html,"
                         "slow-first-byte,stall,redirect,noai")  # fmt: skip

BASELINE_SCRIPT = """
import json, sys
from img2dataset import download
tsv, out, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
download(url_list=tsv, input_format="tsv", url_col="url", caption_col="caption", output_folder=out,
         output_format="parquet", processes_count=2, thread_count=64, image_size=224,
         resize_mode="center_crop", encode_quality=90, timeout=timeout, enable_wandb=False)
"""


def install_baseline() -> bool:
    """Create benchmarks/.venv-img2dataset with img2dataset 1.47.0; True if it imports afterwards."""
    if not BASELINE_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
        (BASELINE_VENV / ".gitignore").write_text("*\n")
    pip = subprocess.run([str(BASELINE_PYTHON), "-m", "pip", "install", "-q", "img2dataset==1.47.0"])
    return pip.returncode == 0 and baseline_available()


def baseline_available() -> bool:
    if not BASELINE_PYTHON.exists():
        return False
    probe = subprocess.run([str(BASELINE_PYTHON), "-c", "import img2dataset"], capture_output=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_corpus(work: Path, n: int, distinct: int) -> Path:
    """A corpus of `n` URLs: `distinct` rendered images (cached), hard-linked as often as needed.

    Rendering is the slow part (minutes per thousand images on 2 busy cores) and repeating files
    changes nothing a downloader can see: every URL path is distinct, so is its planned failure.
    """
    base = work / f"corpus-{distinct}"
    if not (base / "corpus.jsonl").is_file():
        shutil.rmtree(base, ignore_errors=True)
        print(f"generating a {distinct}-image corpus in {base} (once; reused by later runs)", flush=True)
        from vilbert.pipeline.synthetic import generate_corpus

        generate_corpus(base, distinct, seed=0)
    if n <= distinct:
        return base
    corpus = work / f"corpus-{n}-of-{distinct}"
    if not (corpus / "corpus.jsonl").is_file():
        shutil.rmtree(corpus, ignore_errors=True)
        (corpus / "images").mkdir(parents=True)
        records = [json.loads(line) for line in (base / "corpus.jsonl").read_text().splitlines()]
        lines, out_records = [], []
        for i in range(n):
            record = dict(records[i % distinct])
            ext = record["file"].rsplit(".", 1)[1]
            record["name"], record["file"] = f"{i:06d}", f"{i:06d}.{ext}"
            os.link(base / "images" / records[i % distinct]["file"], corpus / "images" / record["file"])
            out_records.append(json.dumps(record))
            lines.append(f"{record['caption']}\thttp://127.0.0.1:8765/images/{record['file']}\n")
            if i % 50 == 49:  # ~2% URLs of images that do not exist, as in the synthetic cc.tsv
                lines.append(f"{record['caption']}\thttp://127.0.0.1:8765/images/missing-{i:06d}.jpg\n")
        (corpus / "cc.tsv").write_text("".join(lines), encoding="utf-8")
        (corpus / "corpus.jsonl").write_text("\n".join(out_records) + "\n")
    return corpus


class Server:
    """`python -m vilbert synth serve` as a subprocess, ready once it prints its `serving` line."""

    def __init__(self, corpus: Path, latency_ms: float, kinds: str, slow_first_byte_s: float) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "vilbert", "synth", "serve", str(corpus), "--port", str(self.port),
                   "--latency-ms", str(latency_ms), "--slow-first-byte-s", str(slow_first_byte_s),
                   "--max-runtime-s", "1800", "--kinds", kinds]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("serving"):
            raise SystemExit(f"the synthetic server did not start: {line}{self.proc.stdout.read()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def run_measured(command: list[str], timeout_s: float) -> dict:
    """Run `command`; wall time, CPU of the whole tree, peak tree RSS, exit code and output tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = [0]
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
        if time.perf_counter() - start > timeout_s:
            proc.kill()
        time.sleep(0.1)
    wall = time.perf_counter() - start
    reader.join(5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak[0] / 2**20, "returncode": proc.returncode,
            "load_avg_1min": os.getloadavg()[0],  # other work on the box: images/s is a share of the cores
            "tail": "".join(output)[-2000:]}  # fmt: skip


def run_ours(corpus: Path, tsv: Path, out: Path, latency_ms: float, args: argparse.Namespace) -> dict:
    server = Server(corpus, latency_ms, args.kinds, args.slow_first_byte_s)
    try:
        local = write_tsv(corpus, server.port, tsv, header=False)
        command = [sys.executable, "-m", "vilbert", "-q", "fetch", "cc", "--tsv", str(local), "--out", str(out),
                   "--allow-private-networks", "--per-host", "0", "--timeout", str(args.timeout)]  # fmt: skip
        result = run_measured(command, args.run_timeout)
    finally:
        server.stop()
    report_path = out / "fetch-report.json"
    result["saved"] = json.loads(report_path.read_text())["run"]["saved"] if report_path.exists() else 0
    return finish(result)


def run_baseline(corpus: Path, tsv: Path, out: Path, latency_ms: float, args: argparse.Namespace) -> dict:
    server = Server(corpus, latency_ms, args.kinds, args.slow_first_byte_s)
    try:
        local = write_tsv(corpus, server.port, tsv, header=True)
        command = [str(BASELINE_PYTHON), "-c", BASELINE_SCRIPT, str(local), str(out), str(int(args.timeout))]
        result = run_measured(command, args.run_timeout)
    finally:
        server.stop()
    result["saved"] = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return finish(result)


def write_tsv(corpus: Path, port: int, path: Path, *, header: bool) -> Path:
    from vilbert.pipeline.synthetic import write_cc_tsv

    write_cc_tsv(corpus, f"http://127.0.0.1:{port}", path)
    if header:
        path.write_text("caption\turl\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def finish(result: dict) -> dict:
    saved = result["saved"]
    result["images_per_s"] = saved / result["wall_s"] if result["wall_s"] > 0 else 0.0
    result["cpu_ms_per_image"] = 1000 * result["cpu_s"] / saved if saved else float("inf")
    if result["returncode"] != 0:
        print(f"  exit code {result['returncode']}; output tail:\n{result['tail']}", flush=True)
    result.pop("tail")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="800 URLs at 0 and 50 ms (about a minute).")
    parser.add_argument("--n", type=int, default=None, help="Corpus size (default 20000, quick 800).")
    parser.add_argument("--distinct", type=int, default=800, help="Distinct rendered images behind the URLs.")
    parser.add_argument("--latencies", default=None, help="Comma-separated server latencies in ms.")
    parser.add_argument("--baseline-latencies", default="50", help="Latencies at which img2dataset also runs.")
    parser.add_argument("--install-baseline", action="store_true", help="pip install img2dataset==1.47.0 first.")
    parser.add_argument("--no-baseline", action="store_true", help="Run ours only.")
    parser.add_argument("--kinds", default=KINDS_WITHOUT_ENDLESS, help="Failure kinds served ('all': every kind).")
    parser.add_argument("--timeout", type=float, default=None, help="Per-request timeout of both tools, s.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vilbert-bench-fetch"), help="Scratch directory.")
    args = parser.parse_args()
    args.n = args.n or (800 if args.quick else 20_000)
    args.latencies = [float(x) for x in (args.latencies or ("0,50" if args.quick else "0,50,300")).split(",")]
    args.baseline_latencies = [float(x) for x in args.baseline_latencies.split(",") if x]
    args.timeout = args.timeout or (3.0 if args.quick else 10.0)
    args.slow_first_byte_s = min(2.0, args.timeout / 2)
    args.run_timeout = 600.0
    if args.kinds == "all":
        from vilbert.pipeline.synthetic import FAILURE_KINDS

        args.kinds = ",".join(FAILURE_KINDS)
    return args


def main() -> None:
    args = parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    baseline = not args.no_baseline
    if baseline and args.install_baseline and not install_baseline():
        print("img2dataset 1.47.0 could not be installed into benchmarks/.venv-img2dataset", flush=True)
    if baseline and not baseline_available():
        print("img2dataset is not installed (run with --install-baseline); reporting ours only", flush=True)
        baseline = False
    corpus = ensure_corpus(work, args.n, min(args.n, args.distinct))
    print(f"fetch benchmark: {args.n} URLs (+~2% missing) over {min(args.n, args.distinct)} distinct images, "
          f"failure kinds {args.kinds}, timeout {args.timeout:g} s, {os.cpu_count()} cores", flush=True)  # fmt: skip
    results: dict[str, dict[str, dict]] = {"ours": {}, "img2dataset": {}}
    for latency in args.latencies:
        runs = [("ours", run_ours)] + (
            [("img2dataset", run_baseline)] if baseline and latency in args.baseline_latencies else []
        )
        for name, run in runs:
            out = work / f"out-{name}-{latency:g}"
            shutil.rmtree(out, ignore_errors=True)
            result = run(corpus, work / f"{name}.tsv", out, latency, args)
            results[name][f"{latency:g}"] = result
            print(f"{name:12s} latency {latency:5g} ms: {result['saved']:6d} saved, "
                  f"{result['images_per_s']:7.1f} img/s, {result['cpu_ms_per_image']:6.2f} ms CPU/img, "
                  f"peak RSS {result['peak_rss_mb']:7.1f} MB, wall {result['wall_s']:6.1f} s, "
                  f"load {result['load_avg_1min']:.1f}", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
    summary = summarize(results, args)
    for key, value in summary["ratios"].items():
        print(f"{key}: {value}")
    print(json.dumps(summary))


def summarize(results: dict, args: argparse.Namespace) -> dict:
    ours, theirs = results["ours"], results["img2dataset"]
    ratios = {}
    for latency, figures in theirs.items():
        if figures["images_per_s"] > 0 and latency in ours:
            ratios[f"speedup_vs_img2dataset_{latency}ms"] = round(
                ours[latency]["images_per_s"] / figures["images_per_s"], 2
            )
            ratios[f"cpu_ratio_img2dataset_over_ours_{latency}ms"] = round(
                figures["cpu_ms_per_image"] / ours[latency]["cpu_ms_per_image"], 2
            )
    if "0" in ours and ours["0"]["images_per_s"] > 0:
        for latency in ours:
            if latency != "0":
                ratios[f"ours_{latency}ms_over_0ms"] = round(
                    ours[latency]["images_per_s"] / ours["0"]["images_per_s"], 2
                )
    return {"benchmark": "fetch", "n": args.n, "quick": args.quick, "kinds": args.kinds, "timeout_s": args.timeout,
            "ours": ours, "img2dataset": theirs or None, "ratios": ratios}  # fmt: skip


if __name__ == "__main__":
    main()
