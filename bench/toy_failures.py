"""What goes wrong in a toy report row: per prompted body colour, how often the subject was drawn
in another colour, and which (issue 21: where c = 4 composition fails).

A measurement script, not library code. It reads the per-image verdicts ``musar toy report``
writes to ``report.json`` (the first training seed of each row) and tallies, per subject, the
body colour the analyser saw against the one prompted; a colour counts as borrowed when another
subject of the same image has it as body or pattern colour:

    .venv/bin/python bench/toy_failures.py runs/toy/report/report.json --rows full three four
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from musar.toy.identities import BODY_COLOURS, PALETTE

_SAW = re.compile(r"saw an? (\w+) (\w+)")
_COLOURS = re.compile("|".join(PALETTE))


def tally(verdicts: list[str]) -> tuple[Counter, Counter, Counter, Counter]:
    """(subjects per prompted colour, wrong ones, (prompted, seen) pairs, borrowed / not)."""
    total, wrong, pairs, borrowed = Counter(), Counter(), Counter(), Counter()
    for image in verdicts:
        lines = [ln for ln in image.splitlines()[1:] if ln.strip()]
        wanted = [ln.split(":")[0].removeprefix("a ").removeprefix("an ") for ln in lines]
        for i, line in enumerate(lines):
            body = wanted[i].split()[0]
            total[body] += 1
            seen = _SAW.search(line)
            if seen is None or seen.group(1) == body:
                continue
            wrong[body] += 1
            pairs[(body, seen.group(1))] += 1
            others = {c for j, w in enumerate(wanted) if j != i for c in _COLOURS.findall(w)}
            borrowed["borrowed from another subject" if seen.group(1) in others else "not borrowed"] += 1
    return total, wrong, pairs, borrowed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a report.json of musar toy report")
    parser.add_argument("--rows", nargs="+", default=["full", "three", "four"])
    args = parser.parse_args()
    results = json.loads(args.report.read_text(encoding="utf-8"))
    for row in args.rows:
        if "verdicts" not in results.get(row, {}):
            print(f"{row}: not in {args.report}")
            continue
        total, wrong, pairs, borrowed = tally(results[row]["verdicts"])
        per = ", ".join(f"{c} {wrong[c]}/{total[c]}" for c in BODY_COLOURS if total[c])
        top = ", ".join(f"{a}->{b} {n}" for (a, b), n in pairs.most_common(4))
        print(f"{row}: wrong body colour {sum(wrong.values())}/{sum(total.values())} ({per}); most: {top}; {dict(borrowed)}")


if __name__ == "__main__":
    main()
