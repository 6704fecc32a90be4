#!/usr/bin/env python3
"""Write the Fashion-MNIST subset that isonn embeds in its binary.

Takes the first 10,000 training and the first 2,000 test images and labels
from the full Fashion-MNIST IDX files and writes them as gzipped IDX files.
The gzip header carries no timestamp or file name, so the same input always
gives byte-identical output.

Usage: python3 data/make-subset.py [SOURCE_DIR] [OUTPUT_DIR]
  SOURCE_DIR  directory with the four full IDX files
              (default /usr/share/datasets/fashion-mnist, from the Debian
              package dataset-fashion-mnist)
  OUTPUT_DIR  where to write the subset
              (default data/fashion-mnist-subset next to this script)
"""

import gzip
import os
import struct
import sys

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# (split prefix, number of items kept)
SPLITS = [("train", 10000), ("t10k", 2000)]


def read_idx(path):
    """Return the raw bytes of an IDX file, gunzipping if it starts with 1f 8b."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def find(source_dir, stem):
    """Return the path of `stem` or `stem.gz` in source_dir."""
    for name in (stem + ".gz", stem):
        path = os.path.join(source_dir, name)
        if os.path.exists(path):
            return path
    sys.exit(f"error: neither {stem} nor {stem}.gz found in {source_dir}")


def subset_images(data, count, path):
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        sys.exit(f"error: {path}: magic {magic:#010x}, expected {IMAGES_MAGIC:#010x}")
    if n < count:
        sys.exit(f"error: {path}: has {n} images, need at least {count}")
    body = data[16 : 16 + count * rows * cols]
    return struct.pack(">IIII", IMAGES_MAGIC, count, rows, cols) + body


def subset_labels(data, count, path):
    magic, n = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        sys.exit(f"error: {path}: magic {magic:#010x}, expected {LABELS_MAGIC:#010x}")
    if n < count:
        sys.exit(f"error: {path}: has {n} labels, need at least {count}")
    return struct.pack(">II", LABELS_MAGIC, count) + data[8 : 8 + count]


def write_gzip(path, payload):
    # mtime=0 and an empty file name keep the output reproducible.
    with open(path, "wb") as raw:
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
        ) as f:
            f.write(payload)


def main():
    script_dir = os.path.dirname(os.path.abspath(__file__))
    source_dir = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
    output_dir = (
        sys.argv[2] if len(sys.argv) > 2 else os.path.join(script_dir, "fashion-mnist-subset")
    )
    os.makedirs(output_dir, exist_ok=True)

    for prefix, count in SPLITS:
        stem = f"{prefix}-images-idx3-ubyte"
        path = find(source_dir, stem)
        payload = subset_images(read_idx(path), count, path)
        write_gzip(os.path.join(output_dir, stem + ".gz"), payload)

        stem = f"{prefix}-labels-idx1-ubyte"
        path = find(source_dir, stem)
        payload = subset_labels(read_idx(path), count, path)
        write_gzip(os.path.join(output_dir, stem + ".gz"), payload)

        print(f"{prefix}: wrote {count} images and labels to {output_dir}")


if __name__ == "__main__":
    main()
