#!/usr/bin/env python3
"""Copies a weights file with SUFFIX appended to its metadata version: the
same tensors, so it validates, but a different model id, so a worker that
loads it reports a new `model`. Used by deploy/stack-test.sh and
bench/soak.sh to make real reloads.

    deploy/weights-variant.py IN OUT SUFFIX
"""
import json
import struct
import sys

src, dst, suffix = sys.argv[1:4]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
header["__metadata__"]["version"] += suffix
text = json.dumps(header, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
open(dst, "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
