#!/usr/bin/env python3
"""Grow a committed corpus by a few inputs that cover the most new code.

libFuzzer's `-merge=1` keeps every input that adds a *feature* (an edge at a
new hit count), which after a 10-minute run is ~1000-2000 files per target: too
many to commit. This reads the merge control file (`-merge_control_file=F`,
whose `COV i ...` lines list the code edges input i covers) and greedily picks
inputs by new *edges* only, smallest first among equals, until every edge is
covered or the caps are hit. Files already in CORPUS_DIR (the hand-made,
named seeds and crash reproducers) are always kept and count against the caps;
picked files are copied in under their SHA-1. Give the merge a control file
that does not exist yet: libFuzzer resumes an existing one. Run this from the
directory the merge ran in (the control file's paths are relative to it).

usage: pick_corpus.py CONTROL_FILE CORPUS_DIR [MAX_FILES=200] [MAX_BYTES=2000000]
"""
import hashlib
import os
import shutil
import sys


def main() -> None:
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    control, corpus = sys.argv[1], os.path.abspath(sys.argv[2])
    max_files = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    max_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 2_000_000

    lines = open(control).read().split("\n")
    count = int(lines[0])
    files = lines[2 : 2 + count]
    cov: dict[int, set[int]] = {}
    for line in lines[2 + count :]:
        parts = line.split()
        if parts and parts[0] == "COV":
            cov[int(parts[1])] = set(map(int, parts[2:]))
    size = {i: os.path.getsize(f) for i, f in enumerate(files)}
    in_corpus = lambda f: os.path.dirname(os.path.abspath(f)) == corpus  # noqa: E731

    chosen = [i for i, f in enumerate(files) if in_corpus(f)]
    covered = set().union(*(cov.get(i, set()) for i in chosen))
    every = set().union(*cov.values()) if cov else set()
    total = sum(size[i] for i in chosen)
    candidates = [i for i in cov if i not in chosen]
    picked = []
    while len(chosen) < max_files:
        best, gain = None, 0
        for i in candidates:
            g = len(cov[i] - covered)
            if g > gain or (g == gain and g > 0 and size[i] < size[best]):
                best, gain = i, g
        if best is None or total + size[best] > max_bytes:
            break
        chosen.append(best)
        picked.append(best)
        candidates.remove(best)
        covered |= cov[best]
        total += size[best]
    for i in picked:
        data = open(files[i], "rb").read()
        shutil.copy(files[i], os.path.join(corpus, hashlib.sha1(data).hexdigest()))
    print(
        f"{corpus}: added {len(picked)}, now {len(chosen)} files, {total} bytes, "
        f"covering {len(covered)}/{len(every)} edges"
    )


if __name__ == "__main__":
    main()
