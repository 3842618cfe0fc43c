"""Repeated layers written once: the statements of a model's repeated layers become one function per
distinct layer, called per layer with that layer's weights, in a loop where the layers are consecutive.

The statements of ``compute`` (``emit.Statement``, in order) are cut into *segments*: runs of statements of
one layer of the model's main repeated family (module paths ``<family>.<i>...``, e.g. ``transformer.h.3``; a
statement belongs to the layer most of its ops are in, so a fused kernel that ends one layer and starts the next
belongs to the first). Two segments are the same layer when their code is the same once every name is
numbered in order of appearance (the values they make, the values they read from before, the weights
they read): the same ops on the same local shapes with the same collectives, kernels, recomputation and
offload. Each distinct layer becomes a function (the most common one named after the layer's module
class, the others after where they are: ``gpt2_block``, ``gpt2_block_first``, ``gpt2_block_last``, or
``gpt2_block_<first layer>``)::

    def gpt2_block(w, add_2, ln_1, mask, mesh):     # w: the layer's weights (Program.weights)
        ...
        return add_2, next_ln_1

and each segment a call of it; consecutive calls whose outputs are the next call's inputs become a loop::

    for i in range(4):
        add_2, ln_1 = gpt2_block(self.weights(GPT2_BLOCK_WEIGHTS, i), add_2, ln_1, self.mask, mesh)

Values a segment frees (``del``) that were made before it are freed after the call (or the loop). Names
inside a function are the module paths relative to the layer (``attn_c_attn``, ``next_ln_1`` for the next
layer's ``ln_1``), and so are the comments.

Requires: statements as ``emit`` makes them (single assignment: every name is bound once), reading the
program's state only as ``self.<attribute>``. Guarantees: the calls run the segments' statements in the
same order with the same values (a segment that matches no other stays as it is).
"""

from __future__ import annotations

import ast
import builtins
import io
import keyword
import re
import tokenize
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shardwise.codegen.pysource import WIDTH, identifier, rename, uses, wrap_lines
from shardwise.codegen.statement import Statement, render_statements
from shardwise.codegen.tables import layer_of, literal, repeated_family
from shardwise.ir.plan import ExecutionPlan

__all__ = ["Layered", "outline"]

_GLOBALS = frozenset({"torch", "F", "C", "K", "aten", "nn", "math", "SimpleNamespace"}) | frozenset(dir(builtins))


@dataclass(frozen=True)
class Layered:
    """``compute``'s body lines (comments included, not indented), the value it returns, the layer functions
    (top-level source) and the weight tables their calls read (top-level source)."""

    compute: list[str]
    returns: str
    functions: list[str]
    tables: list[str]


@dataclass
class _Segment:
    start: int  # statement indices in compute: [start, stop)
    stop: int
    layer: int
    code: str  # the statements' code, without comments
    inputs: list[str]  # what the call passes, in order of first use: variables or "self.<attribute>"
    weights: list[str]  # the program attributes read as weights, in order of first use
    outputs: list[str]  # variables made here and read after the segment, in order
    bound: list[str]  # every name the code binds (nested functions included), in order
    frees: list[str]  # inputs the segment deletes
    key: str = ""


def _tokens(code: str) -> list[tokenize.TokenInfo]:
    return [
        t
        for t in tokenize.generate_tokens(io.StringIO(code).readline)
        if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE)
    ]


def _bound(code: str) -> list[str]:
    """Every name ``code`` binds (assignments, function names and parameters, nested ones too), in order."""
    out: dict[str, None] = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.setdefault(node.id, None)
        elif isinstance(node, ast.FunctionDef):
            out.setdefault(node.name, None)
            for arg in node.args.args + node.args.kwonlyargs:
                out.setdefault(arg.arg, None)
    return list(out)


def _references(code: str, free: set[str]) -> list[tuple[str, str]]:
    """("name", n) for the free names and ("attr", a) for ``self.<a>``, in order of first appearance."""
    tokens = _tokens(code)
    seen: dict[tuple[str, str], None] = {}
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        if i and tokens[i - 1].string == ".":
            continue
        if tok.string == "self" and i + 2 < len(tokens) and tokens[i + 1].string == ".":
            seen.setdefault(("attr", tokens[i + 2].string), None)
        elif tok.string in free:
            seen.setdefault(("name", tok.string), None)
    return list(seen)


