"""The ``granite-docling`` console script: data and inference tools beside ``train.py`` / ``evaluate.py``.

    granite-docling sample-data OUT [--pages N] [--formulas N] [--seed S] [--qa-turns N] [--overwrite]
    granite-docling prepare INPUT... --out OUT [--unit page|document] [--scale 2.0] [--overwrite]
    granite-docling validate PATH... [--json] [--max-length N]
    granite-docling predict CHECKPOINT INPUT... --out DIR

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). Modules are imported only when their command runs,
so ``granite-docling --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS = {
    "sample-data": ("granite_docling.data.synth", "write realistic synthetic data in the Docling folder format"),
    "prepare": ("granite_docling.data.prepare", "turn PDFs / page images + DoclingDocument JSON into a dataset"),
    "validate": ("granite_docling.data.validate", "check every sample of one or more datasets"),
    "predict": ("granite_docling.evaluation.predict", "convert PDFs / page images to DocTags, Markdown and HTML"),
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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
