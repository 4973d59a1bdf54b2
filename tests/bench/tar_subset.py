#!/usr/bin/env python3
"""Writes the first N regular files of a tar archive (with the directories
and links that come before them) to a new tar, streaming, so that a short
benchmark untars a prefix of the Linux source tree instead of all of it.

Usage: tar_subset.py SRC.tar N DST.tar    (N = 0: copy every member)
Prints the number of regular files written.
"""
import os
import sys
import tarfile


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    src, limit, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tmp = dst + ".part"
    files = 0
    with tarfile.open(src, "r|") as inp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        for member in inp:
            if member.isfile():
                if limit and files >= limit:
                    break
                out.addfile(member, inp.extractfile(member))
                files += 1
            else:
                out.addfile(member)
    os.replace(tmp, dst)
    print(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
