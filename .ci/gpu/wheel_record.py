"""Check every file of a wheel against the sha256 its own RECORD lists.

The staging may repack the wheel (stored instead of deflated, so that xz shrinks it further), which
changes the wheel's bytes but none of its files; RECORD comes from the original, so a file that
matches it is the file onnxruntime released. Stdlib only: it runs on the GPU machine before
onnxruntime-gpu is installed. Usage: python3 wheel_record.py WHEEL (exit 1 naming the first bad file).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile


def file_digest(z: zipfile.ZipFile, name: str) -> str:
    """RECORD's form of a sha256: urlsafe base64 without padding."""
    h = hashlib.sha256()
    with z.open(name) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def record_mismatches(wheel: str) -> list[str]:
    """Names whose content differs from RECORD, or that RECORD lists but the wheel lacks."""
    with zipfile.ZipFile(wheel) as z:
        record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            return ["(no .dist-info/RECORD in the wheel)"]
        names = set(z.namelist())
        bad = []
        for row in csv.reader(io.StringIO(z.read(record).decode())):
            if len(row) < 2 or not row[1]:
                continue  # RECORD itself has no hash
            name, (algo, _, want) = row[0], row[1].partition("=")
            if algo != "sha256" or name not in names:
                bad.append(name)
                continue
            if file_digest(z, name) != want:
                bad.append(name)
        return bad


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python3 wheel_record.py WHEEL", file=sys.stderr)
        return 2
    bad = record_mismatches(sys.argv[1])
    if bad:
        print(
            f"wheel_record: {len(bad)} file(s) of {sys.argv[1]} do not match its RECORD, first: {bad[0]}",
            file=sys.stderr,
        )
        return 1
    print(f"wheel_record: every file of {sys.argv[1]} matches its RECORD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
