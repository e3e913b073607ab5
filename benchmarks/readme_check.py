"""Check that README.md's default-run table is what the current code prints: run `python iterate.py` (the
built-in task, seed 0) into a fresh folder and compare every cell of its table with the README's block (the code
block after "prints:" in "What the default run does and prints").

Samples depend on floating-point sums, which differ in the last bits between CPUs and BLAS builds, so cells are
compared with a tolerance per column (from the spread between machines of the same code: gold cells moved by
about 0.003, the proxy column and reward-model accuracy by more, since a Bradley-Terry reward is defined up to a
constant). Exit status 1 and a list of the cells that drifted when the README is stale.

    python benchmarks/readme_check.py            # about a minute and a half on 2 CPU cores
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {"gold_reward": 0.02, "gold_win_rate": 0.03, "proxy_reward": 0.6, "length": 0.1, "kl_to_ref": 0.1,
             "human_labels": 30, "accuracy": 0.06}


def parse(text):
    """{(row, column): value} of a printed table (and the 'reward model accuracy ... on held-out X pairs' lines)."""
    cells, columns = {}, None
    for line in text.splitlines():
        m = re.match(r"reward model accuracy against gold labels on held-out (\S+) pairs: ([\d.]+)", line)
        if m:
            cells[(m.group(1), "accuracy")] = float(m.group(2))
        elif line.startswith("policy "):
            columns = line.split()[1:]
        elif columns and re.fullmatch(r"\S+( +(-?[\d.]+|-)){%d}" % len(columns), line):  # rows follow the header
            name, *values = line.split()
            cells.update({(name, c): float(v) for c, v in zip(columns, values) if v != "-"})
        else:
            columns = None
    return cells


def readme_block():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### What the default run does and prints"):]
    return section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", help="run folder (default: a temporary one)")
    args = p.parse_args()
    out = args.output_dir or tempfile.mkdtemp(prefix="readme_check_")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "iterate.py"), "--output-dir", out],
                         capture_output=True, text=True, check=True)
    fresh, readme = parse(run.stdout), parse(readme_block())
    if not readme:
        sys.exit("README.md: no default-run table found")
    drift = [f"{row} {col}: README {readme[row, col]}, run {fresh.get((row, col))}" for row, col in readme
             if (row, col) not in fresh or abs(fresh[row, col] - readme[row, col]) > TOLERANCE[col]]
    drift += [f"{row} {col}: in the run, not in the README" for row, col in fresh if (row, col) not in readme]
    print("\n".join(drift) if drift else f"README.md's default-run table matches a fresh run ({len(readme)} cells)")
    sys.exit(1 if drift else 0)


if __name__ == "__main__":
    main()
