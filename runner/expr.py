"""The safe expression language for schedules: parse once, check against a whitelist, compile to a function.

An expression such as ``"0.5 ** (epoch // 3)"`` (or a pasted one-parameter lambda, ``"lambda epoch: 0.95 **
epoch"``) is parsed with :mod:`ast` at start-up; every node must be on the whitelist below, so attribute access
(other than ``math.``/``np.``/``numpy.``/``torch.`` in front of a whitelisted name), subscripts, strings,
comprehensions, nested lambdas, walrus, f-strings and any unknown name or call are refused before training
starts. The checked tree is compiled into nested Python closures (never ``eval``), with named constants folded
in, and integer arithmetic is bounded so ``10 ** 10 ** 10`` fails fast instead of hanging or exhausting memory.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from runner.errors import ConfigError

Number = int | float
Compiled = Callable[[dict[str, Number]], Any]

MAX_EXPRESSION_LENGTH = 2000
MAX_DEPTH = 64
# Integers beyond this many bits are far outside what a learning-rate factor can be; refusing them keeps
# every operation cheap (a 1024-bit product or power costs microseconds).
MAX_INT_BITS = 1024


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise OverflowError(f"integer result exceeds {MAX_INT_BITS} bits")
    return value


def _bounded_pow(base: Any, exponent: Any) -> Any:
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS
    ):
        raise OverflowError(f"integer power exceeds {MAX_INT_BITS} bits")
    result = base**exponent
    if isinstance(result, complex):  # a domain error, as math.sqrt(-1) is: ValueError, like math's
        raise ValueError("a negative number raised to a fractional power has no real value")  # noqa: TRY004
    return _bounded(result)


def _bounded_int(value: Any) -> int:
    return _bounded(int(value))


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "round": round,
    "float": float,
    "int": _bounded_int,
    "pow": _bounded_pow,
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
# How many arguments each function takes (fewest, most; None: no limit), checked at start-up.
_ARITY = {"min": (2, None), "max": (2, None), "round": (1, 2), "log": (1, 2), "pow": (2, 2)}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
# `math.cos`, `np.exp`, `torch.pi`: the spellings users paste, taken as the bare whitelisted name.
MODULE_PREFIXES = ("math", "np", "numpy", "torch")
# Names of the run's own length, given by the runner to the schedules it builds.
RUN_NAMES = ("epochs", "total_steps")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
# Left-associative operators of one precedence: a chain of them (`a + b - c + ...`) is one level of nesting.
_CHAINS = ({ast.Add, ast.Sub}, {ast.Mult, ast.Div, ast.FloorDiv, ast.Mod})
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
_OPERATOR_SYMBOLS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.UAdd: "+",
    ast.USub: "-",
    ast.Not: "not ",
    ast.Invert: "~",
}

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
        f"operators {_SYMBOLS}, the functions {', '.join(FUNCTIONS)} (also as math./np./numpy./torch.NAME), "
        f"and one `lambda x: ...` around it all"
    )


def check_constants(constants: Mapping[str, Any], reserved: Iterable[str], key: str) -> dict[str, Number]:
    """Return ``constants`` as plain numbers, refusing names that are not identifiers or that shadow a name.

    Raises:
        ExpressionError: naming ``key.NAME`` and what to change.
    """
    reserved = set(reserved)
    checked: dict[str, Number] = {}
    for name, value in constants.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ExpressionError(f"{key}: {name!r} is not a name an expression can use; use letters, digits and _.")
        if name in reserved or name in FUNCTIONS or name in CONSTANTS or name in MODULE_PREFIXES:
            raise ExpressionError(f"{key}.{name}: {name} is already a name of the expression language; rename it.")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ExpressionError(f"{key}.{name}={value!r}: a constant must be a number, e.g. {key}={{{name}: 500}}.")
        checked[name] = value
    return checked


def _constant(value: Any) -> Compiled:
    """A compiled value known at start-up; ``folded`` lets the compiler compute operations on it once."""

    def constant(env: dict[str, Number]) -> Any:
        return value

    constant.folded = (value,)  # type: ignore[attr-defined]
    return constant


def _folded(*compiled: Compiled) -> list[Any] | None:
    """The start-up values of ``compiled``, or None if any of them depends on the variables."""
    values = []
    for fn in compiled:
        folded = getattr(fn, "folded", None)
        if folded is None:
            return None
        values.append(folded[0])
    return values


def _fold(compiled: Compiled, *parts: Compiled) -> Compiled:
    """Compute ``compiled`` once if all its ``parts`` are constants and it succeeds; else keep it for run time,
    where a failure is reported with the epoch."""
    if _folded(*parts) is None:
        return compiled
    try:
        return _constant(compiled({}))
    except (ArithmeticError, ValueError, TypeError):
        return compiled


class _Compiler:
    def __init__(
        self,
        source: str,
        variables: frozenset[str],
        where: str,
        constants: Mapping[str, Number],
        aliases: Mapping[str, str],
        constants_key: str | None = None,
        trace: bool = False,
    ):
        self.source = source
        self.variables = variables
        self.where = where
        self.constants = constants
        self.aliases = aliases  # a pasted lambda's parameter -> the variable it stands for
        self.constants_key = constants_key
        self.trace = trace  # wrap every node so a failure at run time names the part that failed
        self._line_starts = [0]
        for line in source.splitlines(keepends=True):
            self._line_starts.append(self._line_starts[-1] + len(line))

    def names(self) -> list[str]:
        return sorted({*self.variables, *self.aliases, *self.constants})

    def column(self, lineno: int, col_offset: int) -> int:
        line = self.source.splitlines(keepends=True)[lineno - 1] if self.source else ""
        return self._line_starts[lineno - 1] + len(line.encode()[:col_offset].decode(errors="ignore")) + 1

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or type(node).__name__

    def refuse(self, node: ast.AST, what: str, detail: str = "", hint: str = "") -> ExpressionError:
        """One line: what is refused, the whole expression, how to fix it, what is allowed, and where it is."""
        where = detail or f"`{self.segment(node)}` starts at column {self.column(node.lineno, node.col_offset)}"
        return ExpressionError(
            f"{self.where}: {what} `{self.segment(node)}` is not allowed in {self.source!r}; "
            f"{hint}{allowed_summary(self.names())}; {where}."
        )

    def compile(self, node: ast.AST, depth: int = 0) -> Compiled:
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"{self.where}: {self.source!r} is nested more than {MAX_DEPTH} levels deep "
                f"(parentheses, calls, conditionals, powers); simplify it."
            )
        compiled = self._compile(node, depth + 1)
        if self.trace and getattr(compiled, "folded", None) is None:
            return self._traced(compiled, node)
        return compiled

    def _compile(self, node: ast.AST, depth: int) -> Compiled:
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._binary(node, depth)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            op, operand = _UNARY[type(node.op)], self.compile(node.operand, depth)
            return _fold(lambda env: op(operand(env)), operand)
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
        if isinstance(node, ast.BinOp | ast.UnaryOp | ast.Compare):
            raise self._refuse_operator(node)
        raise self.refuse(node, _REFUSED_KINDS.get(type(node), type(node).__name__))

    def _refuse_operator(self, node: ast.BinOp | ast.UnaryOp | ast.Compare) -> ExpressionError:
        """Name the refused operator itself and its column, found between its operands in the source."""
        if isinstance(node, ast.UnaryOp):
            start, stop, symbol = node, node.operand, _OPERATOR_SYMBOLS.get(type(node.op), "")
        elif isinstance(node, ast.BinOp):
            start, stop, symbol = node.left, node.right, ""
        else:
            index = next(i for i, op in enumerate(node.ops) if type(op) not in _COMPARE)
            start, stop, symbol = ([node.left, *node.comparators][index], node.comparators[index], "")
        begin = self.column(start.lineno, start.col_offset) - 1
        if start is not node:
            begin = self.column(start.end_lineno, start.end_col_offset) - 1
        end = self.column(stop.lineno, stop.col_offset) - 1
        between = self.source[begin:end]
        text = symbol.strip() or between.strip(" \t\n()") or between.strip()
        offset = begin + (between.find(text) if text in between else 0)
        return self.refuse(node, "the operator in", f"the operator `{text}` is at column {offset + 1}")

    def _constant(self, node: ast.Constant) -> Compiled:
        value = node.value
        if isinstance(value, bool | int | float):
            return _constant(value)
        kind = "strings" if isinstance(value, str | bytes) else f"the constant {value!r}"
        raise self.refuse(node, kind)

    def _name(self, node: ast.Name) -> Compiled:
        name = self.aliases.get(node.id, node.id)
        if name in self.variables:
            return lambda env: env[name]
        if name in self.constants:
            return _constant(self.constants[name])
        if name in CONSTANTS:
            return _constant(CONSTANTS[name])
        hint = ""
        if name in RUN_NAMES:
            hint = f"{name} is given only to a schedule the runner builds itself (not to a part of a composition); "
        elif name in FUNCTIONS:
            hint = f"{name} is a function: call it, {name}(...); "
        elif self.constants_key:
            example = f"{self.constants_key}={{{name}: 10}}"
            hint = f"if it is a number of yours, name it in {self.constants_key}, e.g. {example}; "
        raise self.refuse(node, "the unknown name", hint=hint)

    def _attribute(self, node: ast.Attribute) -> Compiled:
        """``math.pi`` -> ``pi``, ``np.exp`` (as a call) -> ``exp``: the module prefix of a whitelisted name."""
        if isinstance(node.value, ast.Name) and node.value.id in MODULE_PREFIXES and node.value.id not in self.names():
            if node.attr in CONSTANTS:
                return _constant(CONSTANTS[node.attr])
            raise self.refuse(node, f"{node.value.id}.{node.attr} is not on the whitelist:", hint="")
        raise self.refuse(node, "attribute access")

    def _binary(self, node: ast.BinOp, depth: int) -> Compiled:
        chain = next((ops for ops in _CHAINS if type(node.op) in ops), None)
        links: list[ast.BinOp] = [node]
        while chain and isinstance(links[-1].left, ast.BinOp) and type(links[-1].left.op) in chain:
            links.append(links[-1].left)
        if len(links) > 2:
            return self._chain(links[::-1], depth)
        op = _BINARY[type(node.op)]
        left, right = self.compile(node.left, depth), self.compile(node.right, depth)
        if op is operator.pow:
            return _fold(lambda env: _bounded_pow(left(env), right(env)), left, right)
        return _fold(lambda env: _bounded(op(left(env), right(env))), left, right)

    def _chain(self, links: list[ast.BinOp], depth: int) -> Compiled:
        """``a + b - c + ...`` evaluated left to right in a loop: one level of nesting however many terms."""
        first = self.compile(links[0].left, depth)
        steps = [(_BINARY[type(link.op)], self.compile(link.right, depth)) for link in links]
        trace = self.trace

        def chain(env: dict[str, Number]) -> Any:
            value = first(env)
            for index, (op, right) in enumerate(steps):
                operand = right(env)
                try:
                    value = _bounded(op(value, operand))
                except (ArithmeticError, ValueError, TypeError) as err:
                    if trace and not hasattr(err, "expression_node"):
                        err.expression_node, err.expression_operands = links[index], [value, operand]
                    raise
            return value

        return _fold(chain, first, *(right for _, right in steps))

    def _compare(self, node: ast.Compare, depth: int) -> Compiled:
        first = self.compile(node.left, depth)
        rest = [(_COMPARE[type(op)], self.compile(c, depth)) for op, c in zip(node.ops, node.comparators, strict=True)]

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
        func = node.func
        name = func.id if isinstance(func, ast.Name) and func.id not in self.names() else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in MODULE_PREFIXES:
            name = func.attr if func.value.id not in self.names() else None
        if name not in FUNCTIONS:
            raise self.refuse(func, "the call to")
        if node.keywords:
            raise self.refuse(node, "keyword arguments in")
        fewest, most = _ARITY.get(name, (1, 1))
        if not node.args:
            raise self.refuse(node, "a call without arguments,")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise self.refuse(next(arg for arg in node.args if isinstance(arg, ast.Starred)), "star-arguments")
        if len(node.args) < fewest or (most is not None and len(node.args) > most):
            count = (
                f"{fewest} to {most}" if most and most != fewest else (f"{fewest} or more" if most is None else fewest)
            )
            raise self.refuse(node, f"{name} takes {count} arguments:")
        function = FUNCTIONS[name]
        args = [self.compile(arg, depth) for arg in node.args]
        if len(args) == 1:
            (arg,) = args
            return _fold(lambda env: function(arg(env)), arg)
        if len(args) == 2:
            first, second = args
            return _fold(lambda env: function(first(env), second(env)), first, second)
        return _fold(lambda env: function(*[arg(env) for arg in args]), *args)

    def _traced(self, compiled: Compiled, node: ast.AST) -> Compiled:
        """``compiled``, tagging an error with the innermost node that raised it and that node's operands."""

        def traced(env: dict[str, Number]) -> Any:
            try:
                return compiled(env)
            except (ArithmeticError, ValueError, TypeError) as err:
                if not hasattr(err, "expression_node"):
                    err.expression_node = node
                    err.expression_operands = self._operands(node, env)
                raise

        return traced

    def _operands(self, node: ast.AST, env: dict[str, Number]) -> list[Any] | None:
        """The values a failed operation got; its operands themselves did not fail, so they evaluate again."""
        parts = {ast.BinOp: lambda n: [n.left, n.right], ast.UnaryOp: lambda n: [n.operand], ast.Call: lambda n: n.args}
        children = parts.get(type(node))
        if children is None:
            return None
        plain = _Compiler(self.source, self.variables, self.where, self.constants, self.aliases)
        try:
            return [plain.compile(child)(env) for child in children(node)]
        except (ArithmeticError, ValueError, TypeError):
            return None


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


