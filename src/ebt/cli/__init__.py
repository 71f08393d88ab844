"""The `ebt` command line: one module per verb; the only place that sees argparse."""
