"""The module graph: no Python file of the project imports another that imports it back (directly or
through others), and every project import sits at the top of its file."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules():
    """{module name: path} of the project's own modules (top level and mlx_port/)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    port = os.path.join(ROOT, "mlx_port")
    mods.update({f"mlx_port.{f[:-3]}": os.path.join(port, f) for f in os.listdir(port)
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
            names = [node.module]
        for n in names:
            if n in mods:
                (top if node in tree.body else nested).add(n)
    return top, nested


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
    assert {"isd", "model", "checkpoint", "pretrained"} <= set(graph)  # the walk saw the project
