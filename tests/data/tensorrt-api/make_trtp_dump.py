"""Write the public surface of ``tensorrt.plugin`` from a bindings wheel, without importing it.

``tensorrt.plugin`` cannot be imported without libnvinfer, so its names are read
from the wheel's Python sources: every object exported through ``public_api``
(the module's export decorator) and, for classes, their methods, properties and
instance attributes, including those inherited from classes in the same package.

Usage: python make_trtp_dump.py <unpacked wheel>/tensorrt_bindings/plugin VERSION > trtp-VERSION.txt
"""
import ast
import pathlib
import sys


def _is_public_api(dec: ast.expr) -> bool:
    return isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "public_api"


def _walk_defs(body):
    """Definitions, including those nested in ``if`` blocks."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _walk_defs(node.body)
            yield from _walk_defs(node.orelse)
        else:
            yield node


def _members(cls: ast.ClassDef) -> dict:
    out = {}
    for item in _walk_defs(cls.body):
        if isinstance(item, ast.FunctionDef):
            kinds = [getattr(d, "id", getattr(d, "attr", "")) for d in item.decorator_list]
            out[item.name] = "PROP" if ("property" in kinds or "setter" in kinds) else "METH"
            if item.name == "__init__":
                for sub in ast.walk(item):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        if getattr(sub.value, "id", None) == "self" and not sub.attr.startswith("_"):
                            out.setdefault(sub.attr, "ATTR")
        elif isinstance(item, ast.ClassDef):
            out[item.name] = "CLASS"
    return out


def dump(plugin_dir: pathlib.Path, version: str) -> str:
    classes, public, values = {}, [], []
    for path in sorted(plugin_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in _walk_defs(tree.body):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                call = node.value  # public_api(symbol="op")(op)
                if isinstance(call.func, ast.Call) and _is_public_api(call.func):
                    values += [kw.value.value for kw in call.func.keywords if kw.arg == "symbol"]
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(_is_public_api(d) for d in node.decorator_list):
                public.append(node)

    def all_members(cls: ast.ClassDef) -> dict:
        merged = {}
        for base in cls.bases:
            name = getattr(base, "id", None)
            if name in classes:
                merged.update(all_members(classes[name]))
        merged.update(_members(cls))
        return merged

    lines = [f"# tensorrt.plugin public names, tensorrt-cu12-bindings=={version} (read from the wheel sources)"]
    lines += [f"VAL {v}" for v in values]
    for node in public:
        if isinstance(node, ast.FunctionDef):
            lines.append(f"FUNC {node.name}")
            continue
        lines.append(f"CLASS {node.name}")
        for name, kind in sorted(all_members(node).items()):
            lines.append(f"  {kind} {name}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dump(pathlib.Path(sys.argv[1]), sys.argv[2]))
