"""The module graph: no Python file of the project imports another that imports it back (directly or
through others), and every project import sits at the top of its file; the tests share their references
through tests/reference.py, never by importing one another."""
import ast
import re
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules():
    """{module name: path} of the project's own modules (top level, mlx_port/ and bench/)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for package in ("mlx_port", "bench"):
        folder = os.path.join(ROOT, package)
        mods.update({f"{package}.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(folder)
                     if f.endswith(".py") and f != "__init__.py"})
    return mods


def imports(path, mods):
    """(project modules imported at the top level, project modules imported inside functions)."""
    tree = ast.parse(open(path).read())
    top, nested = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mlx_port import lora` imports the module mlx_port.lora (`from bench import serving`: bench.serving)
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in mods:
                (top if node in tree.body else nested).add(n)
    return top, nested


def reach(graph, start):
    """The modules `start` imports, directly or through others, `start` included."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_no_import_cycles_and_no_hidden_imports():
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        top, nested = imports(path, mods)
        assert not nested, f"{name} imports {sorted(nested)} inside a function"
        graph[name] = top
    # depth-first search for a cycle
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", "import cycle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])
    assert {"isd", "model", "checkpoint", "pretrained", "sample"} <= set(graph)  # the walk saw the project
    # and the benchmarks, with the edges between them: bench/__main__.py imports every one
    assert {"bench.__main__", "bench.isd_decoding", "bench.gpu", "bench.mlx_vs_torch_worker"} <= set(graph)
    assert {"bench.serving", "bench.introspect", "bench.training", "decoding", "isd"} <= reach(graph, "bench.__main__")
    # but not the MLX port: its measurements run in processes of their own (python -m bench.mlx_vs_torch_worker), where
    # mlx_port is imported before torch
    assert not {m for m in reach(graph, "bench.__main__") if m.startswith("mlx_port.") or m.endswith("_worker")}


def test_the_benchmarks_live_in_bench():
    """The top level holds the method and its systems; every benchmark is a module of bench/ (python -m bench),
    named for what it measures, never as a top-level module (bench/serving.py measures serve.py)."""
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    benchmarks = {f[:-3] for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py")}
    assert not {m for m in top if "bench" in m or m == "introspect"}, sorted(top)
    assert "__main__" in benchmarks and not benchmarks & top, sorted(benchmarks & top)


def test_isd_is_the_algorithm_alone():
    """isd.py reaches no command line, checkpoint format, tokenizer or adapter: sample.py (the command line)
    and serve.py bring those."""
    mods = project_modules()
    graph = {name: imports(path, mods)[0] for name, path in mods.items()}
    assert reach(graph, "isd") == {"isd", "decoding", "kernels", "sampling"}
    assert {"isd", "lora", "cli", "checkpoint", "tokenizer"} <= reach(graph, "sample")


NUMBER = re.compile(r"^\**[~+-]?\d[\d,.]*\s*(x|%|s|ms|k)?\**$")  # a cell that is a figure: 3.11, **1.36x**, 25%


def tables(path):
    """(line number, table lines, the lines between the last heading or table and it) of a Markdown file."""
    lines, found, above = open(path).read().splitlines(), [], []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            found.append((i + 1, lines[i:j], above))
            above, i = [], j
            continue
        above = [] if lines[i].startswith("#") else above + [lines[i]]
        i += 1
    return found


def test_every_table_of_figures_carries_its_command():
    """Each table of figures in README.md and docs/ is a benchmark's output pasted whole (`python -m bench
    <benchmark> --markdown FILE` writes it so): the command that made it stands above it, after the last
    heading or table, so that rerunning it refreshes the table. Tables that measure nothing say so."""
    docs = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    missing = []
    for path in docs:
        for line, rows, above in tables(path):
            cells = [c.strip() for r in rows[2:] for c in r.strip("|").split("|")[1:]]
            if not any(NUMBER.match(c) for c in cells) or "<!-- not a measurement -->" in above:
                continue
            if not any(a.startswith("Command: `") for a in above):
                missing.append(f"{os.path.relpath(path, ROOT)}:{line}")
    assert not missing, f"tables of figures without the command that made them: {missing}"


def third_party(path):
    """Dotted names of the modules outside the project that a file imports (`from a.b import c`: a.b)."""
    tree, out = ast.parse(open(path).read()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


TORCH = ("torch", "triton", "safetensors.torch")  # what the MLX port must never import


def test_the_mlx_port_never_reaches_torch():
    """Every module under mlx_port/, and every project module it imports (directly or through others), is free
    of torch (and of Triton and safetensors.torch; safetensors' own safe_open reads with numpy): the port runs
    where PyTorch is not installed. The same
    is checked at run time, with torch made unimportable, in tests/test_mlx_isd.py."""
    mods = project_modules()
    graph = {name: imports(path, mods)[0] for name, path in mods.items()}
    reached = {}
    for start in [m for m in mods if m.startswith("mlx_port.")]:
        seen = reach(graph, start)
        for m in seen:
            bad = {n for n in third_party(mods[m]) if any(n == t or n.startswith(t + ".") for t in TORCH)}
            assert not bad, f"{start} imports {m}, which imports {sorted(bad)}"
        reached[start] = seen
    # the walk really crossed the import graph: the shared modules the port imports, directly or through
    # others, were reached and checked (a walk that found no edges would check the port's own files only)
    assert {"checkpoint", "data", "options", "tokenizer", "decoding", "cli"} <= set().union(*reached.values()), reached
    assert {"mlx_port.model", "mlx_port.lora", "mlx_port.isd", "checkpoint", "decoding"} <= reached["mlx_port.distill"]
    # the command line: PyTorch's sample.py imports torch, so the port shares cli.py with it, not sample.py
    assert {"mlx_port.isd", "mlx_port.lora", "cli", "decoding", "checkpoint", "tokenizer"} <= reached["mlx_port.sample"]
    # mlx_port.train reaches mlx_port.distill only through `from mlx_port import distill` (a package's member)
    assert {"mlx_port.distill", "checkpoint", "data", "options", "tokenizer"} <= reached["mlx_port.train"]


def test_test_modules_share_references_through_reference_py_only():
    """The tests' shared references and builders live in tests/reference.py: no test module imports another
    (anywhere in it, inside functions too), and reference.py imports no test module and only at its top."""
    tests = os.path.join(ROOT, "tests")
    names = {f[:-3] for f in os.listdir(tests) if f.endswith(".py")}
    test_modules = {n for n in names if n.startswith("test_") or n == "conftest"}
    assert "reference" in names and {"test_isd", "test_model", "test_structure"} <= test_modules
    found = []
    for name in sorted(test_modules | {"reference"}):
        tree = ast.parse(open(os.path.join(tests, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            else:
                continue
            for m in mods:
                m = m.removeprefix("tests.")
                if m in test_modules:
                    found.append(f"{name} imports {m}")
                if name == "reference" and node not in tree.body:
                    found.append(f"reference imports {m} inside a function")
    assert not found, found
