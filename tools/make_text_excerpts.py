"""Cut quantkit's shipped texts (quantkit/data/calib.txt, eval.txt, calib_large.txt) from the corpus.

    python tools/make_text_excerpts.py [CORPUS [OUT_DIR]]
    python tools/make_text_excerpts.py --calib-large FILE [CORPUS]

CORPUS defaults to /work/shared/data/python-docs-en.txt, OUT_DIR to quantkit/data.

The corpus is English prose from the Python 3.11 documentation (Debian python3.11-doc
3.11.2-6+deb12u9, PSF licence), one paragraph per block, blocks separated by a blank line.
calib.txt takes whole paragraphs from the start of the file, eval.txt whole paragraphs from
the start of the second half, each until ~120 KB (UTF-8 bytes) is reached. Paragraphs that
occur in the calibration part are skipped in the evaluation part, so the two are disjoint.
Deterministic: the same corpus gives byte-identical files.

calib_large.txt is the larger calibration text (~1 MB): every paragraph of the corpus's first
half (which contains calib.txt) except those that also occur in eval.txt, so it stays disjoint
from the evaluation excerpt. recipes/bitstack.yaml calibrates on it by default
(``default_calib_text: calib_large``; docs/benchmarks.md, BitStack round 5). ``--calib-large
FILE`` writes only that text, to FILE.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = Path("/work/shared/data/python-docs-en.txt")
TARGET_BYTES = 120_000


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def take(paras: list[str], target: int, exclude: frozenset = frozenset()) -> list[str]:
    out, size = [], 0
    for p in paras:
        if p in exclude:
            continue
        if size >= target:
            break
        out.append(p)
        size += len(p.encode("utf-8")) + 2
    return out


def main(argv: list[str]) -> int:
    large = None
    if len(argv) > 2 and argv[1] == "--calib-large":
        large, argv = Path(argv[2]), argv[:1] + argv[3:]
    corpus = Path(argv[1]) if len(argv) > 1 else DEFAULT_CORPUS
    paras = paragraphs(corpus.read_text(encoding="utf-8"))
    calib = take(paras, TARGET_BYTES)
    half = len(paras) // 2
    assert len(calib) < half, "calibration excerpt would reach the second half"
    evalp = take(paras[half:], TARGET_BYTES, exclude=frozenset(calib))
    seen = frozenset(evalp)
    calib_large = [p for p in paras[:half] if p not in seen]
    if large is not None:
        files = [(large, calib_large)]
    else:
        out = Path(argv[2]) if len(argv) > 2 else ROOT / "quantkit" / "data"
        out.mkdir(parents=True, exist_ok=True)
        files = [(out / "calib.txt", calib), (out / "eval.txt", evalp), (out / "calib_large.txt", calib_large)]
    for path, part in files:
        data = "\n\n".join(part) + "\n"
        path.write_text(data, encoding="utf-8", newline="\n")
        print(f"{path}: {len(part)} paragraphs, {len(data.encode('utf-8'))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