def _drop_dels(code: str, gone: set[str]) -> str:
    """``code`` without the ``del`` of the names in ``gone`` (the caller frees them)."""
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("del "):
            indent = line[: len(line) - len(stripped)]
            kept = [v.strip() for v in stripped[4:].split(",") if v.strip() not in gone]
            if not kept:
                continue
            line = f"{indent}del {', '.join(kept)}"
        out.append(line)
    return "\n".join(out)


def _statement_layer(s: Statement, paths: Mapping[str, str], family: str) -> int | None:
    """The layer most of the statement's ops are in (the first of them on a tie), None outside the layers:
    a kernel or a recomputed range that crosses into the next layer belongs to the one it mostly is in."""
    layers = [layer_of(paths.get(n, ""), family) for n in s.all_nodes()]
    counts = Counter(layers)
    return max(dict.fromkeys(layers), key=lambda k: counts[k], default=None)


def _relative_name(name: str, layer: int, family_id: str, parent_id: str = "") -> str:
    """A name of layer ``layer`` made relative to it: ``transformer_h_3_attn_c_attn`` -> ``attn_c_attn``;
    the next layer's ``transformer_h_4_ln_1`` -> ``next_ln_1``; a name of the module holding the layers
    (``parent_id``) relative to that module: ``transformer_ln_f_weight`` -> ``ln_f_weight``; a name outside
    both that carries the layer's number as a word without it: ``kv_cache_3_keys`` -> ``kv_cache_keys``."""
    m = re.match(rf"{re.escape(family_id)}_(\d+)(?:_(.+))?\Z", name)
    if m is None:
        rest = name[len(parent_id) + 1 :] if parent_id and name.startswith(parent_id + "_") else ""
        if rest and not rest[0].isdigit():
            return identifier(rest)
        # a per-layer tensor kept outside the layers (a KV cache's ``kv_cache_3_keys``): without the number
        own = re.sub(rf"_{layer}(?=_|\Z)", "", name, count=1)
        return own if own != name and own and not own[0].isdigit() else name
    d = int(m.group(1)) - layer
    rest = m.group(2) or "layer"
    prefix = {0: "", 1: "next_", -1: "prev_"}.get(d, f"layer_{'p' if d > 0 else 'm'}{abs(d)}_")
    return identifier(prefix + rest)


def _relative_path(path: str, layer: int, family: str) -> str:
    """A module path written relative to layer ``layer``: ``transformer.h.3.attn`` -> ``attn``; the layer
    itself ``transformer.h.<i>``; another layer ``transformer.h.<i+1>.ln_1``."""
    j = layer_of(path, family)
    if j is None:
        return path
    rest = path[len(family) + 1 + len(str(j)) :]
    if j == layer:
        return rest[1:] if rest else f"{family}.<i>"
    d = j - layer
    return f"{family}.<i{d:+d}>{rest}"


def _template(attr: str, layer: int, family_id: str) -> str:
    """A program attribute of layer ``layer`` (or a neighbour) written with ``{i}`` (``{i+1}``...)."""
    m = re.match(rf"{re.escape(family_id)}_(\d+)_(.+)\Z", attr)
    if m is None:
        return attr
    d = int(m.group(1)) - layer
    return f"{family_id}_{{i{'' if d == 0 else f'{d:+d}'}}}_{m.group(2)}"


def _snake(name: str) -> str:
    return identifier(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower())


def _unique(base: str, taken: set[str]) -> str:
    name = base
    k = 1
    while name in taken or keyword.iskeyword(name) or name in _GLOBALS:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _segments(
    compute: Sequence[Statement], returns: str, family: str, paths: Mapping[str, str], weights: set[str]
) -> list[_Segment]:
    layers = [_statement_layer(s, paths, family) for s in compute]
    codes = ["\n".join(s.code()) for s in compute]
    reads_after: list[set[str]] = [set() for _ in range(len(compute) + 1)]
    reads_after[len(compute)] = set(uses([f"_ = {returns}"]).reads)
    for i in range(len(compute) - 1, -1, -1):
        reads_after[i] = reads_after[i + 1] | set(uses(codes[i]).reads)
    out = []
    i = 0
    while i < len(compute):
        if layers[i] is None:
            i += 1
            continue
        j = i
        while j < len(compute) and layers[j] == layers[i]:
            j += 1
        code = "\n".join(codes[i:j])
        u = uses(code)
        free = {n for n in u.reads if n not in _GLOBALS and n != "self"}
        if _bare_self(code):  # ``self`` other than as ``self.<attribute>``: left as it is
            i = j
            continue
        refs = _references(code, free)
        seg_inputs = [n if kind == "name" else f"self.{n}" for kind, n in refs if not (kind == "attr" and n in weights)]
        seg_weights = [n for kind, n in refs if kind == "attr" and n in weights]
        outputs = [n for n in u.sets if n in reads_after[j]]
        bound = _bound(code)
        frees = [n for n in u.frees if n not in bound]  # made before: the caller frees them after the call
        out.append(_Segment(i, j, layers[i], code, seg_inputs, seg_weights, outputs, bound, frees))
        i = j
    for s in out:
        s.key = _key(s)
    return out


