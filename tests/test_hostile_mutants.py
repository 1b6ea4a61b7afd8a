"""Seeded mutants of every hostile-file class, fed to the public readers (issue 22, item 2).

Each class starts from one valid file and derives ``PER_CLASS`` mutants from it with a
``random.Random`` seeded per class, so a failure names a reproducible mutant. Every mutant must
either be accepted or refused with a one-line :class:`MusarError`; anything else (another
exception type, a multi-line message) "escaped". The test prints ran / escaped per class
(``pytest -s``) and requires 0 escapes.
"""

from __future__ import annotations

import copy
import io
import json
import random
import struct
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from safetensors.numpy import save_file

from musar.errors import MusarError

PER_CLASS = 200
SEED = 22  # the issue number; change it to explore, the counts must stay 0 escaped

Mutator = Callable[[random.Random], bytes]


def flip(rng: random.Random, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """``data`` with one to eight edits inside ``[lo, hi)``: a byte changed, inserted or removed,
    a run duplicated, or the tail cut off."""
    buf = bytearray(data)
    hi = len(buf) if hi is None else hi
    for _ in range(rng.randint(1, 8)):
        if hi <= lo:
            break
        i = rng.randrange(lo, hi)
        op = rng.random()
        if op < 0.5:
            buf[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op < 0.65:
            buf.insert(i, rng.randrange(256))
        elif op < 0.8:
            del buf[i]
            hi -= 1
        elif op < 0.95:
            n = rng.randint(1, 64)
            buf[i:i] = buf[i : i + n] * rng.randint(1, 8)
        else:
            del buf[i:]
            break
    return bytes(buf)


# -- JPEG with EXIF -----------------------------------------------------------------------------


def _jpeg_with_exif() -> tuple[bytes, int, int]:
    """A 24x16 JPEG with an EXIF block (orientation, strings, a GPS IFD) and that block's span."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    exif[0x010F] = "MusarCam"
    exif[0x0110] = "Model 22"
    exif[0x8825] = {1: "N", 2: (45.0, 30.0, 15.0)}
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, format="JPEG", exif=exif.tobytes())
    raw = buf.getvalue()
    start = raw.index(b"Exif\x00\x00")
    (length,) = struct.unpack(">H", raw[start - 2 : start])
    return raw, start, start - 2 + length


JPEG, EXIF_START, EXIF_END = _jpeg_with_exif()


def mutate_jpeg(rng: random.Random) -> bytes:
    if rng.random() < 0.85:  # inside the EXIF block, length field kept: the TIFF parser sees it all
        body = flip(rng, JPEG[EXIF_START:EXIF_END], 6)
        length = struct.pack(">H", min(len(body) + 2, 0xFFFF))
        return JPEG[: EXIF_START - 2] + length + body[: 0xFFFD] + JPEG[EXIF_END:]
    return flip(rng, JPEG, 2)  # anywhere, the segment lengths included


# -- PNG with mutated chunks (iCCP included) ----------------------------------------------------


def _png_chunks() -> list[tuple[bytes, bytes]]:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "musar")
    info.add_itxt("Title", "hostile", lang="en", tkey="Titel")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    icc = icc[:24] + bytes(12) + icc[36:]  # the header's creation time: the same mutants every run
    buf = io.BytesIO()
    Image.new("RGBA", (12, 10), (10, 200, 30, 128)).save(buf, format="PNG", pnginfo=info, icc_profile=icc, dpi=(72, 72))
    raw, chunks, pos = buf.getvalue(), [], 8
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        chunks.append((raw[pos + 4 : pos + 8], raw[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


PNG_CHUNKS = _png_chunks()
assert any(kind == b"iCCP" for kind, _ in PNG_CHUNKS)


def _chunk(kind: bytes, payload: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(kind + payload) if crc_ok else zlib.crc32(kind + payload) ^ 1
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def mutate_png(rng: random.Random) -> bytes:
    chunks = list(PNG_CHUNKS)
    i = next(j for j, (k, _) in enumerate(chunks) if k == b"iCCP") if rng.random() < 0.4 else rng.randrange(len(chunks))
    kind, payload = chunks[i]
    if kind == b"iCCP" and rng.random() < 0.5:  # a well-compressed but damaged profile reaches lcms
        name, _, rest = payload.partition(b"\x00")
        payload = name + b"\x00\x00" + zlib.compress(flip(rng, zlib.decompress(rest[1:])))
    else:
        payload = flip(rng, payload)
    chunks[i] = (kind, payload)
    if rng.random() < 0.1:
        chunks.insert(rng.randrange(1, len(chunks)), chunks[i])  # a duplicated chunk
    body = b"".join(_chunk(k, p, crc_ok=rng.random() < 0.9 or k != kind) for k, p in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


# -- JSON: mutated bytes and depth bombs --------------------------------------------------------

JSON_BASE = json.dumps([{"id": "c1", "prompt": "a corgi on the beach", "subjects": [
    {"image": "dog.png", "phrase": "a corgi", "box": [0.1, 0.2, 0.5, 0.9]}], "meta": {"n": 3, "ok": True}}]).encode()


def mutate_json(rng: random.Random) -> bytes:
    op = rng.random()
    if op < 0.4:
        return flip(rng, JSON_BASE)
    if op < 0.7:  # a bomb spliced in at a random place: nesting, a huge number, or a long string
        at = rng.randrange(len(JSON_BASE))
        n = rng.choice([63, 64, 65, 1000, 5000, 50_000])
        bomb = rng.choice([b"[" * n + b"]" * n, b"{\"a\":" * n + b"1" + b"}" * n, b"[" * n, b"9" * n,
                           b'"' + b"\\u00e9" * n + b'"', b"1e" + b"9" * min(n, 400)])
        return JSON_BASE[:at] + bomb + JSON_BASE[at:]
    if op < 0.85:  # invalid UTF-8 or lone surrogates
        at = rng.randrange(len(JSON_BASE))
        return JSON_BASE[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\x00"]) + JSON_BASE[at:]
    n = rng.choice([10, 1000, 100_000])
    return rng.choice([b"NaN", b"-Infinity", b"[]", b"null", b"\"x\""]) * rng.randint(1, 3) + b"[" * n


# -- LoRA safetensors headers -------------------------------------------------------------------

_HOSTILE_VALUES: list[object] = [-1, 0, 4.5, 4.0, True, None, "F32", "x" * 300, [], {}, [[1]], 2**63, -(2**63),
                                 1e308, float("nan"), float("inf"), [2, 4], [0, 32], [32, 0], [2**62, 2**62]]


def _lora_file() -> bytes:
    path = Path(__import__("tempfile").mkdtemp()) / "l.safetensors"
    config = {"noise_rank": 4, "subject_rank": 8, "noise_alpha": None, "subject_alpha": 8.0,
              "targets": ["proj"], "mode": "dual", "dropout": 0.0}
    save_file({"proj.lora_A.noise.weight": np.zeros((4, 4), np.float32),
               "proj.lora_B.noise.weight": np.zeros((4, 4), np.float16)}, str(path),
              metadata={"format": "musar-branch-lora", "format_version": "1", "lora_config": json.dumps(config)})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    # safetensors writes its metadata in hash-map order; sorted, every run mutates the same bytes
    text = json.dumps(json.loads(raw[8 : 8 + length]), sort_keys=True).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


LORA = _lora_file()


def _walk(node: object, rng: random.Random) -> object:
    """A random container inside a parsed header, to replace one of its values."""
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        child = rng.choice(list(node.values()) if isinstance(node, dict) else node)
        if not isinstance(child, (dict, list)) or not child:
            break
        node = child
    return node


def mutate_lora(rng: random.Random) -> bytes:
    (length,) = struct.unpack("<Q", LORA[:8])
    header, data = json.loads(LORA[8 : 8 + length]), LORA[8 + length :]
    op = rng.random()
    if op < 0.55:  # one value of the header (or of the lora_config inside it) made hostile
        config = json.loads(header["__metadata__"]["lora_config"])
        target = config if rng.random() < 0.4 else header
        node = _walk(target, rng)
        value = copy.deepcopy(rng.choice(_HOSTILE_VALUES))  # later edits must not change the pool
        if isinstance(node, dict) and node:
            node[rng.choice(list(node))] = value
        elif isinstance(node, list) and node:
            node[rng.randrange(len(node))] = value
        if target is config:
            header["__metadata__"]["lora_config"] = json.dumps(config)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data
    if op < 0.85:  # bytes of the header JSON, the length prefix kept in step
        text = flip(rng, LORA[8 : 8 + length])
        return struct.pack("<Q", len(text)) + text + data
    if op < 0.95:  # the length prefix itself
        fake = rng.choice([0, 1, length - 1, length + 1, len(LORA), 2**63, 2**64 - 1])
        return struct.pack("<Q", fake) + LORA[8:]
    return flip(rng, LORA)


# -- the test ---------------------------------------------------------------------------------


def _readers(tmp: Path) -> dict[str, tuple[Mutator, str, Callable[[Path], object]]]:
    from musar.lora.io import read_lora_config
    from musar.utils.images import load_reference, open_image
    from musar.utils.safe_load import read_json
    from musar.utils.validation import check_lora_file

    def image(path: Path) -> object:
        open_image(path)
        return load_reference(path, 32)

    def lora(path: Path) -> object:
        check_lora_file(path)
        return read_lora_config(path)

    return {
        "jpeg-exif": (mutate_jpeg, "x.jpg", image),
        "png-chunks": (mutate_png, "x.png", image),
        "json": (mutate_json, "x.json", read_json),
        "lora-header": (mutate_lora, "x.safetensors", lora),
    }


def test_no_mutant_escapes_as_anything_but_one_musar_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    escaped: list[str] = []
    counts: dict[str, tuple[int, int, int]] = {}
    for offset, (name, (mutate, filename, read)) in enumerate(_readers(tmp_path).items()):
        rng = random.Random(SEED * 1000 + offset)
        path = tmp_path / filename
        ok = refused = bad = 0
        for i in range(PER_CLASS):
            path.write_bytes(mutate(rng))
            try:
                read(path)
                ok += 1
            except MusarError as e:
                if "\n" in str(e):
                    bad += 1
                    escaped.append(f"{name} #{i}: multi-line MusarError {str(e)[:200]!r}")
                else:
                    refused += 1
            except Exception as e:  # the point of the test: any other type is an escape
                bad += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                escaped.append(f"{name} #{i}: {type(e).__name__}: {str(e)[:150]} at {where.filename}:{where.lineno}")
        counts[name] = (ok + refused + bad, bad, ok)
    with capsys.disabled():
        for name, (ran, bad, ok) in counts.items():
            print(f"\nmutants {name}: ran {ran}, escaped {bad} (accepted {ok}, refused {ran - ok - bad})", end="")
        print()
    assert not escaped, "\n".join(escaped[:20])
    assert all(ran == PER_CLASS for ran, _, _ in counts.values())
