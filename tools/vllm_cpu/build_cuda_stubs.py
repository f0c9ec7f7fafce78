"""Build tiny stub libraries that let the registry's CUDA torchvision load next to CPU torch.

The only torchvision wheel that matches torch 2.13.0 is a CUDA build. Its ``_C.so``
lists ``libc10_cuda.so`` and ``libtorch_cuda.so`` as needed libraries and refers to
a handful of ``c10::cuda`` / ``at::cuda`` symbols that CPU torch does not ship, so
``import torchvision`` fails. None of those functions is ever called on a CPU-only
machine; they only have to exist for the dynamic loader.

This script reads the undefined symbols of ``torchvision/_C.so`` (``nm -D``), writes
one C source per missing library that defines each of them under its mangled name
(C does not mangle, so the mangled C++ name is a valid C identifier), and compiles
each into a shared library whose SONAME matches the needed name. Preloading these
libraries (``LD_PRELOAD``; the list is written to ``OUT_DIR/ld_preload``) satisfies
the loader. If the CUDA runtime
(``libcudart.so.13``) is not installed system-wide, a stub for it is built the same
way, with the symbol version the references require.

Usage: ``python build_cuda_stubs.py OUT_DIR`` with the venv's python (it imports
nothing from torch; it only locates ``torchvision`` and ``torch/lib`` in site-packages).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Libraries that the CPU torch wheel does not ship, and the C++ namespace whose
# symbols each one would provide in a CUDA build.
NAMESPACE_LIBRARIES: dict[str, str] = {
    "c10::cuda::": "libc10_cuda.so",
    "at::cuda::": "libtorch_cuda.so",
}


# File in OUT_DIR holding the colon-separated absolute paths for LD_PRELOAD.
PRELOAD_FILE = "ld_preload"


@dataclass
class StubLibrary:
    """One stub shared library: its SONAME, symbol version (if any) and symbols."""

    soname: str
    version: str | None = None
    functions: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)

    def c_source(self) -> str:
        """C source defining every symbol: functions return 0, variables are zero."""
        lines = [f"/* Stub definitions for {self.soname}; never called on CPU. */"]
        lines += [f"void *{name} = 0;" for name in sorted(self.variables)]
        lines += [f"long {name}(void) {{ return 0; }}" for name in sorted(self.functions)]
        return "\n".join(lines) + "\n"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed in {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations)))


def run(args: list[str]) -> str:
    """Run a command and return its standard output; fail loudly on error."""
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def undefined_symbols(library: Path) -> list[tuple[str, str | None]]:
    """Undefined dynamic symbols of ``library`` as ``(name, version or None)``."""
    symbols = []
    for line in run(["nm", "-D", "--undefined-only", str(library)]).splitlines():
        token = line.split()[-1]
        name, _, version = token.partition("@")
        symbols.append((name, version or None))
    return symbols


def demangle(names: list[str]) -> dict[str, str]:
    """Map each mangled C++ name to its demangled form (C names map to themselves)."""
    out = run(["c++filt"] + names).splitlines() if names else []
    return dict(zip(names, out, strict=True))


def needed_libraries(library: Path) -> list[str]:
    """SONAMEs listed as NEEDED in the dynamic section of ``library``."""
    dynamic = run(["readelf", "-d", str(library)])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)


def system_has(soname: str) -> bool:
    """Whether the system loader cache knows a library with this SONAME."""
    return any(line.strip().startswith(soname + " ") for line in run(["ldconfig", "-p"]).splitlines())


def plan_stubs(torchvision_c: Path, torch_lib: Path, force: set[str]) -> list[StubLibrary]:
    """Decide which stub libraries to build and which symbols each defines."""
    symbols = undefined_symbols(torchvision_c)
    readable = demangle([name for name, _ in symbols])
    stubs: dict[str, StubLibrary] = {}

    def add(soname: str, name: str, version: str | None) -> None:
        stub = stubs.setdefault(soname, StubLibrary(soname=soname, version=version))
        is_function = "(" in readable[name] or not name.startswith("_Z")
        (stub.functions if is_function else stub.variables).add(name)

    missing = {
        lib
        for lib in needed_libraries(torchvision_c)
        if not (torch_lib / lib).exists() and (lib in force or not system_has(lib))
    }
    for name, version in symbols:
        if version is not None:
            if version in missing:
                add(version, name, version)
            continue
        for namespace, soname in NAMESPACE_LIBRARIES.items():
            if readable[name].startswith(namespace):
                add(soname, name, None)
    return [stubs[key] for key in sorted(stubs)]


def compile_stub(stub: StubLibrary, out_dir: Path) -> Path:
    """Write the stub's C source (and version script) under ``src/`` and compile it."""
    source = out_dir / "src" / f"{stub.soname}.c"
    source.parent.mkdir(exist_ok=True)
    source.write_text(stub.c_source())
    target = out_dir / stub.soname
    command = ["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{stub.soname}", "-o", str(target)]
    if stub.version:
        script = out_dir / "src" / f"{stub.soname}.map"
        script.write_text(f"{stub.version} {{ global: *; }};\n")
        command.append(f"-Wl,--version-script={script}")
    run(command + [str(source)])
    return target


def main() -> None:
    """Parse arguments, build the stubs into OUT_DIR and print their paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the stub libraries")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="SONAME",
        help="stub this needed library even if the system has it (to test the fallback)",
    )
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is required to build the stub libraries (apt-get install gcc)")

    torchvision_c = package_dir("torchvision") / "_C.so"
    torch_lib = package_dir("torch") / "lib"
    if args.out_dir.exists():
        shutil.rmtree(args.out_dir)
    args.out_dir.mkdir(parents=True)
    built = []
    for stub in plan_stubs(torchvision_c, torch_lib, set(args.force)):
        path = compile_stub(stub, args.out_dir).resolve()
        built.append(str(path))
        print(f"built {path} ({len(stub.functions) + len(stub.variables)} symbols)")
    # serve.sh reads this file to set LD_PRELOAD.
    (args.out_dir / PRELOAD_FILE).write_text(":".join(built) + "\n")


if __name__ == "__main__":
    main()
