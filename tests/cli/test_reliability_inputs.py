"""Reliability, inputs: argument checks (lite.validation) and user images (lite.model.images).

Each bad value must be a `UserError` (one CLI line, exit 2) that is a `TypeError` for a wrong type
or a `ValueError` for a value out of range, and that names the argument and the value.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from offload.errors import UserError
from lite.errors import ArgumentTypeError, InputError, OvisLiteError
from lite.model.images import MAX_INPUT_PIXELS, as_image, load_image, validate_image
from lite import validation as v
from tests.reliability_support import run_as_nobody, run_cli

GiB = 1 << 30


def _raises(kind: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, OvisLiteError) and isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# lite.validation
# ---------------------------------------------------------------------------------------------

def test_a_number_as_prompt_is_a_type_error_not_empty():
    msg = _raises(TypeError, v.check_text, "prompt", 123)
    assert "prompt" in msg and "123" in msg and "string" in msg and "empty" not in msg
    assert "empty" in _raises(ValueError, v.check_text, "prompt", "   ")
    assert v.check_text("prompt", "a cat") == "a cat"


@pytest.mark.parametrize("seed, kind", [("x", TypeError), (True, TypeError), (1.5, TypeError), (-1, ValueError),
                                        (2 ** 63, ValueError), (2 ** 70, ValueError)])
def test_bad_seeds_name_the_argument_and_the_range(seed, kind):
    msg = _raises(kind, v.check_seed, seed)
    assert msg.startswith("seed must be") and "2**63" in msg and repr(seed)[:10] in msg


def test_good_seeds():
    assert v.check_seed(None) is None and v.check_seed(0) == 0 and v.check_seed(2 ** 63 - 1) == 2 ** 63 - 1
    _raises(TypeError, v.check_seed, None, allow_none=False)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -0.5])
def test_guidance_scales_must_be_finite_and_non_negative(value):
    msg = _raises(ValueError, v.check_cfg, "txt_cfg", value)
    assert "txt_cfg" in msg and repr(value) in msg


def test_guidance_scale_types():
    assert "txt_cfg" in _raises(TypeError, v.check_cfg, "txt_cfg", "5")
    _raises(TypeError, v.check_cfg, "txt_cfg", True)
    assert v.check_cfg("txt_cfg", 5) == 5.0 and v.check_cfg("img_cfg", 0.0) == 0.0


def test_temperature_and_top_p():
    assert "temperature" in _raises(ValueError, v.check_temperature, math.nan)
    _raises(ValueError, v.check_temperature, 0.0)
    assert v.check_temperature(0.7) == 0.7
    for bad in (0.0, -0.1, 1.0000001, math.nan):
        assert "top_p" in _raises(ValueError, v.check_probability, "top_p", bad)
    assert v.check_probability("top_p", 1) == 1.0


@pytest.mark.parametrize("value, kind", [((0.5,), ValueError), ((0.5, 0.1), ValueError), ((0.0, 1.5), ValueError),
                                         ((0.1, math.nan), ValueError), ("0.1,1", TypeError), (0.5, TypeError),
                                         (("a", 1.0), TypeError)])
def test_cfg_interval_must_be_two_ordered_numbers_in_unit_range(value, kind):
    assert "cfg_interval" in _raises(kind, v.check_interval, "cfg_interval", value)


def test_cfg_interval_good():
    assert v.check_interval("cfg_interval", (0.1, 1)) == (0.1, 1.0)
    assert v.check_interval("cfg_interval", [0, 0]) == (0.0, 0.0)
    assert v.check_interval("cfg_interval", None) is None


def test_sides_steps_and_max_new_tokens():
    assert "width" in _raises(ValueError, v.check_side, "width", 8)
    assert "width" in _raises(TypeError, v.check_side, "width", 512.0)
    v.check_side("height", v.MAX_SIDE)
    assert "steps" in _raises(ValueError, v.check_steps, 0)
    msg = _raises(ValueError, v.check_max_new_tokens, 100000, 36464)
    assert "max_new_tokens" in msg and "36464" in msg and "100000" in msg
    assert v.check_max_new_tokens(1024, 36464) == 1024
    # the old names keep working, now with a type error where the type is wrong
    _raises(TypeError, v.check_positive_int, "steps", "3")
    _raises(ValueError, v.check_positive_int, "steps", 0)


@pytest.mark.parametrize("text, expected", [("6GB", 6 * GiB), ("6 GiB", 6 * GiB), ("512MB", 512 << 20),
                                            ("2.5G", int(2.5 * GiB)), ("100B", 100), ("1kib", 1024),
                                            ("1T", 1 << 40)])
def test_parse_bytes_units_are_binary(text, expected):
    assert v.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["200000000", "8", "", "GB", "-1GB", "1e9B", "0B", "six GB", "1iB", "nanGB"])
def test_parse_bytes_refuses_bare_and_malformed(text):
    msg = _raises(ValueError, v.parse_bytes, text, "--budget")
    assert "--budget" in msg


def test_parse_bytes_bare_number_says_how_to_fix():
    msg = _raises(ValueError, v.parse_bytes, "200000000", "--budget")
    assert "200000000GB" in msg and "200000000B" in msg


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height, with one tiny IDAT (what a bomb's header looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [60000, 12000])
def test_decompression_bombs_are_refused_from_the_header_without_pil_warnings(tmp_path, side):
    path = png_header_only(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = _raises(ValueError, load_image, path)
    assert not caught, [str(w.message) for w in caught]
    assert "bomb.png" in msg and f"{MAX_INPUT_PIXELS / 1e6:.0f} MP" in msg


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    msg = _raises(ValueError, load_image, fifo)  # would hang forever if it were opened for reading
    assert "FIFO" in msg and "pipe.png" in msg


def test_directory_missing_truncated_and_corrupt(tmp_path):
    assert "directory" in _raises(ValueError, load_image, tmp_path)
    assert "not found" in _raises(ValueError, load_image, tmp_path / "nope.png")
    Image.new("RGB", (256, 256), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert "cut.png" in _raises(ValueError, load_image, tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    assert "not a valid image" in _raises(ValueError, load_image, tmp_path / "junk.png")


def test_as_image_accepts_paths_and_pil_and_names_the_argument_otherwise(tmp_path):
    Image.new("RGBA", (40, 30), (1, 2, 3, 4)).save(tmp_path / "a.png")
    for value in (str(tmp_path / "a.png"), tmp_path / "a.png", Image.open(tmp_path / "a.png")):
        img = as_image(value, "image")
        assert img.mode == "RGB" and img.size == (40, 30)
    for bad in (None, 3, b"a.png", [tmp_path / "a.png"]):
        msg = _raises(TypeError, as_image, bad, "images[0]")
        assert msg.startswith("images[0] must be an image file path or a PIL.Image.Image")
    assert isinstance(_raises(TypeError, as_image, None, "image"), str)
    assert issubclass(ArgumentTypeError, InputError)
    _raises(TypeError, validate_image, "a.png", "image")


def test_unreadable_image_is_one_line_for_a_non_root_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user (root itself reads mode-000 files)")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"ovis-perm-{os.getpid()}"
    folder.mkdir(mode=0o755, exist_ok=True)
    try:
        secret = folder / "secret.png"
        Image.new("RGB", (8, 8)).save(secret)
        secret.chmod(0o000)
        assert run_as_nobody(lambda: load_image(secret)).startswith("image file is not readable (permission denied)")
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# ---------------------------------------------------------------------------------------------
# Through the CLI (a real process): the image is checked before any model loads.
# ---------------------------------------------------------------------------------------------

def test_cli_image_faults_are_one_line(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 60000, 60000)
    big = png_header_only(tmp_path / "big.png", 12000, 12000)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for image, fragment in ((bomb, "bomb.png"), (big, "big.png"), (fifo, "FIFO")):
        # No model exists at --model: the image must be refused first, and no PIL warning printed.
        res = run_cli("ask", "--model", tmp_path / "no-model", "--device", "cpu", "--quiet", image, "what is it?",
                      cwd=tmp_path, timeout=60)
        res.assert_one_line_error(fragment)
        assert "DecompressionBomb" not in res.stderr