def _bare_self(code: str) -> bool:
    """True when ``code`` uses ``self`` other than as ``self.<attribute>``."""
    tokens = _tokens(code)
    for i, tok in enumerate(tokens):
        own = tok.type == tokenize.NAME and tok.string == "self" and not (i and tokens[i - 1].string == ".")
        if own and (i + 1 >= len(tokens) or tokens[i + 1].string != "."):
            return True
    return False


def _key(s: _Segment) -> str:
    """The segment's code with every name numbered by order of appearance (what makes two layers one)."""
    names = {n: f"_v{k}" for k, n in enumerate(s.bound)}
    attributes = {}
    for k, expr in enumerate(s.inputs):
        if expr.startswith("self."):
            attributes[expr[5:]] = f"_a{k}"
        else:
            names[expr] = f"_a{k}"
    attributes.update({a: f"w._w{k}" for k, a in enumerate(s.weights)})
    code = rename(_drop_dels(s.code, set(s.frees)), names, attributes)
    return code + "\n->" + ",".join(names[o] for o in s.outputs)


@dataclass
class _Function:
    name: str
    table: str  # its weights table's name
    segments: list[_Segment]
    params: list[str]
    slots: list[str]
    outputs: list[str]
    source: str = ""


def _ranges(numbers: Sequence[int]) -> str:
    """``0-3, 5``: the numbers as runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] + 1 == n:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _majority(values: Sequence[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def _function(
    segments: list[_Segment], compute: Sequence[Statement], family: str, family_id: str, name: str,
) -> _Function:  # fmt: skip
    """The function for ``segments`` (one layer, same key): names relative to the layer, chosen from the
    segments (the most common), and its source written from the first segment."""
    first = segments[0]
    parent_id = identifier(family.rpartition(".")[0]) if "." in family else ""

    def _relative(name: str, layer: int, family_id: str) -> str:
        return _relative_name(name, layer, family_id, parent_id)

    taken = {"w", "self"}
    params = []
    for k in range(len(first.inputs)):
        relative = [_relative(s.inputs[k].removeprefix("self."), s.layer, family_id) for s in segments]
        params.append(_unique(_majority(relative), taken))
    slot_taken: set[str] = set()
    slots = [
        _unique(_majority([_relative(s.weights[k], s.layer, family_id) for s in segments]), slot_taken)
        for k in range(len(first.weights))
    ]
    local = {}
    for k, expr in enumerate(first.inputs):
        if not expr.startswith("self."):
            local[expr] = params[k]
    for n in first.bound:
        if n not in local:
            local[n] = _unique(_relative(n, first.layer, family_id), taken)
    attributes = {expr[5:]: params[k] for k, expr in enumerate(first.inputs) if expr.startswith("self.")}
    attributes.update({a: f"w.{slots[k]}" for k, a in enumerate(first.weights)})
    lines: list[str] = []
    previous = ""
    for s in compute[first.start : first.stop]:
        lines += s.render(lambda p: _relative_path(p, first.layer, family), previous)
        previous = s.describe(lambda p: _relative_path(p, first.layer, family)) or previous
    body = rename(_drop_dels("\n".join(lines), set(first.frees)), local, attributes)
    outputs = [local[o] for o in first.outputs]
    layers = _ranges([s.layer for s in segments])
    doc = f'"""{family}.<i>: one layer of this rank\'s program (layers {layers}); ``w``: its weights."""'
    head = f"def {name}({', '.join(['w', *params])}):"
    body_lines = [doc, *body.split("\n")]
    if outputs:
        body_lines.append(f"return {', '.join(outputs)}")
    source = "\n".join(wrap_lines([head, *(f"    {line}" if line else "" for line in body_lines)], WIDTH))
    table = f"{name.upper()}_WEIGHTS"
    return _Function(name, table, segments, params, slots, outputs, source)


