"""Build the Cython kernels in sparsecnn/_cpu with OpenMP.

Environment variables:
  SPARSECNN_NO_OPENMP=1   build without OpenMP (kernels run single-threaded)
  SPARSECNN_DEBUG=1       turn bounds checking and wraparound back on (slow; for debugging)
  SPARSECNN_PORTABLE=1    do not tune for this machine's CPU (-march=native is used by
                          default when the compiler accepts it); set it when building a wheel
                          for other machines
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
OMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0);
        return 0;
    }
    """
)


def _compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()[0]


def openmp_works() -> bool:
    """Compile and run a tiny OpenMP program with the compiler setuptools will use."""
    cc = _compiler()
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp_test.c")
        exe = Path(tmp, "omp_test")
        src.write_text(OMP_TEST)
        try:
            subprocess.run([cc, "-fopenmp", str(src), "-o", str(exe)], check=True,
                           capture_output=True, timeout=120)
            out = subprocess.run([str(exe)], check=True, capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError):
            return False
        return out.stdout.strip() == b"1"


def arch_flags() -> list[str]:
    """-march=native when the compiler takes it (wide vectors in the row loops), unless
    SPARSECNN_PORTABLE is set."""
    if os.environ.get("SPARSECNN_PORTABLE"):
        print("sparsecnn: SPARSECNN_PORTABLE is set; building for a generic CPU.")
        return []
    cc = _compiler()
    if shutil.which(cc) is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "arch_test.c")
        src.write_text("int main(void) { return 0; }\n")
        try:
            subprocess.run([cc, "-march=native", "-c", str(src), "-o", str(Path(tmp, "a.o"))],
                           check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError):
            return []
    return ["-march=native"]


def openmp_flags() -> list[str]:
    if os.environ.get("SPARSECNN_NO_OPENMP"):
        print("sparsecnn: SPARSECNN_NO_OPENMP is set; building single-threaded kernels.")
        return []
    if openmp_works():
        return ["-fopenmp"]
    bar = "*" * 78
    msg = f"""
    {bar}
    sparsecnn: the C compiler ({_compiler()}) could not build an OpenMP program with -fopenmp.

    The CPU kernels use OpenMP for multi-threading. Either
      * install a compiler with OpenMP support (Debian/Ubuntu: `apt-get install gcc`;
        macOS: `brew install libomp` and set CC to a compiler that finds it), or
      * build without threads:  SPARSECNN_NO_OPENMP=1 pip install .
    {bar}
    """
    sys.exit(textwrap.dedent(msg))


def extensions() -> list[Extension]:
    omp = openmp_flags()
    debug = bool(os.environ.get("SPARSECNN_DEBUG"))
    compile_args = ["-O3", *arch_flags(), *omp] if not debug else ["-O0", "-g", *omp]
    exts = []
    for pyx in sorted((HERE / "sparsecnn" / "_cpu").glob("*.pyx")):
        name = f"sparsecnn._cpu.{pyx.stem}"
        exts.append(Extension(
            name, [str(pyx.relative_to(HERE))],
            include_dirs=[np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args,
            extra_link_args=omp,
        ))
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "binding": True,
        "embedsignature": True,
    }
    return cythonize(exts, compiler_directives=directives)


setup(ext_modules=extensions())
