"""Benchmark `vilbert fetch cc` against img2dataset 1.47 on a photo-like corpus, over HTTP and HTTPS.

The corpus (made once, cached under --work) is like Conceptual Captions: about 96% RGB JPEG
(baseline, a fifth progressive) of 200-1,000 px with camera-like content (smooth gradients, edges,
texture, sensor noise; no flat colours), and a few percent PNG, greyscale, CMYK and EXIF-rotated
JPEG. URLs repeat the distinct images under distinct paths (`/copy/<k>/...`, each with its own
planned failure), spread round-robin over `--hosts` hosts (default 32): the loopback addresses
127.0.0.1, 127.0.0.2, ..., all served by one server on one port. Host *names* are not used: making
names resolve to loopback needs the machine's resolver configuration (/etc/hosts), which a benchmark
must not touch, so each host is an IP literal (distinct hosts for connection pools and per-host
limits, no DNS lookups). Real CC spreads its URLs over tens of thousands of hosts; with few hosts,
ours meets its per-host connection cap (`--per-host`, 32) before its in-flight limit, and the 300 ms
run measures that cap rather than latency hiding (benchmarks/RESULTS.md, fetch, has the runs).

HTTPS: a test CA and a server certificate for those addresses are made on the fly with the openssl
CLI; the server serves TLS and both tools trust the CA through `SSL_CERT_FILE` (nothing else).

For each run the script starts a fresh server (both tools meet the same planned failures) and runs
the tool as a subprocess: images saved per second of wall time (start-up included), CPU ms per saved
image (the whole process tree: `getrusage(RUSAGE_CHILDREN)`), peak RSS of the tree (from /proc),
and the machine's steal and idle shares of the run (`machine_share.py`). The server's own CPU is
not counted, but it shares the machine's cores with the tool: the idle share says whether the tool
was short of CPU.

    python benchmarks/fetch.py --install-baseline   # once: img2dataset into benchmarks/.venv-img2dataset
    python benchmarks/fetch.py --size small         # a few minutes: 2,000 URLs, timeout 3 s
    python benchmarks/fetch.py                      # full size: 20,000 URLs

Runs, in three interleaved rounds: ours over HTTP at 0, 50 and 300 ms latency; at 50 ms img2dataset
over HTTP, then ours and img2dataset over HTTPS. Each (tool, protocol, latency)'s median run is
reported (its images/s, and the median CPU per image of the tries), and the ratios are of these:
on a shared machine one run's images/s and CPU per image move by more than latency does
(benchmarks/RESULTS.md, fetch). Settings: the same
per-request timeout; img2dataset with processes_count = cores, thread_count 64, shards of n / (8 x
cores) rows (every process busy to the end), image_size 224, center_crop, JPEG quality 90, a header
row added to its copy of the list, other options at their defaults; ours with its defaults
(`--allow-private-networks`: the hosts are loopback). The failure mix leaves out `endless` bodies by
default: img2dataset's timeout is per socket read, so a trickling body holds it until the server
shuts down (`--kinds all` includes it).
The last line printed is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from machine_share import cpu_times, shares

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE_VENV = HERE / ".venv-img2dataset"
BASELINE_PYTHON = BASELINE_VENV / "bin" / "python"
KINDS_WITHOUT_ENDLESS = ("not-found,server-error-then-ok,rate-limited,unavailable,reset,truncated,html,"
                         "slow-first-byte,stall,redirect,noai")  # fmt: skip
DEFAULT_HOSTS = 32


def loopback_hosts(n: int) -> tuple[str, ...]:
    """127.0.0.1, 127.0.0.2, ...: `n` distinct hosts (all of 127/8 is loopback on Linux)."""
    return tuple(f"127.0.{i // 250}.{i % 250 + 1}" for i in range(n))


SIZES = {"small": (2_000, 500), "full": (20_000, 3_000)}  # URLs, distinct images
MISSING_EVERY = 50  # ~2% URLs of images that never existed, as in the synthetic cc.tsv

BASELINE_SCRIPT = """
import json, sys
from img2dataset import download
tsv, out, timeout, processes, per_shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
download(url_list=tsv, input_format="tsv", url_col="url", caption_col="caption", output_folder=out,
         output_format="parquet", processes_count=processes, thread_count=64, number_sample_per_shard=per_shard,
         image_size=224, resize_mode="center_crop", encode_quality=90, timeout=timeout, enable_wandb=False)