def _loop_runs(f: _Function) -> list[list[_Segment]]:
    """Runs of consecutive calls of ``f`` (nothing between them in ``compute``), consecutive layers."""
    runs: list[list[_Segment]] = []
    for s in f.segments:
        if runs and runs[-1][-1].stop == s.start and runs[-1][-1].layer + 1 == s.layer:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _carried(run: list[_Segment], reads_outside: Mapping[int, set[str]]) -> dict[int, int] | None:
    """input position -> output position it takes from the previous call, when ``run`` can be a loop."""
    n_in = len(run[0].inputs)
    carried: dict[int, int] = {}
    outputs_anywhere = {o for s in run for o in s.outputs}
    for p in range(n_in):
        values = [s.inputs[p] for s in run]
        if all(v == values[0] for v in values) and values[0] not in outputs_anywhere:
            continue  # the same value for every layer
        qs = {prev.outputs.index(s.inputs[p]) if s.inputs[p] in prev.outputs else -1 for prev, s in zip(run, run[1:])}
        if len(qs) != 1 or -1 in qs or values[0].startswith("self."):
            return None
        carried[p] = qs.pop()
    if len(set(carried.values())) != len(carried):
        return None
    # what a call makes is read by the next call only (but the last call's), as the input it carries
    for k, s in enumerate(run[:-1]):
        nxt = run[k + 1]
        later = reads_outside.get(nxt.stop, set())
        for q, o in enumerate(s.outputs):
            if o in later:
                return None
            if o in nxt.inputs and carried.get(nxt.inputs.index(o)) != q:
                return None
    # the first call's carried inputs are read by nothing after it
    after_first = reads_outside.get(run[0].stop, set())
    for p in carried:
        if run[0].inputs[p] in after_first:
            return None
    # a call frees only what it carries (the loop frees the rest after the last call)
    for s in run[:-1]:
        if set(s.frees) - {s.inputs[p] for p in carried}:
            return None
    return carried


def _weights_table(f: _Function, family_id: str) -> list[str]:
    """``<NAME>_WEIGHTS = {slot: attribute template, ...}``: what ``w.<slot>`` is for each call."""
    entries = []
    for k, slot in enumerate(f.slots):
        templates = {s.layer: _template(s.weights[k], s.layer, family_id) for s in f.segments}
        if len(set(templates.values())) == 1:
            entries.append(f"    {literal(slot)}: {literal(next(iter(templates.values())))},")
        else:
            attrs = {s.layer: s.weights[k] for s in f.segments}
            entries.append(f"    {literal(slot)}: {literal(attrs)},")
    return [
        f'# what {f.name}() reads as w.<name>: attributes of the program, "{{i}}" the layer\'s number'
        + (' ("{i+1}" the next one\'s)' if any("{i+1}" in e for e in entries) else ""),
        f"{f.table} = {{",
        *entries,
        "}",
    ]


