"""cffi builder for tunproxy._fastpath_cffi (used by setup.py's cffi_modules; not installed).

The C is in tunproxy/fastpath_c/, a file per concern, all compiled into the module.
The declarations come from its one public header, tunproxy/fastpath_c/fastpath.h,
minus the preprocessor lines, so the header is the single source of truth.
The system structs the ring embeds are declared with ``...;``: cffi learns
their size from the compiler, which is all Python needs to allocate arrays of
them.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
C_DIR = HERE / "tunproxy" / "fastpath_c"
HEADER = C_DIR / "fastpath.h"
# Sorted, so the build does not depend on the directory's order.
SOURCES = sorted(C_DIR.glob("*.c"))
SYSTEM_STRUCTS = """
struct sockaddr_in { ...; };
struct iovec { ...; };
struct mmsghdr { ...; };
"""


def _cdef_text(header: Path) -> str:
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _source_path(path: Path) -> str:
    # setuptools wants sources relative to the project root, which is the cwd
    # under both `setup.py build_ext` and pip; fall back to absolute.
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef(SYSTEM_STRUCTS + _cdef_text(HEADER))
ffibuilder.set_source(
    "tunproxy._fastpath_cffi",
    '#include "fastpath.h"',
    sources=[_source_path(path) for path in SOURCES],
    include_dirs=[str(C_DIR)],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
