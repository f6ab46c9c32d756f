"""The ``qfilters`` console script: the CLI when its extras are installed, a one-line install hint otherwise.

The base ``pip install qfilters`` is the loading client (torch, huggingface_hub, safetensors, numpy). The command
line, calibration, evaluation and plots need ``qfilters[calibrate]``; ``serve``/``token``/``db`` need
``qfilters[service]``. A missing extra must not end in a traceback, so the CLI is imported (and run) from here.
"""

from __future__ import annotations

import sys

# top-level module -> the extra that brings it
EXTRA_OF = {
    "typer": "calibrate", "rich": "calibrate", "click": "calibrate", "transformers": "calibrate",
    "accelerate": "calibrate", "gguf": "calibrate", "matplotlib": "calibrate", "pydantic": "calibrate",
    "tokenizers": "calibrate",
    "fastapi": "service", "uvicorn": "service", "sqlalchemy": "service", "alembic": "service",
    "psycopg": "service", "jinja2": "service", "platformdirs": "service", "pydantic_settings": "service",
    "celery": "workers", "kombu": "workers",
    "datasets": "hf",
}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """The install hint for a module one of our extras brings, or ``None`` for any other missing module."""
    root = (error.name or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    if extra is None:
        return None
    return (f"qfilters: this needs the '{extra}' extra (module {root!r} is not installed): "
            f"pip install 'qfilters[{extra}]'  (or 'qfilters[all]' for everything)")


def main() -> None:
    try:
        from qfilters.cli import app

        app()
    except ModuleNotFoundError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
