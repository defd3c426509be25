"""The ``granite-docling`` command-line tools, one module per command with its argparse code (cli.py dispatches):
``sample_data`` (with ``synth_pages``, ``synth_text``), ``prepare`` (with ``pages``, which ``predict`` shares),
``validate``, ``predict`` and ``export/``. The tools use the pipeline (``data/``, ``evaluation/``, ``model``);
the pipeline never imports a tool."""
