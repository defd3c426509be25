"""The ``granite-docling`` console script: data and inference tools beside ``train.py`` / ``evaluate.py``.

    granite-docling sample-data OUT [--pages N] [--formulas N] [--seed S] [--qa-turns N] [--overwrite]
    granite-docling prepare INPUT... --out OUT [--unit page|document] [--scale 2.0] [--overwrite]
    granite-docling validate PATH... [--json] [--max-length N]
    granite-docling predict CHECKPOINT INPUT... --out DIR
    granite-docling export mlx CHECKPOINT OUT [--quantize 4|8]
    granite-docling export gguf CHECKPOINT OUT [--type f16|q8_0]

Each subcommand lives in its own module under ``granite_docling/tools/``, which provides ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). Modules are imported only when their command runs,
so ``granite-docling --help`` stays fast. A user's mistake raised by a command (a missing file, a folder that is
no dataset, a damaged checkpoint) ends it with one ``error: ...`` line and exit code 2, as in train.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> (module, one-line help)
COMMANDS = {
    "sample-data": ("granite_docling.tools.sample_data", "write realistic synthetic data in the Docling folder format"),
    "prepare": ("granite_docling.tools.prepare", "turn PDFs / page images + DoclingDocument JSON into a dataset"),
    "validate": ("granite_docling.tools.validate", "check every sample of one or more datasets"),
    "predict": ("granite_docling.tools.predict", "convert PDFs / page images to DocTags, Markdown and HTML"),
    "export": (
        "granite_docling.tools.export",
        "a checkpoint in another runtime's format (MLX, GGUF), by its converter",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="granite-docling", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        sub.set_defaults(module_name=module_name)
    # Parse the command name first, then let its module declare its own arguments.
    known, _ = parser.parse_known_args(argv[:1] or ["--help"])
    module = importlib.import_module(known.module_name)
    command_parser = argparse.ArgumentParser(
        prog=f"granite-docling {known.command}", description=COMMANDS[known.command][1]
    )
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    # Progress from this package; other libraries' INFO notes (matplotlib's glyph substitutions) are noise here.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("granite_docling").setLevel(logging.INFO)
    try:
        return int(module.run(args) or 0)
    except Exception as error:
        from granite_docling.errors import EXIT_USER_ERROR, user_error_message  # not before it is needed: --help

        message = user_error_message(error)
        if message is None:  # a bug: its traceback is wanted
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
