"""Byte-identical cells in a zip of cells, and what the duplicate check's sha256 costs next to
decoding: ``python -m bench.duplicates [ZIP]`` (default: the development set)."""

import hashlib
import sys
import time
import zipfile
from collections import defaultdict

from core.data.images import decode_image

zf = zipfile.ZipFile(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/nih_cells_dev.zip")
members = [i for i in zf.infolist() if i.filename.lower().endswith(".png")]
by_hash = defaultdict(list)
datas = []
for info in members:
    data = zf.read(info)
    datas.append(data)
    by_hash[hashlib.sha256(data).hexdigest()].append(info.filename)
groups = [v for v in by_hash.values() if len(v) > 1]
print(
    f"{len(members)} cells, {len(by_hash)} distinct byte contents, "
    f"{sum(len(g) - 1 for g in groups)} duplicates in {len(groups)} groups"
)
for g in groups[:5]:
    print("  ", g)
sample = datas[:2000]
t0 = time.perf_counter()
digests = [hashlib.sha256(d).hexdigest() for d in sample]
t1 = time.perf_counter()
images = [decode_image(d, size=128) for d in sample]
t2 = time.perf_counter()
print(
    f"sha256 {1e3 * (t1 - t0) / len(sample):.3f} ms/cell, decode+resize "
    f"{1e3 * (t2 - t1) / len(sample):.3f} ms/cell, ratio {(t1 - t0) / (t2 - t1):.3f}"
)
