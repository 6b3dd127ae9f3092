"""A tokenizer trained here, saved as a standard Hugging Face tokenizer folder.

``save_tokenizer_folder`` wraps a ``tokenizers.Tokenizer`` in ``PreTrainedTokenizerFast``
and writes it with ``save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json`` and
the special tokens), so ``AutoTokenizer.from_pretrained(folder)`` loads it anywhere, offline.
The folder appears whole or not at all: a concurrent run never reads half of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def save_tokenizer_folder(tokenizer: Any, folder: str | Path, **special_tokens: str) -> Path:
    """Save ``tokenizer`` (a ``tokenizers.Tokenizer``) with its special tokens
    (``pad_token="[PAD]"``, …) as a tokenizer folder; an existing folder is kept."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    fast.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)  # atomic rename of the whole folder
    except OSError:  # another process saved it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokenizer_folder(folder: str | Path) -> Any:
    """The tokenizer of a folder ``save_tokenizer_folder`` (or ``save_pretrained``) wrote."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
