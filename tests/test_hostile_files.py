"""Hostile files are parsed defensively, before anything loads (issue 22, item 2).

Each CLI row builds one hostile input in its own folder and runs the command in-process: exit 2,
exactly one stderr line containing the row's text, no traceback, nothing created or changed. The
library rows feed the same kind of file to the public reader and expect one MusarError line (or,
for a damaged EXIF block or ICC profile, an image used as is).
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from musar.cli import main
from musar.errors import MusarError

PROMPT = "a corgi on the beach"
LORA_KEY = "proj.lora_A.noise.weight"


def safetensors_bytes(entries: dict[str, dict], data: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file with exactly this header (nothing checked: the point is to lie)."""
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def lora_bytes(config: object = None, dtype: object = "F32", shape: object = (2, 4), offsets: object = None,
               data: bytes = bytes(32)) -> bytes:
    """A MUSAR LoRA file of one tensor; each argument can be made hostile on its own."""
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
             "data_offsets": [0, len(data)] if offsets is None else offsets}
    lora_config = config if isinstance(config, str) else json.dumps(config or {})
    return safetensors_bytes({LORA_KEY: entry}, data, {"format": "musar-branch-lora", "lora_config": lora_config})


def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """A valid 8x8 PNG with one extra chunk (CRC correct) inserted after IHDR."""
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    raw = buf.getvalue()
    end_of_ihdr = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return raw[:end_of_ihdr] + chunk + raw[end_of_ihdr:]


