"""Atomic writes: the files and folders they create get the permissions of a plain open() or mkdir."""

from __future__ import annotations

import os
import stat

import pytest

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.atomic import atomic_write_text, current_umask, make_temp_dir
from groundthink.checkpoint import save_checkpoint
from groundthink.tokenizer import CharTokenizer


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_matches_os(umask):
    """current_umask reads the process umask, not a fixed default."""
    assert current_umask() == umask


def test_atomic_file_mode_follows_umask(tmp_path, umask):
    """An atomically written file has mode 0666 minus the umask, as open(path, "w") gives, not mkstemp's 0600."""
    atomic_write_text(tmp_path / "atomic.txt", "text\n")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("text\n")
    assert mode(tmp_path / "atomic.txt") == 0o666 & ~umask
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt")


def test_atomic_replace_keeps_umask_mode(tmp_path, umask):
    """Replacing an existing file also leaves mode 0666 minus the umask."""
    path = tmp_path / "config.json"
    atomic_write_text(path, "{}\n")
    atomic_write_text(path, "{\"a\": 1}\n")
    assert path.read_text() == "{\"a\": 1}\n"
    assert mode(path) == 0o666 & ~umask


def test_temp_dir_mode_follows_umask(tmp_path, umask):
    """make_temp_dir gives mode 0777 minus the umask, as mkdir does, not mkdtemp's 0700."""
    folder = make_temp_dir("scratch-", tmp_path)
    (tmp_path / "plain").mkdir()
    assert folder.parent == tmp_path
    assert folder.name.startswith("scratch-")
    assert mode(folder) == 0o777 & ~umask
    assert mode(folder) == mode(tmp_path / "plain")


def test_checkpoint_files_shareable(tmp_path, umask):
    """A saved checkpoint folder gets 0777 minus the umask, and its files and `latest` 0666 minus the umask."""
    tokenizer = CharTokenizer.train("to be, or not to be\n")
    config = GroundThinkConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, head_dim=8, expand_v=1.0,
                               layer_pattern="GS", window_size=8, memory_block=8, chunk_size=8)
    folder = save_checkpoint(tmp_path, model=GroundThinkLM(config), tokenizer=tokenizer,
                             run_config={"model": config.to_dict()}, step=1)
    assert mode(folder) == 0o777 & ~umask
    for path in folder.iterdir():
        assert mode(path) & 0o666 == 0o666 & ~umask, f"{path.name}: mode {oct(mode(path))}"
    assert mode(tmp_path / "checkpoints" / "latest") == 0o666 & ~umask
