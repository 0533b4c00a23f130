"""Reliability, outputs: nothing the user owns is lost at the last step (lite.runtime.outputs).

Real filesystems where they matter: a 1 MiB tmpfs that fills up, a read-only mount, two
processes racing for the same name. Each is skipped with the reason where mounting is not allowed.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from lite.errors import ArgumentTypeError, InputError, OutputError
from lite.runtime.metadata import format_metadata, read_metadata
from lite.runtime.outputs import check_output_path, save_image
from tests.reliability_support import run_cli, tree_snapshot


def noise_image(side: int = 256, seed: int = 0) -> Image.Image:
    """An incompressible image (random bytes): its PNG is about side*side*3 bytes."""
    return Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs at tmp_path/mnt (root only; skipped with the reason elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ---------------------------------------------------------------------------------------------
# Before the run
# ---------------------------------------------------------------------------------------------

def test_dangling_symlink_counts_as_existing(tmp_path):
    (tmp_path / "out.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(OutputError, match="already exists .a symlink"):
        check_output_path(tmp_path / "out.png", overwrite=False)
    with pytest.raises(OutputError, match="already exists"):
        save_image(noise_image(16), tmp_path / "out.png")
    assert os.path.islink(tmp_path / "out.png") and not (tmp_path / "nowhere.png").exists()


def test_parent_is_a_file_and_name_too_long_and_not_a_path(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="is a file"):
        check_output_path(tmp_path / "file" / "sub" / "out.png", overwrite=False)
    with pytest.raises(OutputError, match="too long"):
        check_output_path(tmp_path / ("x" * 250 + ".png"), overwrite=False)
    with pytest.raises(OutputError, match="too long"):
        check_output_path(tmp_path / "/".join(["d" * 200] * 25) / "out.png", overwrite=False)
    with pytest.raises(ArgumentTypeError):
        check_output_path(3, overwrite=False)
    assert (tmp_path / "file").read_text() == "mine"
    # a folder that does not exist yet is fine (created at the write), and nothing is created by the check
    assert check_output_path(tmp_path / "new" / "deeper" / "out.png", overwrite=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_read_only_mount_is_refused_before_the_run(tmpfs):
    (tmpfs / "keep.png").write_bytes(b"user's file")
    proc = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
    with pytest.raises(OutputError, match="read-only file system"):
        check_output_path(tmpfs / "out.png", overwrite=False)
    with pytest.raises(OutputError, match="read-only file system"):
        check_output_path(tmpfs / "sub" / "out.png", overwrite=False)
    with pytest.raises(OutputError, match="read-only file system"):
        check_output_path(tmpfs / "keep.png", overwrite=True)
    assert (tmpfs / "keep.png").read_bytes() == b"user's file"


def test_immutable_folder_is_refused_before_the_run(tmp_path):
    folder = tmp_path / "frozen"
    folder.mkdir()
    proc = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i is not possible here: {proc.stderr.strip() or 'failed'}")
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(folder / "out.png", overwrite=False)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_cli_output_faults_are_one_line_before_any_model_loads(tmp_path):
    (tmp_path / "taken.png").write_bytes(b"precious")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "afile").write_text("x")
    before = tree_snapshot(tmp_path)
    # --model points nowhere: had the output not been checked first, the error would be about the model.
    for out, fragment in ((tmp_path / "taken.png", "already exists"),
                          (tmp_path / "dangling.png", "already exists (a symlink")):
        res = run_cli("generate", "--model", tmp_path / "no-model", "--device", "cpu", "--quiet",
                      "--width", "64", "--height", "64", "--steps", "1", "-o", out, "a cat", cwd=tmp_path, timeout=60)
        res.assert_one_line_error(fragment)
    assert tree_snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# The write
# ---------------------------------------------------------------------------------------------

def test_full_disk_is_one_line_leaves_nothing_and_keeps_the_users_file(tmpfs):
    (tmpfs / "keep.png").write_bytes(b"user's file")
    written = 0
    with pytest.raises(OutputError) as info:
        for i in range(20):  # ~200 kB each: the 1 MiB filesystem fills within a few
            save_image(noise_image(256, seed=i), tmpfs / f"out{i}.png")
            written += 1
    assert "no space left on device" in str(info.value) and "\n" not in str(info.value)
    assert 1 <= written < 20
    assert _leftovers(tmpfs) == []  # no temp file, no partial output
    assert not (tmpfs / f"out{written}.png").exists()
    for i in range(written):  # the earlier outputs are whole
        assert Image.open(tmpfs / f"out{i}.png").size == (256, 256)
    # overwrite of the user's file on a full disk: it stays as it was
    with pytest.raises(OutputError, match="no space left"):
        save_image(noise_image(256, seed=99), tmpfs / "keep.png", overwrite=True)
    assert (tmpfs / "keep.png").read_bytes() == b"user's file" and _leftovers(tmpfs) == []


def _race(path: str, seed: int, barrier, results) -> None:
    barrier.wait()
    try:
        save_image(noise_image(64, seed=seed), path, overwrite=False, metadata={"seed": seed})
        results.put(("won", seed))
    except OutputError as exc:
        results.put(("lost", str(exc)))


def test_two_concurrent_writers_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"race{round_}.png"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), seed, barrier, results)) for seed in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(results.get(timeout=10) for _ in procs)
        assert [o[0] for o in outcomes] == ["lost", "won"], outcomes
        assert "already exists" in outcomes[0][1]
        assert read_metadata(path)["seed"] == outcomes[1][1]  # the file is the winner's, whole
    assert _leftovers(tmp_path) == []


def test_threads_racing_exactly_one_wins(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    def attempt(seed: int) -> str:
        try:
            save_image(noise_image(32, seed=seed), tmp_path / "t.png", metadata={"seed": seed})
            return "won"
        except OutputError:
            return "lost"
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, range(4)))
    assert outcomes.count("won") == 1 and _leftovers(tmp_path) == []


def test_new_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        out = save_image(noise_image(16), tmp_path / "a.png")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o640
    out = save_image(noise_image(16), tmp_path / "b.png")
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~old


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "target.png"
    target.write_bytes(b"someone else's")
    (tmp_path / "link.png").symlink_to(target)
    save_image(noise_image(16), tmp_path / "link.png", overwrite=True)
    assert not os.path.islink(tmp_path / "link.png") and target.read_bytes() == b"someone else's"


# ---------------------------------------------------------------------------------------------
# Metadata in every format, and read back from untrusted files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp"])
def test_metadata_round_trips_in_every_output_format(tmp_path, suffix, capsys):
    meta = {"prompt": "a cat ✓", "seed": 7, "steps": 8, "cfg_interval": [0.1, 1.0]}
    out = save_image(noise_image(32), tmp_path / f"a{suffix}", metadata=meta)
    back = read_metadata(out)
    assert {k: back[k] for k in meta} == meta and back["software"].startswith("ovis-lite ")
    assert capsys.readouterr().err == ""  # no notice: every format carried it


def _png_with_text(path: Path, key: str, value: str, compressed: bool = False) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value, zip=compressed)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def _png_with_ztxt_bomb(path: Path) -> Path:
    """A zTXt chunk that inflates to 8 MiB (PIL's MAX_TEXT_CHUNK is 1 MiB)."""
    import struct

    Image.new("RGB", (4, 4)).save(path)
    data = path.read_bytes()
    body = b"ovis-lite\0\0" + zlib.compress(b"[" * (8 << 20), 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    at = data.index(b"IDAT") - 4
    path.write_bytes(data[:at] + chunk + data[at:])
    return path


def test_read_metadata_refuses_hostile_files_in_one_line(tmp_path):
    cases = {
        "bad json": (_png_with_text(tmp_path / "a.png", "ovis-lite", "{not json"), "not valid JSON"),
        "a list": (_png_with_text(tmp_path / "b.png", "ovis-lite", "[1, 2]"), "JSON list"),
        "nested bomb": (_png_with_text(tmp_path / "c.png", "ovis-lite", "[" * 100000 + "]" * 100000),
                        "nested"),
        "deep object": (_png_with_text(tmp_path / "d.png", "ovis-lite", '{"a":' * 40 + "1" + "}" * 40), "nested"),
        "ztxt bomb": (_png_with_ztxt_bomb(tmp_path / "e.png"), "too large"),
        "not an image": (tmp_path / "f.png", "not a valid image"),
    }
    (tmp_path / "f.png").write_bytes(b"GIF89a garbage")
    for name, (path, fragment) in cases.items():
        with pytest.raises(InputError) as info:
            read_metadata(path)
        assert fragment in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        read_metadata(fifo)


def test_format_metadata_escapes_terminal_control_sequences():
    meta = {"prompt": "cat\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\r\nnext", "seed": 1, "k\x1bey": ["\x00"]}
    text = format_metadata(meta)
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text)
    assert text.count("\n") == len(meta) - 1
    assert "prompt: cat\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil\\r\\nnext" in text.splitlines()
    assert "seed: 1" in text.splitlines() and "k\\x1bey: [\"\\u0000\"]" in text.splitlines()


def test_cli_info_on_hostile_files_is_one_line(tmp_path):
    bomb = _png_with_text(tmp_path / "bomb.png", "ovis-lite", "[" * 100000 + "]" * 100000)
    for path, fragment in ((bomb, "nested"),):
        run_cli("info", path, cwd=tmp_path, timeout=60).assert_one_line_error(fragment)


def test_cli_info_escapes_control_characters(tmp_path):
    out = save_image(noise_image(16), tmp_path / "evil.png", metadata={"prompt": "x\x1b]0;pwned\x07\x1b[2Jy"})
    res = run_cli("info", out, cwd=tmp_path, timeout=60)
    assert res.rc == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout, repr(res.stdout)
    assert not any(ord(c) < 0x20 and c != "\n" for c in res.stdout), repr(res.stdout)
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("prompt: ")]
    assert "pwned" in line and line.count("\\") == 3  # each control character shown as an escape


