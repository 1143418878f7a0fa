"""Cost of the content fingerprint at register (issue 14: <= 5% of a cold load of a 3.3 GB adapter).

Writes a file of ``--gb`` GB of random bytes behind a safetensors-like header, then times
``fingerprint_file`` (the bytes register hashes: ``--sample-mib`` of tensor data in 256 KiB blocks plus
blake2b) with the page cache dropped for the file (posix_fadvise DONTNEED: a cold register) and warm.
Prints a table and writes JSON (``--json``).

    python3 scripts/bench_fingerprint.py --gb 3.3 --json docs/bench/fingerprint.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

from tp_lora.format.fingerprint import fingerprint_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.3)
    ap.add_argument("--sample-mib", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold-load-s", type=float, default=0.42, help="the cold load it is compared with")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    size = int(a.gb * 1e9)
    hlen = 64 << 10
    path = os.path.join(a.dir, "tp_lora_fingerprint_bench.safetensors")
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        f.write(hlen.to_bytes(8, "little") + b" " * hlen)
        left = size - 8 - hlen
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    sample = int(a.sample_mib * (1 << 20))
    res = {}
    for mode in ("cold", "warm"):
        ts = []
        for _ in range(a.repeats):
            if mode == "cold":
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            t = time.perf_counter()
            fingerprint_file(path, hlen, "d" * 64, sample)
            ts.append(time.perf_counter() - t)
        res[mode] = {"median_s": statistics.median(ts), "max_s": max(ts)}
    os.unlink(path)
    out = {"file_bytes": size, "sample_bytes": sample, "cold_load_s": a.cold_load_s,
           "cold_pct_of_load": 100 * res["cold"]["median_s"] / a.cold_load_s,
           "warm_pct_of_load": 100 * res["warm"]["median_s"] / a.cold_load_s, **res,
           "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{'mode':6} {'median ms':>10} {'max ms':>8} {'% of cold load':>15}")
    for m in ("cold", "warm"):
        print(f"{m:6} {1e3 * res[m]['median_s']:10.2f} {1e3 * res[m]['max_s']:8.2f} "
              f"{out[m + '_pct_of_load']:15.2f}")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
