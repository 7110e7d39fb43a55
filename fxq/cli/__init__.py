"""The ``fxq`` command: quantize, evaluate, explain, dump-graph, search-bits, report.

Built on argparse: it is in the standard library, gives every subcommand its own ``--help`` and
exits with 2 on bad usage, and six subcommands need nothing more. See :mod:`fxq.cli.main`.
"""