def test_without_hard_links_the_name_is_still_created_exclusively(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):  # vfat, some FUSE and SMB mounts
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    out = save_image(noise_image(16, seed=1), tmp_path / "a.png", metadata={"seed": 1})
    assert read_metadata(out)["seed"] == 1 and os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(OutputError, match="already exists"):
        from lite.runtime.outputs import write_bytes

        write_bytes(tmp_path / "a.png", b"other", overwrite=False)  # the race the pre-check cannot see
    assert read_metadata(out)["seed"] == 1 and _leftovers(tmp_path) == []


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_cli_full_disk_after_a_whole_run_is_one_line(tmpfs, tmp_path):
    """The last step of a real `generate` meets a full disk: one line, exit 2, nothing left, nothing lost."""
    from lite.model.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "ckpt", seed=0)
    (tmpfs / "keep.png").write_bytes(b"user's file")
    with open(tmpfs / "filler", "wb", buffering=0) as f:  # fill the 1 MiB filesystem to the last block
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    before = tree_snapshot(tmpfs)
    res = run_cli("generate", "--model", ckpt, "--device", "cpu", "--quiet", "--width", "64", "--height", "64",
                  "--steps", "1", "-o", tmpfs / "out.png", "a cat", cwd=tmp_path, timeout=180)
    res.assert_one_line_error("no space left on device", "out.png")
    assert tree_snapshot(tmpfs) == before  # no out.png, no temp file, keep.png and filler unchanged
