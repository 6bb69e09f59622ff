"""Per-call cost of a schedule expression before issue 19 (commit 4f019fe) and now, in one process: old and new
interleaved, the best of 7 repeats of 100k calls each, for the Expression alone and for ExpressionFactor (what
LambdaLR calls). Run from the repository root: ``python bench/expression_cost.py``.
"""

import importlib.util
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

BEFORE = "4f019fe"
old_source = subprocess.run(
    ["git", "show", f"{BEFORE}:runner/expr.py"], capture_output=True, text=True, check=True
).stdout
old_path = Path(tempfile.mkdtemp()) / "old_expr.py"
old_path.write_text(old_source)
spec = importlib.util.spec_from_file_location("old_expr", old_path)
old_expr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old_expr)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import expr as new_expr
from runner.schedules import ExpressionFactor


class OldFactor:  # runner/schedules.py ExpressionFactor at 4f019fe, verbatim apart from the name
    def __init__(self, expression, steps_per_epoch=1, stepped_per_batch=False):
        self.expression = expression
        self.steps_per_epoch = steps_per_epoch
        self.stepped_per_batch = stepped_per_batch
        self._compiled()

    def _compiled(self):
        return old_expr.compile_expression(self.expression, ("epoch", "step"), "scheduler.lr_lambda")

    def __call__(self, count):
        if self.stepped_per_batch:
            return self._compiled()(epoch=count // self.steps_per_epoch, step=count)
        return self._compiled()(epoch=count, step=count * self.steps_per_epoch)


CASES = [
    ("0.5 ** (epoch // 3)", "0.5 ** (epoch // 3)", {}),
    ("0.5 * (1 + cos(pi * epoch / 100))", "0.5 * (1 + cos(pi * epoch / 100))", {}),
    (
        "min(1, step / 500) * 0.5 * (1 + cos(pi * step / 10000))",
        "lambda step: min(1, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))",
        {"warmup": 500},
    ),
    (
        "((1 - cos(epoch * pi / 300)) / 2) * (0.01 - 1) + 1",
        "lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1",
        {"lrf": 0.01},
    ),
]
N, R = 100_000, 7
print(
    f"{'expression (before | after)':<90} {'expr before':>11} {'expr after':>10} "
    f"{'factor before':>13} {'factor after':>12}  (us per call)"
)
for old_src, new_src, constants in CASES:
    per_batch = "step" in old_src
    oe = old_expr.compile_expression(old_src, ("epoch", "step"), "x")
    ne = new_expr.compile_expression(old_src, ("epoch", "step"), "x")
    of = OldFactor(old_src, 100, per_batch)
    nf = ExpressionFactor(new_src, 100, per_batch, constants, 100 if per_batch else 300)
    assert abs(of(1700) - nf(1700)) < 1e-12, (of(1700), nf(1700))
    best = {k: float("inf") for k in ("oe", "ne", "of", "nf")}
    for _ in range(R):
        for key, fn in (
            ("oe", lambda oe=oe: oe(epoch=17, step=1700)),
            ("ne", lambda ne=ne: ne(epoch=17, step=1700)),
            ("of", lambda of=of: of(1700)),
            ("nf", lambda nf=nf: nf(1700)),
        ):
            best[key] = min(best[key], timeit.timeit(fn, number=N) / N * 1e6)
    print(
        f"{old_src[:44] + ' | ' + new_src[:40]:<90} {best['oe']:>11.3f} {best['ne']:>10.3f} "
        f"{best['of']:>13.3f} {best['nf']:>12.3f}"
    )
