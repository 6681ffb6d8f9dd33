"""sdpo-report: report.md and plots of a finished or partial sdpo-train run."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from sdpo_jax import report

    parser = argparse.ArgumentParser(
        prog="sdpo-report",
        description=report.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=report.__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir (only config.json is required)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdpo_jax.cli.errors import user_errors
    from sdpo_jax.report import write_report

    with user_errors("sdpo-report"):
        written = write_report(args.output_dir)
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
