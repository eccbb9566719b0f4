#!/usr/bin/env python
"""Tabulates torch's float32 MI values for the released MI mask.

docs/algorithm.md "MI soft mask": the released code forms the MI of each
row's 2x2 table in float32 with torch's ops, and where every row separates
the concept from the empty prompt one ulp of that value decides the mask.
torch's float32 log (SLEEF) is not correctly rounded, so no other log
reproduces it; the values depend only on the counts, so they are tabulated
here, for K = 1..--max-k positives, with the released formula written in
torch (scapre_jax.reference.mi_from_counts), and shipped as package data
(scapre_jax/data/mi_released_float32.json). torch gives the same values on
its DEFAULT, AVX2 and AVX-512 kernels.

  python scripts/mi_table.py --max-k 32 --out scapre_jax/data/mi_released_float32.json
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import torch

from scapre_jax import io, reference


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-k", type=int, default=32)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  tables = {}
  for k in range(1, args.max_k + 1):
    tables[str(k)] = [[reference.mi_from_counts(n11, n10, k - n11, k - n10)
                       for n10 in range(k + 1)] for n11 in range(k + 1)]
  io.write_json(args.out, {
      "about": "float32 MI of a 2x2 table of K positives and K negatives, "
               "[n11][n10], as torch computes the released formula",
      "torch": torch.__version__,
      "command": "python " + shlex.join(["scripts/mi_table.py", *(argv or sys.argv[1:])]),
      "tables": tables}, overwrite=True)
  print(args.out)


if __name__ == "__main__":
  main()
