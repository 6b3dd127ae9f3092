"""mkdocs hooks (``hooks:`` in mkdocs.yml): add the pages ``docs/gen_pages.py`` generates
from the code and from ``docs/results/``, so every build renders them afresh and nothing
generated is written into docs/."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gen_pages  # noqa: E402


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for rel, text in gen_pages.pages().items():
        existing = files.get_file_from_path(rel)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, rel, content=text))
    return files
