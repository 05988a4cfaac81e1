"""Model folders are written atomically through a private temporary folder, yet come out with the modes
the umask gives any new folder and file, so that the group reads an export like every other file of a run."""
import os
import stat

import pytest
import torch

from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, save_pretrained


@pytest.fixture
def restore_umask():
    """The test sets the process umask; the one before is put back afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


@pytest.mark.parametrize("mask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                        (0o002, 0o775, 0o664)])
def test_saved_folder_and_files_follow_the_umask(tmp_path, restore_umask, mask, folder_mode, file_mode):
    os.umask(mask)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=64, mamba=MambaConfig(d_state=4)))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    os.chmod(tokenizer, 0o600)  # a private source file: the copy still gets the ordinary mode
    out = tmp_path / "m"
    for _ in range(2):  # written new, then replaced
        save_pretrained(model, out, extra_files={"tokenizer.json": tokenizer}, texts={"notes.yaml": "a: 1\n"})
        assert modes(out) == {"m": folder_mode, "config.json": file_mode, "model.safetensors": file_mode,
                              "tokenizer.json": file_mode, "notes.yaml": file_mode}
    assert (out / "notes.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "tokenizer.json"]  # no temporary folder left