"""

SERVER_SCRIPT = """
import json, ssl, sys
from vilbert.pipeline.synthetic import ServerOptions, serve_in_background
cfg = json.loads(sys.argv[1])
context = None
if cfg["cert"]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg["cert"], cfg["key"])
options = ServerOptions(latency_ms=cfg["latency_ms"], slow_first_byte_s=cfg["slow_first_byte_s"],
                        max_runtime_s=1800, kinds=tuple(cfg["kinds"].split(",")), copies=cfg["copies"])
with serve_in_background(cfg["corpus"], options, hosts=tuple(cfg["hosts"]), ssl_context=context) as server:
    print("serving", server.port, flush=True)
    server.wait()
"""

# Every block of 100 consecutive images holds this mix (shuffled per block): ~96% RGB JPEG as on the web.
PHOTO_MIX = (("jpeg-baseline", 76), ("jpeg-progressive", 20), ("png-rgb", 1), ("jpeg-grey", 1),
             ("jpeg-cmyk", 1), ("jpeg-exif", 1))  # fmt: skip
PHOTO_BLOCK = [name for name, count in PHOTO_MIX for _ in range(count)]
WORDS = ("a dog", "a woman", "a man", "the city", "a beach", "mountains", "a kitchen", "a car", "flowers",
         "a street", "the sea", "a child", "a bridge", "a forest", "a cake", "a horse", "a room")  # fmt: skip


# ------------------------------------------------------------------------------------- baseline


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
    probe = subprocess.run([str(BASELINE_PYTHON), "-c", "import img2dataset"], capture_output=True, env=quiet_env())
    return probe.returncode == 0


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment of the tools: no update checks over the network (albumentations does one)."""
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", **extra)


# ------------------------------------------------------------------------------------- corpus