def outline(
    plan: ExecutionPlan, compute: Sequence[Statement], returns: str, inputs: Sequence[str],
    attributes: Mapping[str, str], taken: set[str],
) -> Layered:  # fmt: skip
    """``compute`` with its repeated layers written once (see the module docstring). ``attributes``:
    parameter value name -> the program's attribute (the weights); ``taken``: names the program uses."""
    graph = plan.graph
    family = repeated_family(graph)
    flat = render_statements(compute)
    if not family:
        return Layered(flat, returns, [], [])
    family_id = identifier(family)
    paths = {n.name: n.module_path for n in graph.nodes}
    segments = _segments(compute, returns, family, paths, set(attributes.values()))
    if not segments:  # no statement of the layers can be a call (each reads ``self`` itself)
        return Layered(flat, returns, [], [])
    classes: dict[str, list[_Segment]] = {}
    for s in segments:
        classes.setdefault(s.key, []).append(s)
    block_type = next((n.module_type for n in graph.nodes if re.fullmatch(rf"{re.escape(family)}\.\d+", n.module_path)), "")
    names_taken = set(taken) | set(_GLOBALS)
    functions: list[_Function] = []
    base = _snake(block_type) if block_type else family_id
    main = max(classes.values(), key=len, default=[])
    first, last = segments[0].layer, segments[-1].layer
    for members in classes.values():
        # the most common layer is <base>; the others are named after where they are
        layers = {s.layer for s in members}
        suffix = "first" if layers == {first} else "last" if layers == {last} else str(members[0].layer)
        name = _unique(base if members is main else f"{base}_{suffix}", names_taken)
        functions.append(_function(members, compute, family, family_id, name))
    if not functions:
        return Layered(flat, returns, [], [])
    codes = ["\n".join(s.code()) for s in compute]
    reads_outside: dict[int, set[str]] = {}
    running: set[str] = set(uses([f"_ = {returns}"]).reads)
    for i in range(len(compute), -1, -1):
        if i < len(compute):
            running |= set(uses(codes[i]).reads)
        reads_outside[i] = set(running)
    # calls: (start, stop) of compute replaced by statements
    replaced: dict[int, tuple[int, list[Statement]]] = {}
    renames: dict[str, str] = {}
    caller_taken = set(names_taken) | {n for code in codes for n in uses(code).sets} | {f.name for f in functions}
    for f in functions:
        for run in _loop_runs(f):
            carried = _carried(run, reads_outside) if len(run) > 1 else None
            if carried is None:
                for s in run:
                    replaced[s.start] = (s.stop, [_call_statement(f, s, family)])
                continue
            loop_vars = {}
            for q, out in enumerate(f.outputs):
                # what a call makes for the next layer is that layer's input: ``next_ln_1`` is ``ln_1`` here
                loop_vars[q] = _unique(out.removeprefix("next_") or out, caller_taken)
            before = []  # the loop's variables start as the first call's inputs
            for p, q in carried.items():
                if run[0].inputs[p] in inputs:  # compute's own parameter: bound to the loop's variable
                    before += [f"{loop_vars[q]} = {run[0].inputs[p]}", f"del {run[0].inputs[p]}"]
                else:
                    renames[run[0].inputs[p]] = loop_vars[q]
            for q, o in enumerate(run[-1].outputs):
                renames[o] = loop_vars[q]
            loop = _loop_statement(f, run, carried, loop_vars, family, before)
            replaced[run[0].start] = (run[-1].stop, [loop])
    caller: list[Statement] = []
    i = 0
    while i < len(compute):
        if i in replaced:
            stop, statements = replaced[i]
            caller += statements
            i = stop
        else:
            caller.append(compute[i])
            i += 1
    lines = render_statements(caller)
    if renames:
        lines = rename("\n".join(lines), renames).split("\n")
        returns = rename(returns, renames)
    tables = []
    for f in functions:
        tables += _weights_table(f, family_id)
    return Layered(lines, returns, [f.source for f in functions], tables)


def _call_statement(f: _Function, s: _Segment, family: str) -> Statement:
    args = ", ".join([f"self.weights({f.table}, {s.layer})", *s.inputs])
    target = f"{', '.join(s.outputs)} = " if s.outputs else ""
    lines = [f"{target}{f.name}({args})"]
    if s.frees:
        lines.append(f"del {', '.join(s.frees)}")
    return Statement(f"{family}.{s.layer}: {f.name}()", tuple(lines))


def _loop_statement(
    f: _Function, run: list[_Segment], carried: Mapping[int, int], loop_vars: Mapping[int, str], family: str,
    before: Sequence[str] = (),
) -> Statement:  # fmt: skip
    first, last = run[0], run[-1]
    args = [f"self.weights({f.table}, i)"]
    for p, expr in enumerate(first.inputs):
        args.append(loop_vars[carried[p]] if p in carried else expr)
    targets = [loop_vars[q] for q in range(len(f.outputs))]
    stop = last.layer + 1
    head = f"for i in range({first.layer}, {stop}):" if first.layer else f"for i in range({stop}):"
    call = f"{', '.join(targets)} = " if targets else ""
    lines = [*before, head, f"    {call}{f.name}({', '.join(args)})"]
    kept = {last.inputs[p] for p in carried}
    frees = [v for v in last.frees if v not in kept]
    if frees:
        lines.append(f"del {', '.join(frees)}")
    comment = f"{family}.{first.layer} .. {family}.{last.layer}: {f.name}() once per layer"
    return Statement(comment, tuple(lines))



