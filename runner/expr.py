"""The safe expression language for schedules: parse once, check against a whitelist, compile to a function.

An expression such as ``"0.5 ** (epoch // 3)"`` is parsed with :mod:`ast` at start-up; every node must be
on the whitelist below, so attribute access, subscripts, strings, comprehensions, lambdas, walrus, f-strings
and any unknown name or call are refused before training starts. The checked tree is compiled into nested
Python closures (never ``eval``), and integer arithmetic is bounded so ``10 ** 10 ** 10`` fails fast instead
of hanging or exhausting memory.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

from runner.errors import ConfigError

Number = int | float
Compiled = Callable[[dict[str, Number]], Any]

MAX_EXPRESSION_LENGTH = 2000
MAX_DEPTH = 64
# Integers beyond this many bits are far outside what a learning-rate factor can be; refusing them keeps
# every operation cheap (a 1024-bit product or power costs microseconds).
MAX_INT_BITS = 1024

FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "cos": math.cos,
    "sin": math.sin,
    "tan": math.tan,
    "tanh": math.tanh,
    "acos": math.acos,
    "asin": math.asin,
    "atan": math.atan,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_SYMBOLS = "+ - * / // % **, comparisons (< <= > >= == !=), and/or/not, `x if cond else y`"

# What a refused node is called in the error message.
_REFUSED_KINDS = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
    ast.NamedExpr: "assignment (:=)",
    ast.JoinedStr: "f-strings",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Starred: "star-arguments",
    ast.Await: "await",
    ast.Yield: "yield",
}


class ExpressionError(ConfigError):
    """An expression that is refused at start-up or fails when evaluated."""


def allowed_summary(variables: Iterable[str]) -> str:
    """One sentence listing everything an expression may contain."""
    return (
        f"allowed: numbers, the names {', '.join(sorted(variables))}, constants {', '.join(CONSTANTS)}, "
        f"operators {_SYMBOLS}, and the functions {', '.join(FUNCTIONS)}"
    )


class _Compiler:
    def __init__(self, source: str, variables: frozenset[str], where: str):
        self.source = source
        self.variables = variables
        self.where = where

    def refuse(self, node: ast.AST, what: str) -> ExpressionError:
        segment = ast.get_source_segment(self.source, node) or type(node).__name__
        return ExpressionError(
            f"{self.where}: {what} `{segment}` is not allowed in {self.source!r}; "
            f"{allowed_summary(self.variables)}."
        )

    def compile(self, node: ast.AST, depth: int = 0) -> Compiled:
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"{self.where}: {self.source!r} is nested more than {MAX_DEPTH} levels deep; simplify it."
            )
        depth += 1
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op = _BINARY[type(node.op)]
            left, right = self.compile(node.left, depth), self.compile(node.right, depth)
            if op is operator.pow:
                return lambda env: _bounded_pow(left(env), right(env))
            return lambda env: _bounded(op(left(env), right(env)))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            op, operand = _UNARY[type(node.op)], self.compile(node.operand, depth)
            return lambda env: op(operand(env))
        if isinstance(node, ast.BoolOp):
            values = [self.compile(value, depth) for value in node.values]
            if isinstance(node.op, ast.And):
                return lambda env: _all_and(values, env)
            return lambda env: _any_or(values, env)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            return self._compare(node, depth)
        if isinstance(node, ast.IfExp):
            test, body, orelse = (self.compile(n, depth) for n in (node.test, node.body, node.orelse))
            return lambda env: body(env) if test(env) else orelse(env)
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        kind = _REFUSED_KINDS.get(type(node))
        if kind is None and isinstance(node, ast.BinOp | ast.UnaryOp | ast.Compare):
            kind = "the operator in"
        raise self.refuse(node, kind or f"{type(node).__name__}")

    def _constant(self, node: ast.Constant) -> Compiled:
        value = node.value
        if isinstance(value, bool | int | float) and not isinstance(value, complex):
            return lambda env: value
        kind = "strings" if isinstance(value, str | bytes) else f"the constant {value!r}"
        raise self.refuse(node, kind)

    def _name(self, node: ast.Name) -> Compiled:
        name = node.id
        if name in self.variables:
            return lambda env: env[name]
        if name in CONSTANTS:
            value = CONSTANTS[name]
            return lambda env: value
        raise self.refuse(node, "the unknown name")

    def _compare(self, node: ast.Compare, depth: int) -> Compiled:
        first = self.compile(node.left, depth)
        rest = [(_COMPARE[type(op)], self.compile(c, depth)) for op, c in zip(node.ops, node.comparators)]

        def compare(env: dict[str, Number]) -> bool:
            left = first(env)
            for op, right_fn in rest:
                right = right_fn(env)
                if not op(left, right):
                    return False
                left = right
            return True

        return compare

    def _call(self, node: ast.Call, depth: int) -> Compiled:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise self.refuse(node.func, "the call to")
        if node.keywords:
            raise self.refuse(node, "keyword arguments in")
        function = FUNCTIONS[node.func.id]
        args = [self.compile(arg, depth) for arg in node.args]
        if not args:
            raise self.refuse(node, "a call without arguments,")
        return lambda env: function(*(arg(env) for arg in args))


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise OverflowError(f"integer result exceeds {MAX_INT_BITS} bits")
    return value


def _bounded_pow(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise OverflowError(f"integer power exceeds {MAX_INT_BITS} bits")
    result = base**exponent
    if isinstance(result, complex):
        raise ValueError("a negative number raised to a fractional power has no real value")
    return _bounded(result)


def _all_and(values: list[Compiled], env: dict[str, Number]) -> Any:
    result: Any = True
    for value in values:
        result = value(env)
        if not result:
            return result
    return result


def _any_or(values: list[Compiled], env: dict[str, Number]) -> Any:
    result: Any = False
    for value in values:
        result = value(env)
        if result:
            return result
    return result


class Expression:
    """A checked expression; call it with the variables by keyword, e.g. ``expr(epoch=3)``."""

    def __init__(self, source: str, variables: Iterable[str] = ("epoch",), where: str = "expression"):
        if not isinstance(source, str):
            raise ExpressionError(f"{where}: expected an expression string such as '0.5 ** (epoch // 3)', got {source!r}.")
        self.source = source
        self.variables = frozenset(variables)
        self.where = where
        if len(source) > MAX_EXPRESSION_LENGTH:
            raise ExpressionError(f"{where}: the expression is longer than {MAX_EXPRESSION_LENGTH} characters.")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as err:
            raise ExpressionError(f"{where}: {source!r} is not a valid expression ({err.msg}).") from None
        except (RecursionError, MemoryError):
            raise ExpressionError(f"{where}: {source!r} is nested too deeply; simplify it.") from None
        compiler = _Compiler(source.strip(), self.variables, where)
        self._compiled = compiler.compile(tree.body)

    def __call__(self, **values: Number) -> Number:
        missing = self.variables - values.keys()
        if missing:
            raise TypeError(f"missing values for {sorted(missing)}")
        try:
            result = self._compiled(values)
        except (ArithmeticError, ValueError, TypeError) as err:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
            raise ExpressionError(f"{self.where}: {self.source!r} fails at {shown}: {err}.") from None
        if isinstance(result, bool):
            return int(result)
        return result

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


@functools.lru_cache(maxsize=256)
def compile_expression(source: str, variables: tuple[str, ...] = ("epoch",), where: str = "expression") -> Expression:
    """Parse and check ``source`` once; later calls with the same arguments reuse the result."""
    return Expression(source, variables, where)
