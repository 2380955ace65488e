"""Every TensorRT and cuda-python name our code uses exists, with a signature that accepts our call.

TensorRT cannot run here, so a typo, a renamed method or an API removed in
TensorRT 11 would otherwise only show on a user's GPU. The sources are parsed
with ``ast``; every attribute chain on the ``tensorrt`` module and every method
or property used on a TensorRT object (recognised by the variable it is kept in:
``engine``, ``context``, ``runtime``, ``network``, ``config``...) is checked:

* builder side (:mod:`infiniteid.trt.builder`): against the signature dumps of
  the real bindings of TensorRT 10.16 and 11.4 (``tests/data/tensorrt-api``);
* runtime side (:mod:`infiniteid.trt.runner`, :mod:`infiniteid.runtime.trt_backend`):
  against the lean runtime imported for real (``tensorrt_lean``; its docstrings
  carry the pybind11 signatures), else against its committed dump, and against
  the full 10.16 and 11.4 dumps (the backend prefers the full package);
* cuda-python (:mod:`infiniteid.trt.cuda`): against ``cuda.bindings.runtime``.
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DUMPS = Path(__file__).resolve().parent / "data" / "tensorrt-api"
FULL_DUMPS = ("trt-10.16.1.11.txt", "trt-11.4.0.106.txt")
LEAN_DUMP = "lean-11.4.0.106.txt"
BUILDER_SOURCES = ("infiniteid/trt/builder.py",)
RUNTIME_SOURCES = ("infiniteid/trt/runner.py", "infiniteid/runtime/trt_backend.py", "infiniteid/trt/polygraphy_side.py")

#: variable (as written in our sources) -> TensorRT class it holds
BUILDER_RECEIVERS = {
    "self.builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "profile": "IOptimizationProfile",
    "self._cache": "ITimingCache",
    "cache": "ITimingCache",
    "t": "ITensor",
    "layer": "ILayer",
    "v3layer": "IPluginV3Layer",
    "plugin": "IPluginV3",
    "core": "IPluginV3OneCore",
}
RUNTIME_RECEIVERS = {
    "self.engine": "ICudaEngine",
    "engine": "ICudaEngine",
    "self.context": "IExecutionContext",
    "runtime": "Runtime",
}
MODULE_NAMES = ("trt", "self.trt")


# -- signatures ------------------------------------------------------------------------------------
@dataclass
class Signature:
    params: List[Tuple[str, bool]]  # (name, has default), self excluded

    def accepts(self, positional: int, keywords: Set[str]) -> bool:
        names = [p for p, _ in self.params]
        if positional > len(self.params):
            return False
        taken = set(names[:positional])
        if keywords & taken or not keywords <= set(names):
            return False
        return all(has_default or name in taken or name in keywords for name, has_default in self.params)


def _split_params(text: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<{":
            depth += 1
        elif ch in "])>}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_signature(line: str, name: str) -> Optional[Signature]:
    """``name(self: T, a: T, b: T = d) -> R`` -> Signature (None for the ``(*args, **kwargs)`` header)."""
    m = re.search(rf"(?:^|\s|\.){re.escape(name)}\((.*)\)\s*(->.*)?$", line.strip())
    if not m:
        return None
    params = _split_params(m.group(1))
    if params and params[0].startswith("*"):
        return None
    out = []
    for p in params:
        pname = p.split(":")[0].split("=")[0].strip()
        if pname == "self":
            continue
        out.append((pname, "=" in p))
    return Signature(out)


@dataclass
class ClassApi:
    methods: Dict[str, List[Signature]] = field(default_factory=dict)
    props: Dict[str, bool] = field(default_factory=dict)  # name -> writable
    attrs: Set[str] = field(default_factory=set)


@dataclass
class ModuleApi:
    classes: Dict[str, ClassApi] = field(default_factory=dict)
    enums: Dict[str, Set[str]] = field(default_factory=dict)
    funcs: Set[str] = field(default_factory=set)
    values: Set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.classes or name in self.enums or name in self.funcs or name in self.values \
            or name == "__version__"


def parse_dump(path: Path) -> ModuleApi:
    api = ModuleApi()
    cls: Optional[ClassApi] = None
    for raw in path.read_text().splitlines():
        if raw.startswith("CLASS "):
            name = raw.split()[1]
            cls = api.classes.setdefault(name, ClassApi())
        elif raw.startswith("ENUM "):
            name, members = raw[5:].split(":", 1)
            api.enums[name.strip()] = {m.split("=")[0].strip() for m in members.split(",") if m.strip()}
            cls = None
        elif raw.startswith("FUNC "):
            api.funcs.add(raw[5:].split(":")[0].strip())
            cls = None
        elif raw.startswith("VAL "):
            api.values.add(raw[4:].split("=")[0].strip())
            cls = None
        elif raw.startswith("  ") and cls is not None:
            kind, rest = raw.strip().split(" ", 1)
            if kind in ("METH", "INIT"):
                rest = re.sub(r"^\d+\.\s+", "", rest)
                mname = rest.split("(", 1)[0]
                sig = parse_signature(rest, mname)
                cls.methods.setdefault(mname, [])
                if sig is not None:
                    cls.methods[mname].append(sig)
            elif kind == "PROP":
                cls.props[rest.split()[0]] = "[rw]" in rest
            elif kind == "ATTR":
                cls.attrs.add(rest.split()[0])
    return api


def live_module_api(mod) -> ModuleApi:
    """The same structure read from an imported pybind11 module (signatures from docstrings)."""
    import inspect

    api = ModuleApi()
    for name in dir(mod):
        obj = getattr(mod, name)
        if inspect.isclass(obj):
            members = getattr(obj, "__members__", None)
            if members is not None:  # a pybind11 enum
                api.enums[name] = set(members)
                continue
            c = ClassApi()
            for attr in dir(obj):
                try:
                    v = inspect.getattr_static(obj, attr)
                except AttributeError:
                    continue
                if isinstance(v, property):
                    c.props[attr] = v.fset is not None
                elif callable(v) and getattr(v, "__doc__", None):
                    sigs = [parse_signature(line, attr) for line in v.__doc__.splitlines()
                            if re.match(rf"^(\d+\.\s+)?{re.escape(attr)}\(", line.strip())]
                    c.methods[attr] = [s for s in sigs if s is not None]
                else:
                    c.attrs.add(attr)
            api.classes[name] = c
        elif callable(obj):
            api.funcs.add(name)
        else:
            api.values.add(name)
    return api


# -- what our sources use -----------------------------------------------------------------------------
@dataclass
class Use:
    file: str
    line: int
    base: str
    chain: Tuple[str, ...]  # attribute names after the base
    call: Optional[Tuple[int, Set[str]]] = None  # (positional count, keywords) if the last name is called
    store: bool = False


def collect_uses(rel: str, bases) -> List[Use]:
    tree = ast.parse((ROOT / rel).read_text())
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    uses: List[Use] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue
        chain: List[str] = []
        cur: ast.expr = node
        found = None
        while isinstance(cur, ast.Attribute):
            chain.insert(0, cur.attr)
            if ast.unparse(cur.value) in bases:
                found = ast.unparse(cur.value)
                break
            cur = cur.value
        if found is None:
            continue
        parent = parents.get(node)
        call = None
        if isinstance(parent, ast.Call) and parent.func is node:
            call = (len(parent.args), {k.arg for k in parent.keywords if k.arg})
        store = isinstance(node.ctx, ast.Store)
        uses.append(Use(rel, node.lineno, found, tuple(chain), call, store))
    return uses


def check_module_chain(api: ModuleApi, chain: Tuple[str, ...]) -> Optional[str]:
    first = chain[0]
    if not api.has(first):
        return f"no {first}"
    if len(chain) == 1:
        return None
    second = chain[1]
    if first in api.enums:
        return None if second in api.enums[first] else f"enum {first} has no {second}"
    if first in api.classes:
        c = api.classes[first]
        if second not in c.methods and second not in c.props and second not in c.attrs:
            return f"class {first} has no {second}"
        if len(chain) > 2 and second in c.attrs and chain[2] not in c.attrs:
            return f"{first}.{second} has no {chain[2]}"
    return None


def check_member(api: ModuleApi, cls: str, use: Use) -> Optional[str]:
    c = api.classes.get(cls)
    if c is None:
        return f"no class {cls}"
    name = use.chain[0]
    if name == "__class__":  # every Python object has it (set to downcast, as polygraphy does)
        return None
    if name in c.props:
        if use.store and not c.props[name] and len(use.chain) == 1:
            return f"{cls}.{name} is read-only"
        return None
    if name in c.methods:
        if use.call is not None and len(use.chain) == 1 and c.methods[name]:
            pos, kw = use.call
            if not any(s.accepts(pos, kw) for s in c.methods[name]):
                return f"{cls}.{name} takes none of {pos} positional + {sorted(kw)} keywords"
        return None
    if name in c.attrs:
        return None
    return f"{cls} has no {name}"


def problems(api: ModuleApi, sources, receivers) -> List[str]:
    out = []
    for rel in sources:
        for u in collect_uses(rel, set(MODULE_NAMES) | set(receivers)):
            why = check_module_chain(api, u.chain) if u.base in MODULE_NAMES else check_member(api, receivers[u.base], u)
            if why:
                out.append(f"{u.file}:{u.line}: {u.base}.{'.'.join(u.chain)}: {why}")
    return out


# -- the tests ----------------------------------------------------------------------------------------
def test_dump_parser_reads_known_facts():
    api = parse_dump(DUMPS / "trt-11.4.0.106.txt")
    assert "FP16" not in api.enums["BuilderFlag"]  # removed in 11
    assert "FP16" in parse_dump(DUMPS / "trt-10.16.1.11.txt").enums["BuilderFlag"]
    ctx = api.classes["IExecutionContext"]
    assert any(s.accepts(2, set()) for s in ctx.methods["set_tensor_address"])
    assert not any(s.accepts(1, set()) for s in ctx.methods["set_tensor_address"])
    assert any(s.accepts(1, set()) for s in api.classes["ICudaEngine"].methods["create_execution_context"])
    assert api.classes["IBuilderConfig"].props["builder_optimization_level"] is True
    assert "device_memory_size" not in api.classes["ICudaEngine"].props  # gone in 11
    assert "device_memory_size_v2" in api.classes["ICudaEngine"].props


def test_the_checker_catches_typos_and_wrong_calls(tmp_path, monkeypatch):
    src = tmp_path / "bad.py"
    src.write_text(
        "def f(trt, engine, context):\n"
        "    trt.BuilderFlag.FP16\n"
        "    trt.ExecutionContextAllocationStrategy.USER_MANAGED\n"
        "    engine.get_tensor_nme(0)\n"
        "    context.set_tensor_address('x')\n"
        "    engine.num_io_tensors = 3\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    api = parse_dump(DUMPS / "trt-11.4.0.106.txt")
    found = problems(api, ["bad.py"], {"engine": "ICudaEngine", "context": "IExecutionContext"})
    text = "\n".join(found)
    assert "BuilderFlag has no FP16" in text
    assert "ICudaEngine has no get_tensor_nme" in text
    assert "set_tensor_address takes none of 1 positional" in text
    assert "num_io_tensors is read-only" in text
    assert len(found) == 4


@pytest.mark.parametrize("dump", FULL_DUMPS)
def test_builder_names_exist_in_full_tensorrt(dump):
    api = parse_dump(DUMPS / dump)
    uses = [u for rel in BUILDER_SOURCES for u in collect_uses(rel, set(MODULE_NAMES) | set(BUILDER_RECEIVERS))]
    assert len(uses) > 25, "the scan found too few TensorRT uses; did the variable names change?"
    assert problems(api, BUILDER_SOURCES, BUILDER_RECEIVERS) == []


@pytest.mark.parametrize("dump", FULL_DUMPS)
def test_runtime_names_exist_in_full_tensorrt(dump):
    api = parse_dump(DUMPS / dump)
    assert problems(api, RUNTIME_SOURCES, RUNTIME_RECEIVERS) == []


def test_runtime_names_exist_in_the_lean_runtime_dump():
    api = parse_dump(DUMPS / LEAN_DUMP)
    uses = [u for rel in RUNTIME_SOURCES for u in collect_uses(rel, set(MODULE_NAMES) | set(RUNTIME_RECEIVERS))]
    used = {".".join(u.chain) for u in uses}
    # the calls the issue names must be among what we check
    for name in ("num_io_tensors", "get_tensor_name", "set_input_shape", "set_tensor_address", "execute_async_v3",
                 "deserialize_cuda_engine", "create_execution_context", "set_device_memory", "device_memory_size_v2"):
        assert name in used, name
    assert problems(api, RUNTIME_SOURCES, RUNTIME_RECEIVERS) == []


def test_runtime_names_exist_in_the_installed_lean_runtime():
    """The real ``tensorrt_lean`` module (pip install tensorrt-lean-cu12): names and docstring signatures.

    Importing it is safe without a GPU; calling into it is not (Runtime() then
    crashes), so only attributes are read.
    """
    trt = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu12 is not installed; the committed dump is checked instead")
    api = live_module_api(trt)
    assert "Runtime" in api.classes and "Builder" not in api.classes
    assert problems(api, RUNTIME_SOURCES, RUNTIME_RECEIVERS) == []


def test_installed_lean_runtime_matches_its_dump():
    trt = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu12 is not installed")
    if trt.__version__ != "11.4.0.106":
        pytest.skip(f"installed tensorrt_lean is {trt.__version__}; the dump is of 11.4.0.106")
    live, dump = live_module_api(trt), parse_dump(DUMPS / LEAN_DUMP)
    for cls in ("Runtime", "ICudaEngine", "IExecutionContext"):
        assert set(dump.classes[cls].methods) <= set(live.classes[cls].methods) | set(live.classes[cls].attrs)
        assert set(dump.classes[cls].props) <= set(live.classes[cls].props)


def test_cuda_python_names_exist():
    rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    tree = ast.parse((ROOT / "infiniteid/trt/cuda.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("rt", "cudart()"):
            names.add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and ast.unparse(node.value.value) in ("rt", "cudart()"):
            names.add(f"{node.value.attr}.{node.attr}")
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaStreamBeginCapture", "cudaGraphLaunch"} <= names
    missing = []
    for n in sorted(names):
        obj = rt
        for part in n.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(n)
    assert missing == []


def test_no_integer_enum_literals_or_removed_apis_in_tensorrt_code():
    """Enums renumbered between 10 and 11 must be written by name; 11.x removed APIs must not appear."""
    removed = ("BuilderFlag.FP16", "int8_calibrator", "EXPLICIT_BATCH",
               "create_execution_context_without_device_memory", "platform_has_fast_fp16", "get_binding_")
    for rel in BUILDER_SOURCES + RUNTIME_SOURCES:
        text = (ROOT / rel).read_text()
        for r in removed:
            assert r not in text, f"{rel} uses {r!r}"
        assert not re.search(r"engine\.device_memory_size(?!_v2)", text), f"{rel}: use device_memory_size_v2"
        assert not re.search(r"(set_flag|create_network|set_preview_feature)\(\s*\d", text), rel


def test_runtime_modules_import_without_tensorrt_torch_or_a_gpu():
    import subprocess

    code = (
        "import sys\n"
        "import infiniteid.runtime.trt_backend, infiniteid.trt.runner, infiniteid.trt.engine_check, "
        "infiniteid.trt.step_graph, infiniteid.trt.cuda\n"
        "bad = [m for m in ('torch', 'tensorrt', 'tensorrt_lean', 'onnx', 'diffusers') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_polygraphy_names_and_keywords_exist():
    """``check --against polygraphy`` (its TrtRunner path runs only on a GPU): every Polygraphy name we import
    exists in the installed package, and every call's keywords are in the signature."""
    import importlib
    import inspect

    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    tree = ast.parse((ROOT / "infiniteid/trt/polygraphy_side.py").read_text())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polygraphy"):
            for a in node.names:
                imported[a.asname or a.name] = (node.module, a.name)
    assert {"TrtRunner", "EngineFromBytes", "OnnxrtRunner", "SessionFromOnnx", "Comparator", "RunResults",
            "IterationResult", "save_json", "G_LOGGER"} <= set(imported)
    objects = {}
    for local, (module, name) in imported.items():
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None and name == "SimpleCompareFunc":
            continue  # older Polygraphy: the code falls back to CompareFunc.simple
        assert obj is not None, f"{module}.{name}"
        objects[local] = obj
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in objects:
            obj = objects[node.func.id]
            sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
            params = [p for p in sig.parameters if p != "self"]
            for kw in node.keywords:
                assert kw.arg in params, f"{node.func.id}({kw.arg}=...) is not in {params}"
            assert len(node.args) <= len(params), node.func.id
    for attr in ("module_severity", "WARNING", "CRITICAL"):
        assert hasattr(objects["G_LOGGER"], attr)
    for method in ("activate", "deactivate", "infer"):
        assert callable(getattr(objects["TrtRunner"], method)) and callable(getattr(objects["OnnxrtRunner"], method))
    assert callable(objects["Comparator"].compare_accuracy) and callable(objects["RunResults"].save)
