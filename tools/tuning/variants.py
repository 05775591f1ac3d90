"""Generate the benchmark variants the tuning job files name (/tmp/<NAME>), in parallel.

    PYTHONPATH=. python tools/tuning/variants.py G H      # then sweep.py with a jobs file

Variants are the standard difficulty of generator v2 as it was on 2026-11-22 before the
recalibration (2-3 objects, 85/12/3 % single/2/3 edits, relational 0.2, 5 distractors; that
difficulty is now named ``medium``) with the changes listed here.
"""

import dataclasses
import sys
import time
from multiprocessing import Process

from csmcir.data import synthetic as S

R = dataclasses.replace
OLD = S.DIFFICULTIES["medium"]
EASIER = dict(min_objects=1, max_objects=2, n_mods_probs=(0.9, 0.1, 0.0), p_relational=0.1)
VARIANTS = {
    "X": R(OLD, n_train_negatives=3),
    "Z": R(OLD, n_train=48000),
    "A": R(OLD, name="a", min_objects=2, max_objects=2, n_mods_probs=(0.9, 0.1, 0.0), p_relational=0.1),
    "B": R(OLD, name="b", min_objects=1, max_objects=3, n_mods_probs=(1.0, 0.0, 0.0), p_relational=0.1),
    "C": R(OLD, name="c", min_objects=2, max_objects=3, n_mods_probs=(1.0, 0.0, 0.0), p_relational=0.1),
    "D": R(OLD, name="d", **EASIER),
    "E": R(OLD, name="e", **{**EASIER, "n_mods_probs": (1.0, 0.0, 0.0)}),
    # G is the new standard but for its 2 % of three-edit compositions
    "G": R(OLD, name="g", **EASIER, n_distractors=4, n_train=13000),
    "H": R(OLD, name="h", **EASIER, n_distractors=5, n_train=13000),
    # S is today's standard difficulty itself (sweep s5)
    "S": S.DIFFICULTIES["standard"],
}


def _generate(name: str, workers: int) -> None:
    t = time.time()
    S.generate(f"/tmp/{name}", seed=0, difficulty=VARIANTS[name], workers=workers, progress=False)
    print("generated", name, f"{time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(VARIANTS)
    procs = [Process(target=_generate, args=(n, 4)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(p.exitcode for p in procs))
