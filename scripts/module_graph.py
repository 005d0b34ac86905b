#!/usr/bin/env python3
"""Module graph of the crate (src/), and the layout rules the README states.

Prints one line per module, `module -> the crate modules it uses`, from every `crate::`,
`super::` and `self::` path in the code (comments and strings are ignored), resolved to the
deepest module file that exists. With --check it also fails (exit 1) when
  - two or more modules use each other, directly or through others (an import cycle),
  - `unsafe` appears outside src/kernels/,
  - a file in src/ has more than 600 lines,
  - a module file does not open with a `//!` comment,
  - the graph in README.md's Layout section differs from the one printed.

Usage: scripts/module_graph.py [--check] [--src DIR]
"""
import argparse
import re
import sys
from pathlib import Path

MAX_LINES = 600
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
MOD_DECL_RE = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)


def module_of(path: Path, src: Path) -> tuple:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments_and_strings(text: str) -> str:
    out = []
    for line in text.splitlines():
        # Drop string literals first (paths inside messages are not uses), then comments.
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    return "\n".join(out)


def inline_depths(code: str) -> list:
    """For each position of `code`, how many inline `mod name { ... }` blocks enclose it."""
    depths = [0] * (len(code) + 1)
    opens = {m.end() - 1 for m in re.finditer(r"\bmod\s+[a-z_][a-z0-9_]*\s*\{", code)}
    brace, stack = 0, []
    for i, c in enumerate(code):
        if c == "{":
            brace += 1
            if i in opens:
                stack.append(brace)
        elif c == "}":
            if stack and stack[-1] == brace:
                stack.pop()
            brace -= 1
        depths[i] = len(stack)
    return depths


def resolve(mod: tuple, inline: int, head: str, segs: list, known: set) -> tuple:
    if head == "crate":
        base = ()
    elif head == "self":
        base = mod
        if inline:
            return None  # a path inside an inline module (tests): not another file
    elif inline == 1:
        base = mod  # `super::x` inside `mod tests { }` names the file module itself
    elif inline:
        return None
    else:  # super: the parent of the module this file defines
        base = mod[:-1]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    best = None
    path = base
    for s in segs:
        path = path + (s,)
        if path in known:
            best = path
        else:
            break
    if best is None and base in known:
        best = base
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    args = ap.parse_args()
    src = Path(args.src)
    files = sorted(p for p in src.rglob("*.rs"))
    mods = {module_of(p, src): p for p in files if p.name != "main.rs"}
    known = set(mods)
    graph = {m: set() for m in mods}
    problems = []
    for m, p in mods.items():
        text = p.read_text()
        code = strip_comments_and_strings(text)
        is_dir_mod = p.name in ("mod.rs", "lib.rs")
        children = set(MOD_DECL_RE.findall(code))
        depths = inline_depths(code)
        for mt in PATH_RE.finditer(code):
            head, rest = mt.group(1), mt.group(2)
            segs = [s for s in rest.split("::") if s]
            target = resolve(m, depths[mt.start()], head, segs, known)
            if target is not None and target != m:
                graph[m].add(target)
        # `use child::...` inside a folder module
        for child in children:
            if re.search(r"(?<![:\w])%s::" % child, code):
                graph[m].add(m + (child,))
        lines = text.count("\n") + 1
        if lines > MAX_LINES:
            problems.append(f"{p}: {lines} lines (more than {MAX_LINES})")
        if not text.lstrip().startswith("//!"):
            problems.append(f"{p}: does not open with a //! comment")
        if "src/kernels" not in p.as_posix() and re.search(r"\bunsafe\b", code):
            problems.append(f"{p}: `unsafe` outside src/kernels/")

    name = lambda m: "::".join(m) if m else "crate"
    lines = []
    for m in sorted(graph):
        deps = ", ".join(sorted(name(d) for d in graph[m]))
        lines.append(f"{name(m)} -> {deps}" if deps else f"{name(m)}")
    print("\n".join(lines))
    readme = src.parent / "README.md"
    if readme.is_file():
        text = readme.read_text()
        at = text.find("## Layout")
        block = re.search(r"```text\n(.*?)```", text[at:], re.S) if at >= 0 else None
        if block is None or block.group(1).rstrip("\n").split("\n") != lines:
            problems.append("README.md: the module graph in the Layout section is not current (paste this script's output)")

    # Cycles: strongly connected components with more than one module (Tarjan).
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    for comp in sccs:
        problems.append("import cycle: " + " <-> ".join(sorted(name(c) for c in comp)))
    if args.check:
        for p in problems:
            print("module-graph: " + p, file=sys.stderr)
        print(f"module-graph: {len(graph)} modules, {len(problems)} problems", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