def photo_pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Camera-like uint8 RGB [h, w, 3]: a smooth colour field with a light gradient, a few soft-edged
    shapes, mid-frequency texture and per-pixel sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    grid = rng.normal(120, 55, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).clip(0, 255).astype(np.uint8)
    base = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2 + 21)), y0 + int(rng.integers(20, height // 2 + 21))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    base = base.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.5))))
    pixels = np.asarray(base, dtype=np.float32)
    pixels += np.linspace(-25, 25, height, dtype=np.float32)[:, None, None] * float(rng.uniform(-1, 1))
    step = int(rng.integers(3, 9))
    texture = rng.normal(128, float(rng.uniform(8, 28)), (height // step + 1, width // step + 1)).clip(0, 255)
    texture = Image.fromarray(texture.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    pixels += np.asarray(texture, dtype=np.float32)[:, :, None] - 128
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * float(rng.uniform(2, 7))
    return pixels.clip(0, 255).astype(np.uint8)


def encode_photo(rng: np.random.Generator, pixels: np.ndarray, variant: str) -> tuple[bytes, str]:
    from PIL import Image

    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if variant == "png-rgb":
        image.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), "png"
    params = {"quality": int(rng.integers(70, 96)), "subsampling": 2 if rng.random() < 0.8 else 0,
              "optimize": bool(rng.random() < 0.5), "progressive": variant == "jpeg-progressive"}  # fmt: skip
    if variant == "jpeg-grey":
        image = image.convert("L")
    elif variant == "jpeg-cmyk":
        image = image.convert("CMYK")
    elif variant == "jpeg-exif":
        exif = Image.Exif()
        exif[0x0112] = int(rng.choice([3, 6, 8]))
        params["exif"] = exif.tobytes()
    image.save(buf, format="JPEG", **params)
    return buf.getvalue(), "jpg"


def make_photo(job: tuple[int, str, str]) -> dict:
    index, variant, images_dir = job
    rng = np.random.default_rng([7, index])
    long = int(300 + 700 * rng.random() ** 1.3)
    short = max(200, round(long / float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))))
    width, height = (long, short) if rng.random() < 0.7 else (short, long)
    data, ext = encode_photo(rng, photo_pixels(rng, width, height), variant)
    file = f"{index:06d}.{ext}"
    Path(images_dir, file).write_bytes(data)
    caption = f"{WORDS[int(rng.integers(len(WORDS)))]} near {WORDS[int(rng.integers(len(WORDS)))]}"
    return {"name": f"{index:06d}", "file": file, "caption": caption, "variant": variant, "bytes": len(data),
            "width": width, "height": height}  # fmt: skip


def ensure_photo_corpus(work: Path, distinct: int) -> Path:
    """`distinct` photo-like images with corpus.jsonl and cc.tsv (cached: made once per size)."""
    corpus = work / f"photo-{distinct}"
    if (corpus / "corpus.jsonl").is_file():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    (corpus / "images").mkdir(parents=True)
    print(f"generating a {distinct}-image photo-like corpus in {corpus} (once)", flush=True)
    order = np.random.default_rng(11)
    variants = [v for _ in range(math.ceil(distinct / len(PHOTO_BLOCK))) for v in order.permutation(PHOTO_BLOCK)]
    jobs = [(i, str(variants[i]), str(corpus / "images")) for i in range(distinct)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        records = list(pool.map(make_photo, jobs, chunksize=32))
    lines = []
    for i, record in enumerate(records):
        lines.append(f"{record['caption']}\thttp://127.0.0.1/images/{record['file']}\n")
        if i % MISSING_EVERY == MISSING_EVERY - 1:
            lines.append(f"{record['caption']}\thttp://127.0.0.1/images/missing-{i:06d}.jpg\n")
    (corpus / "cc.tsv").write_text("".join(lines), encoding="utf-8")
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return corpus


def corpus_summary(corpus: Path) -> dict:
    records = [json.loads(line) for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    counts: dict[str, int] = {}
    for record in records:
        counts[record["variant"]] = counts.get(record["variant"], 0) + 1
    return {"distinct_images": len(records), "mean_kb": round(sum(r["bytes"] for r in records) / len(records) / 1e3, 1),
            "mean_megapixels": round(sum(r["width"] * r["height"] for r in records) / len(records) / 1e6, 3),
            "variants": counts}  # fmt: skip


def write_url_list(
    corpus: Path, n: int, scheme: str, port: int, path: Path, *, header: bool, hosts: tuple[str, ...]
) -> Path:
    """`n` URLs (plus ~2% missing ones) over the corpus's copies, round-robin over the hosts."""
    pairs = [line.split("\t") for line in (corpus / "cc.tsv").read_text(encoding="utf-8").splitlines()]
    lines = ["caption\turl\n"] if header else []
    for i in range(n + n // MISSING_EVERY):
        copy, (caption, url) = divmod(i, len(pairs))[0], pairs[i % len(pairs)]
        prefix = f"/copy/{copy}" if copy else ""
        lines.append(f"{caption}\t{scheme}://{hosts[i % len(hosts)]}:{port}{prefix}/{url.split('/', 3)[3]}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- TLS


def make_test_ca(directory: Path, hosts: tuple[str, ...]) -> dict[str, str]:
    """A CA and a server certificate for every host address, by the openssl CLI (a throwaway CA).

    ECDSA P-256 keys, as most large image hosts and CDNs serve: the server's handshakes cost a tenth
    of RSA-2048's, and the server shares this machine's cores with the tool being measured."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (str(directory / n) for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                               "server.pem"))  # fmt: skip
    ext = directory / "server.ext"
    names = ",".join(f"IP:{h}" for h in hosts)
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage=serverAuth\nsubjectAltName={names}\n")  # fmt: skip
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj",
         "/CN=vilbert benchmark test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", str(ext)],
    ]  # fmt: skip
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)
    return {"ca": ca, "cert": cert, "key": key}


# ------------------------------------------------------------------------------------- running


class Server:
    """The synthetic server (vilbert.pipeline.synthetic) on every host address, HTTP or HTTPS."""

    def __init__(self, corpus: Path, latency_ms: float, args: argparse.Namespace, tls: dict | None) -> None:
        config = {"corpus": str(corpus), "latency_ms": latency_ms, "slow_first_byte_s": args.slow_first_byte_s,
                  "kinds": args.kinds, "copies": args.copies, "hosts": list(args.hosts),
                  "cert": tls["cert"] if tls else None, "key": tls["key"] if tls else None}  # fmt: skip
        command = [sys.executable, "-c", SERVER_SCRIPT, json.dumps(config)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("serving"):
            raise SystemExit(f"the synthetic server did not start: {line}{self.proc.stdout.read()}")
        self.port = int(line.split()[1])

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


def run_measured(command: list[str], timeout_s: float, env: dict[str, str]) -> dict:
    """Run `command`; wall time, CPU of the whole tree, peak tree RSS, exit code and output tail."""
    before, machine_before = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_times()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
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
    machine = shares(machine_before, cpu_times())
    reader.join(5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak[0] / 2**20, "returncode": proc.returncode,
            "load_avg_1min": os.getloadavg()[0],  # other work on the box: images/s is a share of the cores
            **machine, "tail": "".join(output)[-2000:]}  # fmt: skip


def run_ours(corpus: Path, work: Path, out: Path, latency_ms: float, args, tls: dict | None) -> dict:
    server = Server(corpus, latency_ms, args, tls)
    try:
        scheme = "https" if tls else "http"
        urls = write_url_list(corpus, args.n, scheme, server.port, work / "ours.tsv", header=False, hosts=args.hosts)
        command = [sys.executable, "-m", "vilbert", "-q", "fetch", "cc", "--tsv", str(urls), "--out", str(out),
                   "--allow-private-networks", "--timeout", str(args.timeout)] + args.ours_args  # fmt: skip
        env = quiet_env(SSL_CERT_FILE=tls["ca"]) if tls else quiet_env()
        result = run_measured(command, args.run_timeout, env)
    finally:
        server.stop()
    report_path = out / "fetch-report.json"
    result["saved"] = json.loads(report_path.read_text())["run"]["saved"] if report_path.exists() else 0
    return finish(result)


def run_baseline(corpus: Path, work: Path, out: Path, latency_ms: float, args, tls: dict | None) -> dict:
    server = Server(corpus, latency_ms, args, tls)
    try:
        scheme = "https" if tls else "http"
        path = work / "img2dataset.tsv"
        urls = write_url_list(corpus, args.n, scheme, server.port, path, header=True, hosts=args.hosts)
        processes = os.cpu_count() or 1
        per_shard = max(100, args.n // (8 * processes))
        command = [str(BASELINE_PYTHON), "-c", BASELINE_SCRIPT, str(urls), str(out), str(int(args.timeout)),
                   str(processes), str(per_shard)]  # fmt: skip
        env = quiet_env(SSL_CERT_FILE=tls["ca"]) if tls else quiet_env()
        result = run_measured(command, args.run_timeout, env)
    finally:
        server.stop()
    result["saved"] = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return finish(result)


def finish(result: dict) -> dict:
    saved = result["saved"]
    result["images_per_s"] = saved / result["wall_s"] if result["wall_s"] > 0 else 0.0
    result["cpu_ms_per_image"] = 1000 * result["cpu_s"] / saved if saved else float("inf")
    result["cores_used"] = result["cpu_s"] / result["wall_s"] if result["wall_s"] > 0 else 0.0
    if result["returncode"] != 0:
        print(f"  exit code {result['returncode']}; output tail:\n{result['tail']}", flush=True)
    result.pop("tail")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="small: 2,000 URLs; full: 20,000.")
    parser.add_argument("--quick", action="store_true", help="Same as --size small.")
    parser.add_argument("--n", type=int, default=None, help="URLs (default by --size).")
    parser.add_argument("--distinct", type=int, default=None, help="Distinct images behind the URLs.")
    parser.add_argument("--latencies", default="0,50,300", help="Comma-separated latencies of ours over HTTP, ms.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Rounds of every run, interleaved; each run's median is reported (default 3: on a shared machine "
        "one run's images/s moves more than latency does).",
    )
    parser.add_argument("--compare-at", type=float, default=50.0, help="Latency of the head-to-head runs, ms.")
    parser.add_argument("--protocols", default="http,https", help="Protocols of the head-to-head runs.")
    parser.add_argument("--install-baseline", action="store_true", help="pip install img2dataset==1.47.0 first.")
    parser.add_argument("--no-baseline", action="store_true", help="Run ours only.")
    parser.add_argument("--kinds", default=KINDS_WITHOUT_ENDLESS, help="Failure kinds served ('all': every kind).")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="Per-request timeout of both tools, s "
        "(default 10; small 3: the last stalled requests end every run, and end a small one sooner)",
    )
    parser.add_argument(
        "--hosts",
        type=int,
        default=DEFAULT_HOSTS,
        help=f"Loopback hosts the URLs are spread over, round-robin (default {DEFAULT_HOSTS}).",
    )
    parser.add_argument("--ours-args", default="", help="Extra options of `vilbert fetch cc` (quoted).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vilbert-bench-fetch"), help="Scratch directory.")
    args = parser.parse_args()
    size = "small" if args.quick else args.size
    args.size = size
    args.n = args.n or SIZES[size][0]
    args.timeout = args.timeout or (3.0 if size == "small" else 10.0)
    args.distinct = min(args.n, args.distinct or SIZES[size][1])
    args.copies = math.ceil((args.n + args.n // MISSING_EVERY) / (args.distinct + args.distinct // MISSING_EVERY))
    args.latencies = [float(x) for x in args.latencies.split(",") if x]
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    args.protocols = [x for x in args.protocols.split(",") if x]
    args.ours_args = args.ours_args.split()
    args.hosts = loopback_hosts(args.hosts)
    args.slow_first_byte_s = min(2.0, args.timeout / 2)
    args.run_timeout = 900.0
    if args.kinds == "all":
        from vilbert.pipeline.synthetic import FAILURE_KINDS

        args.kinds = ",".join(FAILURE_KINDS)
    return args


def plan_runs(args: argparse.Namespace, baseline: bool) -> list[tuple[str, str, float]]:
    """(tool, protocol, latency) in order: `--repeats` rounds, each of ours over HTTP at every latency,
    then head to head at `--compare-at` per protocol (ours' HTTP run there is the latency run's)."""
    one_round = [("ours", "http", latency) for latency in args.latencies]
    for protocol in args.protocols:
        if ("ours", protocol, args.compare_at) not in one_round:
            one_round.append(("ours", protocol, args.compare_at))
        if baseline:
            one_round.append(("img2dataset", protocol, args.compare_at))
    return one_round * args.repeats


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
    corpus = ensure_photo_corpus(work, args.distinct)
    summary = corpus_summary(corpus)
    if "https" in args.protocols and shutil.which("openssl") is None:
        print("the openssl CLI is not installed: no test CA, so no HTTPS runs", flush=True)
        args.protocols = [p for p in args.protocols if p != "https"]
    tls = make_test_ca(work / "tls", args.hosts) if "https" in args.protocols else None
    print(f"fetch benchmark: {args.n} URLs (+~2% missing) over {args.distinct} distinct photo-like images "
          f"({summary['mean_kb']} KB, {summary['mean_megapixels']} MP on average), {len(args.hosts)} loopback hosts, "
          f"failure kinds {args.kinds}, timeout {args.timeout:g} s, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    runs: dict[str, dict[str, list[dict]]] = {"ours": {}, "img2dataset": {}}
    for name, protocol, latency in plan_runs(args, baseline):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        run = run_ours if name == "ours" else run_baseline
        result = run(corpus, work, out, latency, args, tls if protocol == "https" else None)
        runs[name].setdefault(f"{protocol}_{latency:g}", []).append(result)
        print(f"{name:12s} {protocol:5s} {latency:5g} ms: {result['saved']:6d} saved, "
              f"{result['images_per_s']:7.1f} img/s, {result['cpu_ms_per_image']:6.2f} ms CPU/img, "
              f"{result['cores_used']:.2f} cores, peak RSS {result['peak_rss_mb']:7.1f} MB, "
              f"wall {result['wall_s']:6.1f} s, load {result['load_avg_1min']:.1f}, machine steal "
              f"{100 * result.get('machine_steal_share', math.nan):.0f}% idle "
              f"{100 * result.get('machine_idle_share', math.nan):.0f}%", flush=True)  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    results = {name: {key: median_run(tries) for key, tries in by_key.items()} for name, by_key in runs.items()}
    figures = summarize(results, args, summary)
    for key, value in figures["ratios"].items():
        print(f"{key}: {value}")
    print(json.dumps(figures))


def median_run(tries: list[dict]) -> dict:
    """The run with the median images/s (the lower middle of an even count), whole: its own CPU, memory
    and machine shares, not averages of several runs; with the images/s of every try beside it."""
    ranked = sorted(tries, key=lambda result: result["images_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    cpu = sorted(result["cpu_ms_per_image"] for result in tries)
    chosen["median_cpu_ms_per_image"] = cpu[(len(cpu) - 1) // 2]
    if len(tries) > 1:
        chosen["tries_images_per_s"] = [result["images_per_s"] for result in tries]
        chosen["tries_cpu_ms_per_image"] = [result["cpu_ms_per_image"] for result in tries]
    return chosen


def summarize(results: dict, args: argparse.Namespace, corpus: dict) -> dict:
    ours, theirs = results["ours"], results["img2dataset"]
    ratios = {}
    for key, figures in theirs.items():
        if figures["images_per_s"] > 0 and key in ours:
            ratios[f"images_per_s_ours_over_img2dataset_{key}ms"] = round(
                ours[key]["images_per_s"] / figures["images_per_s"], 2
            )
            ratios[f"cpu_ms_per_image_ours_over_img2dataset_{key}ms"] = round(
                ours[key]["median_cpu_ms_per_image"] / figures["median_cpu_ms_per_image"], 3
            )
    if ours.get("http_0", {}).get("images_per_s", 0) > 0:
        for key, figures in ours.items():
            if key.startswith("http_") and key != "http_0":
                ratios[f"ours_{key}ms_over_http_0ms"] = round(
                    figures["images_per_s"] / ours["http_0"]["images_per_s"], 2
                )
    return {"benchmark": "fetch", "size": args.size, "n": args.n, "corpus": corpus, "hosts": len(args.hosts),
            "kinds": args.kinds, "timeout_s": args.timeout, "repeats": args.repeats,
            "ours_args": " ".join(args.ours_args), "ours": ours,
            "img2dataset": theirs or None, "ratios": ratios}  # fmt: skip


if __name__ == "__main__":
    main()
