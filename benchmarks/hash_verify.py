"""What verifying a bundle's hashes costs: ``Bundle.verify_hashes`` on files of a given size.

A server verifies every recorded sha256 at start-up (one read of each ONNX file,
external weights file and plan); an SDXL fp16 bundle holds about 7 GB of them
(U-Net 5.1 GB, text encoders 1.6 GB, VAE decoder 0.2 GB, plus engines). This
writes one file of ``--gb`` gigabytes (random bytes) as the external weights of
a small bundle, then times the project's own verification (the same function a
server calls) ``--repeats`` times, reporting wall time (what start-up waits) and
this process's CPU time (hashing plus read calls), so a read-bound machine shows
as wall far above CPU.

Run::

    python benchmarks/hash_verify.py --gb 1 --out benchmarks/results/hash_verify-DATE.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_random(path: Path, nbytes: int, chunk: int = 64 << 20) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the weights file in GB (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--work", default=None, help="folder for the temporary file (default: the system's temp dir)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()

    from infiniteid.bundle import file_digest, verify_hashes_of

    nbytes = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        path = Path(tmp) / "unet.onnx.data"
        write_random(path, nbytes)
        want = file_digest(path)
        runs, cpu = [], []
        for _ in range(args.repeats):
            c0 = time.process_time()
            runs.append(verify_hashes_of([(path, want, "manifest")]))
            cpu.append(time.process_time() - c0)
    rate = statistics.median(r.gb_per_s for r in runs)
    cpu_rate = nbytes / 1e9 / statistics.median(cpu)
    lines = [
        f"# Hash verification cost ({date.today().isoformat()})",
        "",
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs visible; Python {platform.python_version()}, "
        f"hashlib sha256 ({'OpenSSL ' + __import__('ssl').OPENSSL_VERSION.split()[1]})",
        "",
        "| file | passes | wall s per pass | CPU s per pass | median GB/s (wall) | GB/s (CPU only) "
        "| SDXL fp16 bundle (7 GB), wall |",
        "|---|---|---|---|---|---|---|",
        f"| {nbytes / 1e9:.2f} GB random bytes | {len(runs)} | {', '.join(f'{r.seconds:.2f}' for r in runs)} | "
        f"{', '.join(f'{c:.2f}' for c in cpu)} | {rate:.2f} | {cpu_rate:.2f} | {7.0 / rate:.1f} s |",
        "",
        "Wall time includes reading the file (page cache or disk); CPU time is the hashing and the read "
        "system calls of this process. Where wall is far above CPU, the read (disk, or a busy shared "
        "machine) is the limit, not sha256.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
