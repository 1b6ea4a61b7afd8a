"""Evaluation protocols: which prompts, which subjects, which reference images.

``dreambench-single`` (750 cases)
    Every DreamBench subject with each of the 25 prompts of its list (object or live, see
    :mod:`musar.data.dreambench`), DreamBooth's unique token dropped because MUSAR is
    tuning-free: "a dog in the jungle". The condition image is the subject's first image
    (``00.jpg``); the image metrics compare against *all* real images of the subject (``00.jpg``
    included, as in the DreamBooth protocol). The subject phrase is the class word ("dog"), the
    one string present verbatim in every prompt, including "a red dog". Cases are ordered
    prompt-major (all subjects with prompt 0, then prompt 1, ...) so ``--limit 30`` covers every
    subject once.

``dreambench-multi`` (60 pairs + 20 triplets = 80 cases)
    Pairing rule (ours, deterministic): order the subjects by (class, name); let ``s`` be the size
    of the largest class (7 dogs). Pairs are ``(i, i+s)`` then ``(i, i+s+1)`` for i = 0..n-1
    (indices mod n). Triplets are ``(i, i+s, i+2s)`` for every i with i mod 3 != 2. Because
    same-class subjects are contiguous in that order and no block is longer than ``s``, these
    offsets never put two subjects of one class together. On the 30 subjects every subject is
    in exactly 4 pairs and 2 triplets.
    Prompts: the *context templates*, i.e. templates present in both the object and the live
    list whose only text before the subject is the article ("a {0} {1} in the jungle", 10 of
    them). Templates that put an attribute on the subject ("a red {0} {1}") or dress it ("wearing
    a santa hat") are left out because with several subjects it is ambiguous which one they
    mean. Case j of each group takes context template j mod 10, and the subjects are listed with
    the template's article: "a backpack and a cat in the jungle", "a backpack, a cat and a dog in
    the jungle". Conditions are each subject's ``00.jpg``; image metrics average over every real image
    of every subject (docs/design.md sec. 8).

``custom``
    A JSON list of ``{"prompt": ..., "subjects": [{"image": ..., "phrase": ...}, ...]}``;
    optional per case ``"id"``, optional per subject ``"name"`` and ``"references"`` (images for
    the metrics, default: the condition image). Relative paths are relative to the JSON file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from musar.data.dreambench import DreamBench, DreamBenchSubject, format_prompt, load_dreambench
from musar.errors import MusarError
from musar.utils.safe_load import as_path, parse_json, read_text, shown
from musar.utils.spans import find_phrase_chars

PROTOCOLS: tuple[str, ...] = ("dreambench-single", "dreambench-multi", "custom")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3)  # docs/design.md sec. 8: 4 seeds per case
DEFAULT_PAIRS = 60
DEFAULT_TRIPLETS = 20
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # case ids become file names


@dataclass(frozen=True)
class CaseSubject:
    """One subject of a case: what conditions generation and what the metrics compare with."""

    image: Path = field(metadata={"help": "reference image given to the generator"})
    phrase: str = field(metadata={"help": "subject phrase; must occur in the prompt"})
    name: str = field(default="", metadata={"help": "subject name for reports, e.g. 'dog2'"})
    references: tuple[Path, ...] = field(
        default=(), metadata={"help": "real images for DINO/CLIP-I; empty means (image,)"}
    )

    @property
    def metric_references(self) -> tuple[Path, ...]:
        return self.references or (self.image,)


@dataclass(frozen=True)
class Case:
    """One prompt with its subjects; generated once per seed."""

    case_id: str = field(metadata={"help": "unique, file-name safe id"})
    prompt: str = field(metadata={"help": "the generation prompt (also the CLIP-T text)"})
    subjects: tuple[CaseSubject, ...] = field(default=(), metadata={"help": "one entry per subject"})

    @property
    def kind(self) -> str:
        """``single`` or ``multi``: the Table 1 column group this case counts towards."""
        return "single" if len(self.subjects) == 1 else "multi"

    @property
    def subject_names(self) -> list[str]:
        return [s.name or s.phrase for s in self.subjects]


def _subject(s: DreamBenchSubject) -> CaseSubject:
    return CaseSubject(s.condition_image, s.class_name, s.name, s.images)


def dreambench_single_cases(bench: DreamBench) -> list[Case]:
    """30 x 25 cases, prompt-major (see module docstring)."""
    per_subject = {s.name: bench.prompts_for(s) for s in bench.subjects}
    n_prompts = max(len(p) for p in per_subject.values())
    cases = []
    for p in range(n_prompts):
        for s in bench.subjects:
            prompts = per_subject[s.name]
            if p < len(prompts):
                cases.append(Case(f"{s.name}-p{p:02d}", prompts[p], (_subject(s),)))
    return cases


def multi_templates(bench: DreamBench) -> list[str]:
    """Context templates usable for several subjects (see module docstring), in file order."""
    live = set(bench.live_prompts)
    out = [t for t in bench.object_prompts if t in live and _split_template(t) is not None]
    if not out:
        raise MusarError("DreamBench prompt lists share no 'a {0} {1} <context>' template")
    return out


def _split_template(template: str) -> tuple[str, str] | None:
    """(article, context) for 'ARTICLE {0} {1} CONTEXT', None when anything else precedes {0}."""
    head, sep, tail = template.partition("{0} {1}")
    words = head.split()
    if not sep or len(words) != 1 or not tail.strip():
        return None
    return words[0], tail.strip()


def _list_phrases(article: str, phrases: Sequence[str]) -> str:
    items = [f"{article} {p}" for p in phrases]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def multi_prompt(template: str, phrases: Sequence[str]) -> str:
    """'a {0} {1} in the jungle' + (dog, backpack) -> 'a dog and a backpack in the jungle'."""
    split = _split_template(template)
    if split is None:
        raise MusarError(f"not a context template: {template!r}")
    article, context = split
    return format_prompt(_list_phrases(article, phrases) + " " + context, "")


def pair_subjects(
    subjects: Sequence[DreamBenchSubject], n_pairs: int = DEFAULT_PAIRS, n_triplets: int = DEFAULT_TRIPLETS
) -> tuple[list[tuple[DreamBenchSubject, ...]], list[tuple[DreamBenchSubject, ...]]]:
    """The deterministic pairing rule of the module docstring: (pairs, triplets)."""
    order = sorted(subjects, key=lambda s: (s.class_name, s.name))
    n = len(order)
    if n < 3:
        raise MusarError("multi-subject protocol needs at least 3 subjects")
    block = max(Counter(s.class_name for s in order).values())

    def pick(
        offset_sets: list[tuple[int, ...]], starts: list[int], want: int
    ) -> list[tuple[DreamBenchSubject, ...]]:
        seen: set[frozenset[int]] = set()
        out: list[tuple[DreamBenchSubject, ...]] = []
        for offsets in offset_sets:
            for i in starts:
                idx = tuple((i + o) % n for o in offsets)
                key = frozenset(idx)
                members = [order[j] for j in idx]
                # The offsets already avoid same-class members on DreamBench; the check keeps the
                # rule correct on any other copy instead of trusting that argument.
                if len(key) < len(idx) or key in seen or len({m.class_name for m in members}) < len(idx):
                    continue
                seen.add(key)
                out.append(tuple(members))
                if len(out) == want:
                    return out
        raise MusarError(f"cannot form {want} groups of {len(offset_sets[0])} subjects of distinct classes")

    offsets = range(block, n)
    pairs = pick([(0, d) for d in offsets], list(range(n)), n_pairs) if n_pairs else []
    starts = [i for i in range(n) if i % 3 != 2] + [i for i in range(n) if i % 3 == 2]
    triplets = pick([(0, d, 2 * d) for d in offsets], starts, n_triplets) if n_triplets else []
    return pairs, triplets


def dreambench_multi_cases(
    bench: DreamBench, n_pairs: int = DEFAULT_PAIRS, n_triplets: int = DEFAULT_TRIPLETS
) -> list[Case]:
    """60 pair cases then 20 triplet cases (see module docstring)."""
    templates = multi_templates(bench)
    pairs, triplets = pair_subjects(bench.subjects, n_pairs, n_triplets)
    cases = []
    for label, groups in (("pair", pairs), ("triplet", triplets)):
        for j, group in enumerate(groups):
            prompt = multi_prompt(templates[j % len(templates)], [s.class_name for s in group])
            names = "+".join(s.name for s in group)
            cases.append(Case(f"{label}{j:02d}-{names}", prompt, tuple(_subject(s) for s in group)))
    return cases


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load_custom_cases(path: str | Path) -> list[Case]:
    """Cases from a JSON file (format in the module docstring); every problem is a MusarError."""
    path = as_path(path, "custom cases file")
    text = read_text(path, "custom cases file")  # regular file, bounded, UTF-8
    try:
        data = parse_json(text, "the file")
    except MusarError as e:
        raise MusarError(f"cannot read custom cases {shown(path)}: {e}") from None
    if not isinstance(data, list) or not data:
        raise MusarError(f"{path}: expected a non-empty JSON list of cases")
    base = path.parent
    cases = [_custom_case(item, i, base, path) for i, item in enumerate(data)]
    dup = [k for k, v in Counter(c.case_id for c in cases).items() if v > 1]
    if dup:
        raise MusarError(f"{path}: duplicate case id {dup[0]!r}")
    return cases


def _custom_case(item: Any, i: int, base: Path, path: Path) -> Case:
    where = f"{path}: case {i}"
    if not isinstance(item, dict):
        raise MusarError(f"{where}: expected an object with 'prompt' and 'subjects'")
    prompt, subjects = item.get("prompt"), item.get("subjects")
    if not isinstance(prompt, str) or not prompt.strip():
        raise MusarError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(subjects, list) or not subjects:
        raise MusarError(f"{where}: 'subjects' must be a non-empty list")
    case_id = str(item.get("id", f"custom{i:03d}"))
    if not _SAFE_ID.match(case_id):
        raise MusarError(f"{where}: id {case_id!r} must use only letters, digits and _ . + -")
    out = []
    for k, sub in enumerate(subjects):
        if (
            not isinstance(sub, dict)
            or not isinstance(sub.get("image"), str)
            or not isinstance(sub.get("phrase"), str)
        ):
            raise MusarError(f"{where}, subject {k}: expected {{'image': PATH, 'phrase': TEXT}}")
        phrase = sub["phrase"].strip()
        if not phrase or _norm(phrase) not in _norm(prompt):
            raise MusarError(f"{where}: phrase {sub['phrase']!r} does not occur in the prompt")
        refs = sub.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise MusarError(f"{where}, subject {k}: 'references' must be a list of paths")
        image = _existing(base, sub["image"], where)
        references = tuple(_existing(base, r, where) for r in refs)
        out.append(CaseSubject(image, phrase, str(sub.get("name", phrase)), references))
    try:  # the pipeline's rule: whole words ("cat" is not in "catalog"), one place per subject
        find_phrase_chars(prompt.strip(), [s.phrase for s in out])
    except MusarError as e:
        whole = " as whole words" if "does not appear" in str(e) else ""  # it does occur inside a word
        raise MusarError(f"{where}: {e}{whole}") from None
    return Case(case_id, prompt.strip(), tuple(out))


def _existing(base: Path, rel: str, where: str) -> Path:
    p = (base / Path(rel).expanduser()).resolve()
    if not p.is_file():
        raise MusarError(f"{where}: image not found: {p}")
    return p


def build_cases(protocol: str, data: str | Path, limit: int | None = None) -> list[Case]:
    """The cases of ``protocol``; ``data`` is the DreamBench root or, for ``custom``, the JSON file.

    ``limit`` keeps the first N cases (orders are documented above).
    """
    if protocol == "dreambench-single":
        cases = dreambench_single_cases(load_dreambench(data))
    elif protocol == "dreambench-multi":
        cases = dreambench_multi_cases(load_dreambench(data))
    elif protocol == "custom":
        cases = load_custom_cases(data)
    else:
        raise MusarError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    if limit is not None:
        if limit < 1:
            raise MusarError(f"--limit must be at least 1, got {limit}")
        cases = cases[:limit]
    return cases