def jpeg_with_exif(exif: bytes) -> bytes:
    """A valid JPEG whose APP1 block is ``Exif\\0\\0`` + ``exif`` (any bytes at all)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buf, format="JPEG")
    raw = buf.getvalue()
    app1 = b"Exif\x00\x00" + exif
    return raw[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + raw[2:]


def tiff_orientation(value: int, count: int = 1, kind: int = 3) -> bytes:
    """A little-endian TIFF IFD with one Orientation entry (``kind`` 3 = SHORT)."""
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, kind, count, value) + b"\0" * 4


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() and not path.is_symlink() else f"{path.lstat().st_size} {path.lstat().st_mtime_ns}"
    return out


@pytest.fixture
def no_hang() -> Iterator[None]:
    """A FIFO opened for reading blocks forever; fail the test instead of hanging the suite."""
    def hung(*_: object) -> None:
        raise AssertionError("blocked: something opened a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _dog(w: Path) -> str:
    Image.new("RGB", (40, 30), (200, 30, 30)).save(w / "dog.png")
    return str(w / "dog.png")


def _gen(w: Path, subject: str | None = None, *extra: str) -> list[str]:
    return ["generate", "--prompt", PROMPT, "--subject", subject or _dog(w), "a corgi", "--preset", "tiny",
            "--out", str(w / "out" / "o.png"), *extra]


def _file(w: Path, name: str, content: bytes) -> str:
    (w / name).write_bytes(content)
    return str(w / name)


def _lora(w: Path, **kwargs: object) -> list[str]:
    return _gen(w, None, "--lora", _file(w, "l.safetensors", lora_bytes(**kwargs)))  # type: ignore[arg-type]


def _gguf(w: Path, after_version: bytes) -> list[str]:
    """``--quantize gguf:FILE`` of a GGUF v3 file whose header after the version is these bytes."""
    return _gen(w, None, "--quantize", "gguf:" + _file(w, "t.gguf", b"GGUF" + struct.pack("<I", 3) + after_version))


def _kv_head(key: bytes, kind: int) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", kind)


def _fifo(w: Path) -> str:
    os.mkfifo(w / "pipe.png")
    return str(w / "pipe.png")


def _train(w: Path, text: bytes, *sets: str) -> list[str]:
    args = ["train", "--config", _file(w, "c.yaml", text)]
    for s in sets:
        args += ["--set", s]
    return args


def _cases(w: Path, content: bytes) -> list[str]:
    return ["eval", "--protocol", "custom", "--data", _file(w, "cases.json", content), "--preset", "tiny",
            "--skip-metrics", "--out", str(w / "run")]


def _summary(w: Path, content: bytes) -> list[str]:
    (w / "r").mkdir()
    (w / "r" / "summary.json").write_bytes(content)
    return ["eval", "compare", str(w / "r")]


def _preview(w: Path, *extra: str) -> list[str]:
    return ["data", "preview", "--source", str(w / "nope.parquet"), "--out", str(w / "prev"), *extra]


BOMB_YAML = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n".encode()
    for p, c in zip("abcdefgh", "bcdefghi")
)
TRAIN_OK = b"max_steps: 1\nmodel:\n  preset: tiny\n"
LONG = "x" * 300

# (row id, argv builder given the row's folder, text the one error line must contain)
CLI_ROWS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # -- paths the OS could never open --------------------------------------------------------------
    ("subject-fifo", lambda w: _gen(w, _fifo(w)), "not a regular file"),
    ("subject-nul", lambda w: _gen(w, str(w / "dog\x00.png")), "NUL byte"),
    ("subject-no-such-user", lambda w: _gen(w, "~nosuchuser_musar/dog.png"), "unknown home directory"),
    ("subject-long-name", lambda w: _gen(w, str(w / f"{LONG}.png")), "longer than 255 bytes"),
    ("lora-long-name", lambda w: _gen(w, None, "--lora", str(w / LONG / "l.safetensors")), "longer than 255 bytes"),
    ("lora-fifo", lambda w: _gen(w, None, "--lora", _fifo(w)), "not a regular file"),
    ("out-long-name", lambda w: [*_gen(w, None)[:-1], str(w / f"{LONG}.png")], "longer than 255 bytes"),
    ("out-nul", lambda w: [*_gen(w, None)[:-1], str(w / "o\x00.png")], "NUL byte"),
    ("config-no-such-user", lambda w: ["train", "--config", "~nosuchuser_musar/c.yaml"], "unknown home directory"),
    ("config-fifo", lambda w: ["train", "--config", _fifo(w)], "not a regular file"),
    # -- LoRA headers: checked before any tensor is read or allocated --------------------------------
    ("lora-unknown-dtype", lambda w: _lora(w, dtype="F33"), "unknown dtype"),
    ("lora-dtype-not-str", lambda w: _lora(w, dtype=7), "no dtype/shape/offsets"),
    ("lora-bool-shape", lambda w: _lora(w, shape=[True, 8]), "malformed shape"),
    ("lora-float-shape", lambda w: _lora(w, shape=[2.0, 4]), "malformed shape"),
    ("lora-negative-shape", lambda w: _lora(w, shape=[-2, -4]), "malformed shape"),
    ("lora-huge-shape", lambda w: _lora(w, shape=[2**40, 2**40]), "spans 32 bytes"),
    ("lora-offsets-past-end", lambda w: _lora(w, offsets=[0, 2**62]), "spans"),
    ("lora-offsets-reversed", lambda w: _lora(w, offsets=[32, 0]), "offsets"),
    ("lora-rank-float", lambda w: _lora(w, config={"noise_rank": 4.5}), "noise_rank must be an integer"),
    ("lora-rank-whole-float", lambda w: _lora(w, config={"noise_rank": 4.0}), "noise_rank must be an integer"),
    ("lora-rank-bool", lambda w: _lora(w, config={"subject_rank": True}), "subject_rank must be an integer"),
    ("lora-rank-zero", lambda w: _lora(w, config={"subject_rank": 0}), "subject_rank must be between 1 and 4096"),
    ("lora-rank-huge", lambda w: _lora(w, config={"subject_rank": 10**9}), "subject_rank must be between 1 and 4096"),
    ("lora-alpha-nan", lambda w: _lora(w, config='{"noise_alpha": NaN}'), "noise_alpha must be a finite number"),
    ("lora-alpha-inf", lambda w: _lora(w, config='{"noise_alpha": Infinity}'), "noise_alpha must be a finite number"),
    ("lora-alpha-huge", lambda w: _lora(w, config={"subject_alpha": 1e30}), "subject_alpha must be between"),
    ("lora-alpha-string", lambda w: _lora(w, config={"subject_alpha": "8"}), "subject_alpha must be a number"),
    ("lora-config-not-json", lambda w: _lora(w, config="{nope"), "is not valid JSON"),
    ("lora-config-depth-bomb", lambda w: _lora(w, config="[" * 5000 + "]" * 5000), "nests deeper"),
    ("lora-config-list", lambda w: _lora(w, config="[1]"), "not a mapping"),
    ("lora-header-depth-bomb", lambda w: _gen(w, None, "--lora", _file(
        w, "l.safetensors", struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000)), "nests deeper"),
    ("lora-header-not-utf8", lambda w: _gen(w, None, "--lora", _file(
        w, "l.safetensors", struct.pack("<Q", 4) + b'"\xff" ')), "not UTF-8"),
    # -- YAML configs and --set values ---------------------------------------------------------------
    ("config-not-utf8", lambda w: _train(w, b"output_dir: \xff\xfe\n"), "is not UTF-8 text"),
    ("config-alias-bomb", lambda w: _train(w, BOMB_YAML), "more than 1,000,000 values"),
    ("config-depth-bomb", lambda w: _train(w, b"a: " + b"[" * 200 + b"]" * 200 + b"\n"), "nests deeper"),
    ("config-nul", lambda w: _train(w, b"output_dir: a\x00b\n"), "NUL byte"),
    ("config-python-tag", lambda w: _train(w, b"output_dir: !!python/object/apply:os.system [id]\n"), "not valid YAML"),
    ("set-alias-bomb", lambda w: _train(w, TRAIN_OK, "optim.lr=" + BOMB_YAML.decode().replace("\n", ", ").join("{}")),
     "more than 1,000,000 values"),
    ("set-depth-bomb", lambda w: _train(w, TRAIN_OK, "optim.lr=" + "[" * 200 + "]" * 200), "nests deeper"),
    ("batch-size-huge", lambda w: _train(w, TRAIN_OK, "optim.batch_size=100000"), "optim.batch_size must be between"),
    ("num-workers-huge", lambda w: _train(w, TRAIN_OK, "data.num_workers=100000"), "data.num_workers must be between"),
    ("num-workers-negative", lambda w: _train(w, TRAIN_OK, "data.num_workers=-1"), "data.num_workers must be between"),
    ("lora-rank-config", lambda w: _train(w, TRAIN_OK, "lora.subject_rank=1000000"), "lora.subject_rank must be between"),
    ("lora-alpha-config", lambda w: _train(w, TRAIN_OK, "lora.noise_alpha=1e300"), "lora.noise_alpha must be between"),
    # -- JSON case files and summaries ---------------------------------------------------------------
    ("cases-not-utf8", lambda w: _cases(w, b'[{"prompt": "a \xff corgi"}]'), "is not UTF-8 text"),
    ("cases-depth-bomb", lambda w: _cases(w, b"[" * 100_000 + b"]" * 100_000), "nests deeper"),
    ("cases-huge-int", lambda w: _cases(w, b"[" + b"9" * 10_000 + b"]"), "not valid JSON"),
    ("summary-depth-bomb", lambda w: _summary(w, b'{"metrics": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nests deeper"),
    ("summary-not-utf8", lambda w: _summary(w, b'{"metrics": {}, "label": "\xc3"}'), "is not UTF-8 text"),
    # -- files judged against the model's config and tokenizer, before it loads ---------------------
    ("lora-keys-of-another-model", lambda w: _lora(w), "does not match the model (preset tiny"),
    ("gguf-tensor-count-huge", lambda w: _gguf(w, struct.pack("<QQ", 2**40, 0)), "declares 1,099,511,627,776 tensors"),
    ("gguf-kv-count-huge", lambda w: _gguf(w, struct.pack("<QQ", 0, 2**63)), "metadata keys, more than 65,536"),
    ("gguf-string-huge", lambda w: _gguf(w, struct.pack("<QQQ", 0, 1, 2**62)), "a string of 4,611,686,018,427,387,904"),
    ("gguf-array-huge", lambda w: _gguf(w, struct.pack("<QQ", 0, 1) + _kv_head(b"k", 9) + struct.pack("<IQ", 0, 2**40)),
     "an array of 1,099,511,627,776 items"),
    ("gguf-array-past-end", lambda w: _gguf(w, struct.pack("<QQ", 0, 1) + _kv_head(b"k", 9) + struct.pack("<IQ", 4, 10**6)),
     "past the end of the file"),
    ("gguf-value-type", lambda w: _gguf(w, struct.pack("<QQ", 0, 1) + _kv_head(b"k", 99)), "unknown value type 99"),
    ("gguf-dims", lambda w: _gguf(w, struct.pack("<QQ", 1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9)),
     "has 9 dimensions"),
    ("gguf-tensor-type", lambda w: _gguf(w, struct.pack("<QQ", 1, 0) + struct.pack("<Q", 1) + b"t"
                                         + struct.pack("<IQIQ", 1, 32, 999, 0)), "unknown GGML type 999"),
    ("gguf-data-past-end", lambda w: _gguf(w, struct.pack("<QQ", 1, 0) + struct.pack("<Q", 1) + b"t"
                                           + struct.pack("<IQIQ", 1, 2**40, 0, 0)), "is truncated"),
    ("case-phrase-inside-a-word", lambda w: _cases(w, json.dumps([{"prompt": "a catalog", "subjects": [
        {"image": _dog(w), "phrase": "cat"}]}]).encode()), "'cat' does not appear in the prompt 'a catalog' as whole words"),
    ("case-phrase-past-the-token-limit", lambda w: _cases(w, json.dumps([{"prompt": "dog " * 600 + "a corgi", "subjects": [
        {"image": _dog(w), "phrase": "a corgi"}]}]).encode()), "case custom000: subject phrase 'a corgi' falls beyond"),
    # -- resource bounds on the data CLI ------------------------------------------------------------
    ("preview-n-huge", lambda w: _preview(w, "--n", "1000000"), "argument --n: number of samples must be between 1 and 256"),
    ("preview-seed-negative", lambda w: _preview(w, "--seed", "-1"), "argument --seed: seed must be between"),
]


@pytest.mark.parametrize(("argv", "needle"), [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_refuses_hostile_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_hang: None, argv: Callable[[Path], list[str]], needle: str
) -> None:
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"musar {args[0]}: error:") and needle in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused command created or changed something"


# -- images: damaged EXIF and ICC mean "use the image as is", never a crash -------------------------

BAD_EXIF = [
    b"",  # an empty TIFF structure
    b"MM\x00*",  # header, no IFD offset
    b"II*\x00" + struct.pack("<I", 0xFFFFFFF0),  # IFD offset far past the end
    tiff_orientation(9),  # orientation out of range
    tiff_orientation(6, count=0xFFFFFFF),  # rotate, with an absurd count
    tiff_orientation(6, kind=99),  # unknown TIFF type
    b"II*\x00\x08\x00\x00\x00" + b"\xff\xff" + b"\x00" * 20,  # 65535 entries declared, 1 present
    os.urandom(64),
]


@pytest.mark.parametrize("exif", BAD_EXIF, ids=range(len(BAD_EXIF)))
def test_malformed_exif_is_used_without_rotation(tmp_path: Path, exif: bytes) -> None:
    from musar.utils.images import exif_transpose, load_reference, open_image

    path = Path(_file(tmp_path, "x.jpg", jpeg_with_exif(exif)))
    try:
        image = open_image(path)
    except MusarError:
        return  # refused in one line is fine; a crash is not
    assert exif_transpose(image).size in ((16, 8), (8, 16))
    assert load_reference(path, 32).size == (32, 32)


def test_exif_rotation_still_applies(tmp_path: Path) -> None:
    from musar.utils.images import load_reference, to_rgb

    path = Path(_file(tmp_path, "x.jpg", jpeg_with_exif(tiff_orientation(6))))
    assert to_rgb(Image.open(path)).size == (8, 16)  # 16x8 turned upright
    assert load_reference(path, 32).size == (32, 32)


@pytest.mark.parametrize("payload", [b"sRGB\x00\x00" + b"garbage", b"p\x00\x00" + __import__("zlib").compress(b"\x00" * 200),
                                     b"p\x00\x00" + __import__("zlib").compress(os.urandom(500))])
def test_unparseable_icc_profile_is_dropped(tmp_path: Path, payload: bytes) -> None:
    from musar.utils.images import load_reference, open_image

    path = Path(_file(tmp_path, "x.png", png_with_chunk(b"iCCP", payload)))
    image = open_image(path)
    assert "icc_profile" not in image.info or image.info["icc_profile"] == b""
    assert load_reference(path, 16).size == (16, 16)


def test_a_valid_icc_profile_is_kept(tmp_path: Path) -> None:
    from PIL import ImageCms

    from musar.utils.images import open_image

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", icc_profile=icc)
    assert open_image(tmp_path / "x.png").info.get("icc_profile") == icc


# -- paths: every check_* turns pathlib's ValueError/RuntimeError/OSError into one line -------------

@pytest.mark.parametrize("name", ["check_input_file", "check_input_dir", "check_output_dir", "check_image_output"])
@pytest.mark.parametrize(("path", "needle"), [
    ("a\x00b.png", "NUL byte"), ("~nosuchuser_musar/x.png", "unknown home directory"),
    ("x" * 300 + ".png", "longer than 255 bytes"), ("a/" * 2100 + "x.png", "longer than 4095 bytes"),
    ("bad\ud800.png", "not encodable"),
])
def test_path_checks_give_one_line(name: str, path: str, needle: str) -> None:
    from musar.utils import validation

    with pytest.raises(MusarError, match=needle) as err:
        getattr(validation, name)(path)
    assert "\n" not in str(err.value)
    with pytest.raises(MusarError, match=needle):
        validation.check_output_files([path])


def test_newline_in_a_path_stays_on_one_line(tmp_path: Path) -> None:
    from musar.utils.validation import check_input_file

    with pytest.raises(MusarError, match="not found") as err:
        check_input_file(tmp_path / "a\nb.png")
    assert "\n" not in str(err.value)


# -- LoRA tensors: values are checked before any is copied into the model --------------------------

@pytest.mark.parametrize(("value", "needle"), [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                               (1e9, "magnitude 1e\\+09")])
def test_lora_tensors_with_absurd_values_are_refused(tmp_path: Path, value: float, needle: str) -> None:
    import torch
    from torch import nn

    from musar.lora import BranchLoRAConfig, inject_branch_lora, lora_named_parameters
    from musar.lora.io import load_branch_lora, save_branch_lora

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    source = Tiny()
    inject_branch_lora(source, BranchLoRAConfig(noise_rank=2, subject_rank=2, targets=("proj",)))
    with torch.no_grad():
        dict(lora_named_parameters(source))["proj.lora_B.subject.weight"][0, 0] = value
    path = save_branch_lora(source, tmp_path / "l.safetensors")
    target = Tiny()
    with pytest.raises(MusarError, match=f"tensor proj.lora_B.subject.weight holds.*{needle}|{needle}") as err:
        load_branch_lora(target, path)
    assert "proj.lora_B.subject.weight" in str(err.value) and "\n" not in str(err.value)
    assert getattr(target, "lora_config", None) is None, "a refused file leaves the model as it was"


def test_a_good_lora_header_passes(tmp_path: Path) -> None:
    from musar.utils.validation import check_lora_file

    tensors = {LORA_KEY: np.zeros((2, 4), np.float32)}
    config = {"noise_rank": 4, "subject_rank": 128, "noise_alpha": None, "subject_alpha": 8.0, "dropout": 0.0,
              "targets": ["a.*"], "mode": "dual"}
    save_file(tensors, str(tmp_path / "l.safetensors"),
              metadata={"format": "musar-branch-lora", "lora_config": json.dumps(config)})
    assert check_lora_file(tmp_path / "l.safetensors") == tmp_path / "l.safetensors"
    (tmp_path / "raw.safetensors").write_bytes(lora_bytes())
    check_lora_file(tmp_path / "raw.safetensors")


def test_metrics_log_lines_are_read_defensively(tmp_path: Path) -> None:
    from musar.train.tracking import read_metrics

    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n' + b"[" * 10_000 + b"\n")
    with pytest.raises(MusarError, match=r"metrics log .* line 2 nests deeper"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\n{"step": 2}\n')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