def _reason(err: Exception, node: ast.AST | None) -> str:
    """What went wrong, said for a user: Python's raw errno tuples and 'math domain error' translated."""
    text = str(err)
    if isinstance(err, OverflowError) and "bits" not in text and "convert" not in text:
        return "the result is too large for a float"
    if text == "math domain error":
        name = _call_name(node)
        return f"the argument is outside the domain of {name}" if name else "a value is outside a function's domain"
    return text


def _call_name(node: ast.AST | None) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _render(node: ast.AST | None, operands: list[Any] | None) -> str:
    """The failed operation with its values, e.g. ``10.0 ** 400`` or ``log(0)``."""
    if node is None or operands is None:
        return ""
    if isinstance(node, ast.BinOp) and len(operands) == 2:
        return f"{operands[0]!r} {_OPERATOR_SYMBOLS[type(node.op)]} {operands[1]!r}"
    if isinstance(node, ast.UnaryOp) and len(operands) == 1:
        return f"{_OPERATOR_SYMBOLS[type(node.op)]}{operands[0]!r}"
    if isinstance(node, ast.Call):
        return f"{_call_name(node)}({', '.join(repr(value) for value in operands)})"
    return ""


class Expression:
    """A checked expression; call it with the variables by keyword, e.g. ``expr(epoch=3)``.

    Args:
        source: the expression, or a one-parameter lambda whose body is one (``"lambda epoch: 0.95 ** epoch"``).
        variables: the names given at every call.
        where: the config key, first in every error.
        constants: more names, fixed for the run (folded in at start-up).
        lambda_parameter: the variable a pasted lambda's parameter stands for (default: the first variable).
        constants_key: where the user defines constants, named when an unknown name is met.
    """

    def __init__(
        self,
        source: str,
        variables: Iterable[str] = ("epoch",),
        where: str = "expression",
        constants: Mapping[str, Number] | None = None,
        lambda_parameter: str | None = None,
        constants_key: str | None = None,
    ):
        if not isinstance(source, str):
            raise ExpressionError(
                f"{where}: expected an expression string such as '0.5 ** (epoch // 3)', got {source!r}."
            )
        variables = tuple(variables)
        self.source = source
        self.variables = frozenset(variables)
        self.where = where
        self.constants = dict(constants or {})
        if len(source) > MAX_EXPRESSION_LENGTH:
            raise ExpressionError(f"{where}: the expression is longer than {MAX_EXPRESSION_LENGTH} characters.")
        stripped = source.strip()
        try:
            tree = ast.parse(stripped, mode="eval")
        except SyntaxError as err:
            raise ExpressionError(
                f"{where}: {source!r} is not a valid expression ({err.msg}{_syntax_hint(stripped)})."
            ) from None
        except (RecursionError, MemoryError):
            raise ExpressionError(f"{where}: {source!r} is nested too deeply; simplify it.") from None
        body, aliases = tree.body, {}
        if isinstance(body, ast.Lambda) and _one_parameter(body.args):
            aliases = {body.args.args[0].arg: lambda_parameter or variables[0]}
            body = body.body
        elif isinstance(body, ast.Lambda):
            count = len(body.args.posonlyargs + body.args.args + body.args.kwonlyargs)
            raise ExpressionError(
                f"{where}: lambdas take one parameter here, as in 'lambda epoch: 0.95 ** epoch' (the epoch, or the "
                f"step with scheduler.interval=step), without defaults; {source!r} takes {count}: give other numbers "
                f"a name in {constants_key or 'the constants'} instead; {allowed_summary(variables)}."
            )
        self._body, self._aliases, self._constants_key = body, aliases, constants_key
        self._stripped = stripped
        self._compiled = self._compiler(trace=False).compile(body)

    def _compiler(self, trace: bool) -> _Compiler:
        return _Compiler(
            self._stripped, self.variables, self.where, self.constants, self._aliases, self._constants_key, trace
        )

    def __call__(self, **values: Number) -> Number:
        return self.evaluate(values)

    def evaluate(self, values: dict[str, Number]) -> Number:
        """The value for ``values`` (a dict of every variable), e.g. ``expr.evaluate({"epoch": 3})``."""
        try:
            result = self._compiled(values)
        except KeyError:
            raise TypeError(f"missing values for {sorted(self.variables - values.keys())}") from None
        except (ArithmeticError, ValueError, TypeError):
            raise self._explain(values) from None
        if result.__class__ is bool:
            return int(result)
        return result

    def _explain(self, values: dict[str, Number]) -> ExpressionError:
        """Evaluate again, slowly, with every node traced: name the part that failed and the values it got."""
        try:
            self._compiler(trace=True).compile(self._body)(values)
        except (ArithmeticError, ValueError, TypeError) as err:
            node = getattr(err, "expression_node", None)
            shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
            message = f"{self.where}: {self.source!r} fails at {shown}: {_reason(err, node)}."
            segment = ast.get_source_segment(self._stripped, node) or "" if node is not None else ""
            rendered = _render(node, getattr(err, "expression_operands", None))
            if segment and (segment != self._stripped or rendered):
                message += f" In `{segment}`" + (f": {rendered}." if rendered and rendered != segment else ".")
            return ExpressionError(message)
        shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        return ExpressionError(f"{self.where}: {self.source!r} fails at {shown}.")

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _one_parameter(args: ast.arguments) -> bool:
    return (
        len(args.args) == 1
        and not args.posonlyargs
        and not args.kwonlyargs
        and not args.vararg
        and not args.kwarg
        and not args.defaults
    )


def _syntax_hint(source: str) -> str:
    if source.startswith("def "):
        return "; a def is not supported: write its return value as one expression, or as 'lambda epoch: ...'"
    if "=" in source.split("lambda", 1)[0] and "lambda" in source:
        return "; paste the lambda without the assignment in front of it"
    return ""


@functools.lru_cache(maxsize=256)
def compile_expression(
    source: str,
    variables: tuple[str, ...] = ("epoch",),
    where: str = "expression",
    constants: tuple[tuple[str, Number], ...] = (),
    lambda_parameter: str | None = None,
    constants_key: str | None = None,
) -> Expression:
    """Parse and check ``source`` once; later calls with the same arguments reuse the result."""
    return Expression(source, variables, where, dict(constants), lambda_parameter, constants_key)
