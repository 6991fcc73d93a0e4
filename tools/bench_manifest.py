"""What a checkpoint manifest costs: seconds per GB to hash (and sync) the files of a save,
against the seconds per GB to write them.

Writes ``--gb`` of incompressible data as ``--files`` shard files (as a distributed checkpoint
lays them out), timing the write with its fsync, then times ``write_manifest`` (the hashing a
save adds, files still in the page cache as they are right after a save) and ``find_damage``
(the verification a load does). One process; on N ranks each hashes about 1/N of the bytes.

    .venv/bin/python tools/bench_manifest.py --gb 2 --dir /tmp/manifest-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from sci_scale.checkpoint.manifest import find_damage, write_manifest

CHUNK = 64 << 20


def write_shards(root: Path, total_bytes: int, files: int) -> float:
    """Seconds to write and fsync ``files`` files of random bytes totalling ``total_bytes``."""
    (root / "model").mkdir(parents=True)
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    for index in range(files):
        left = total_bytes // files
        with open(root / "model" / f"__{index}_0.distcp", "wb") as handle:
            while left > 0:
                n = min(left, CHUNK)
                handle.write(block[:n])
                left -= n
            handle.flush()
            os.fsync(handle.fileno())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="bytes to write, in GB (1e9)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--dir", default="/tmp/sci-scale-manifest-bench")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    total = int(args.gb * 1e9)
    try:
        write_s = write_shards(root, total, args.files)
        start = time.perf_counter()
        write_manifest(root)
        hash_s = time.perf_counter() - start
        start = time.perf_counter()
        assert find_damage(root) is None
        verify_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gb = total / 1e9
    print(f"{gb:.2f} GB in {args.files} files")
    print(f"write + fsync      {write_s / gb:7.3f} s/GB  ({gb / write_s:6.2f} GB/s)")
    print(f"manifest (save)    {hash_s / gb:7.3f} s/GB  ({gb / hash_s:6.2f} GB/s)  "
          f"= {hash_s / write_s:.1%} of the write")  # fmt: skip
    print(f"verify (load)      {verify_s / gb:7.3f} s/GB  ({gb / verify_s:6.2f} GB/s)")


if __name__ == "__main__":
    main()
