"""Reader for DreamBench, the DreamBooth evaluation set, in the original google/dreambooth layout.

Layout accepted (either form):

* ``ROOT/<subject>/NN.jpg`` with ``ROOT/prompts_and_classes.txt`` (a clone of the ``dataset/``
  folder, as in ``../shared/data/dreambench``), or
* ``ROOT/dataset/<subject>/NN.jpg`` with ``ROOT/dataset/prompts_and_classes.txt`` (a clone of the
  whole repository).

Everything is read from ``prompts_and_classes.txt``: the ``subject_name,class`` table and the
two prompt lists ("Object Prompts" and "Live Subject Prompts"), written there as Python lines
``'a {0} {1} in the jungle'.format(unique_token, class_token)``. The templates are kept with
``{0}`` (DreamBooth's unique token) and ``{1}`` (the class token); :func:`format_prompt` fills
them. Nothing about the prompts is hard-coded here, so an updated copy of the file is honoured.

Live subjects. The original repository says which list applies to which subject only in prose:
the "live subject" prompts (outfits, hats) are for the dogs and cats, the object prompts for
everything else. We encode that as a rule on the class column: a subject is live when its class
is in :data:`LIVE_CLASSES` (``dog``, ``cat``). On the published set this gives 9 live subjects
(7 dogs, 2 cats) and 21 objects, the split the DreamBooth paper reports.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from musar.errors import MusarError

PROMPTS_FILE = "prompts_and_classes.txt"

# Classes whose subjects take the "Live Subject Prompts" list (see module docstring).
LIVE_CLASSES: frozenset[str] = frozenset({"dog", "cat"})

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp"})

# One prompt line: a Python string literal followed by `.format(`. The literal is decoded with
# ast.literal_eval so escaped quotes inside a prompt survive.
_PROMPT_LINE = re.compile(r"""^\s*(?P<lit>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*\.format\(""")
_CLASS_ROW = re.compile(r"^\s*(?P<name>[^,\s][^,]*?)\s*,\s*(?P<cls>[^,]+?)\s*$")
_OBJECT_HEADER = "object prompts"
_LIVE_HEADER = "live subject prompts"


@dataclass(frozen=True)
class DreamBenchSubject:
    """One DreamBench subject: its folder name, class word and real images (sorted by name)."""

    name: str = field(metadata={"help": "folder name, e.g. 'dog2'"})
    class_name: str = field(metadata={"help": "class token from the classes table, e.g. 'dog'"})
    images: tuple[Path, ...] = field(default=(), metadata={"help": "all real images, sorted"})
    live: bool = field(default=False, metadata={"help": "takes the live-subject prompt list"})

    @property
    def condition_image(self) -> Path:
        """The reference used to condition generation: the first image (``00.jpg``)."""
        return self.images[0]


@dataclass(frozen=True)
class DreamBench:
    """The parsed benchmark. Prompt templates keep ``{0}``/``{1}`` placeholders."""

    root: Path
    subjects: tuple[DreamBenchSubject, ...] = ()
    object_prompts: tuple[str, ...] = ()
    live_prompts: tuple[str, ...] = ()

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.subjects)

    def subject(self, name: str) -> DreamBenchSubject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise MusarError(f"DreamBench has no subject {name!r}")

    def templates_for(self, subject: DreamBenchSubject) -> tuple[str, ...]:
        return self.live_prompts if subject.live else self.object_prompts

    def prompts_for(self, subject: DreamBenchSubject, unique_token: str = "") -> list[str]:
        """The subject's 25 prompts; ``unique_token=''`` (tuning-free use) drops DreamBooth's token."""
        return [format_prompt(t, subject.class_name, unique_token) for t in self.templates_for(subject)]


def format_prompt(template: str, class_token: str, unique_token: str = "") -> str:
    """Fill a DreamBench template; an empty unique token leaves no double space behind."""
    return " ".join(template.format(unique_token, class_token).split())


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse ``prompts_and_classes.txt``: (subject -> class, object templates, live templates).

    Sections are found by their headings ("Classes", "Object Prompts", "Live Subject Prompts"),
    so blank lines and the ``prompt_list = [`` wrappers do not matter.
    """
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {_OBJECT_HEADER: [], _LIVE_HEADER: []}
    section: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        low = line.lower()
        if low == "classes":
            section = "classes"
            continue
        if low in lists:
            section = low
            continue
        if low == "prompts" or not line:
            continue
        if section == "classes":
            m = _CLASS_ROW.match(line)
            if m is None or m.group("name") == "subject_name":  # the csv header row
                continue
            classes[m.group("name")] = m.group("cls")
        elif section in lists:
            m = _PROMPT_LINE.match(line)
            if m is not None:
                lists[section].append(_decode_template(m.group("lit")))
    if not classes:
        raise MusarError(f"{PROMPTS_FILE}: no 'subject_name,class' table found under 'Classes'")
    for header, templates in lists.items():
        if not templates:
            raise MusarError(f"{PROMPTS_FILE}: no prompts found under {header.title()!r}")
    return classes, lists[_OBJECT_HEADER], lists[_LIVE_HEADER]


def _decode_template(literal: str) -> str:
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError) as e:
        raise MusarError(f"{PROMPTS_FILE}: cannot read prompt {literal}: {e}") from None
    if "{1}" not in value:
        raise MusarError(f"{PROMPTS_FILE}: prompt {literal} has no {{1}} (class token) placeholder")
    return str(value)


def find_dreambench_root(root: str | Path) -> Path:
    """The folder holding ``prompts_and_classes.txt`` and the subject folders."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MusarError(f"DreamBench folder not found: {root}")
    if not root.is_dir():
        raise MusarError(f"DreamBench path is not a folder: {root}")
    for candidate in (root, root / "dataset"):
        if (candidate / PROMPTS_FILE).is_file():
            return candidate
    raise MusarError(
        f"not a DreamBench folder: {root} (expected {PROMPTS_FILE} there or in {root / 'dataset'}; "
        "clone the dataset/ folder of github.com/google/dreambooth)"
    )


def _list_images(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))


def load_dreambench(root: str | Path, live_classes: Iterable[str] = LIVE_CLASSES) -> DreamBench:
    """Read a DreamBench copy. Subjects come in the order of the classes table.

    Every subject of the table must have a folder with at least one image, so a partial copy
    fails here rather than silently shrinking the benchmark.
    """
    base = find_dreambench_root(root)
    try:
        text = (base / PROMPTS_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MusarError(f"cannot read {base / PROMPTS_FILE}: {e}") from None
    classes, object_prompts, live_prompts = parse_prompts_and_classes(text)
    live = frozenset(c.lower() for c in live_classes)
    subjects = []
    for name, class_name in classes.items():
        folder = base / name
        if not folder.is_dir():
            raise MusarError(
                f"DreamBench subject {name!r} is listed in {PROMPTS_FILE} but {folder} is missing"
            )
        images = _list_images(folder)
        if not images:
            raise MusarError(f"DreamBench subject folder has no images: {folder}")
        subjects.append(DreamBenchSubject(name, class_name, images, class_name.lower() in live))
    return DreamBench(base, tuple(subjects), tuple(object_prompts), tuple(live_prompts))
