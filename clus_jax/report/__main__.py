"""``python -m clus_jax.report WORKDIR [WORKDIR ...] --out DIR``: PNG plots of one or more runs and one
``report.html`` that shows them, several runs overlaid in every curve; prints one JSON line (the page and the
number of PNGs)."""
from __future__ import annotations

from collections.abc import Sequence

from clus_jax.common import cli


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.ArgumentParser(prog="python -m clus_jax.report", description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run workdirs (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="directory for the PNGs and report.html")
    args = p.parse_args(argv)

    def run() -> dict:
        from clus_jax.report.write import write_report

        cli.check_out_dir("--out", args.out)
        files = write_report(args.workdirs, args.out)
        return {"report": files["report"][0], "png": len(files["png"])}

    cli.run_command(run, input_errors=(FileNotFoundError, ValueError), print_json=True)


if __name__ == "__main__":
    main()
