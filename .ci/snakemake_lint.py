"""`snakemake --lint`, failing on every lint but one.

The one lint let through is "Specify a conda environment or container for each rule.":
the rules run the package with the interpreter that runs Snakemake (`$FISHER_PYTHON`), so a
`conda:` or `container:` directive would claim an environment the rules do not use (and
neither can be tested here: no conda channel or container registry is reachable).
Every other lint fails the check.
"""

from __future__ import annotations

import re
import subprocess
import sys

ACCEPTED = {"Specify a conda environment or container for each rule."}


def main() -> int:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *sys.argv[1:]],
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    titles = re.findall(r"^    \* (.+):$", output, flags=re.MULTILINE)
    if result.returncode not in (0, 1) or (result.returncode == 1 and not titles):
        print(output)
        print(f"snakemake --lint could not lint the workflow (exit status {result.returncode})")
        return 1
    refused = [title for title in titles if title not in ACCEPTED]
    if refused:
        print(output)
        print(f"snakemake --lint: {len(refused)} lint(s) to fix: {sorted(set(refused))}")
        return 1
    accepted = f" (but for {len(titles)} x {sorted(ACCEPTED)[0]!r}, see {__file__})" if titles else ""
    print(f"snakemake --lint: clean{accepted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
