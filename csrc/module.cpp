// quantkit._C: native CPU kernels for the torch.ops.quantkit ops defined in quantkit/_ops.py.
//
// The schemas, fake impls, autograd and the pure-torch reference live in Python; the C++
// side only registers CPU kernels for the same ops (TORCH_LIBRARY_IMPL), so importing the
// module is enough to switch the CPU dispatch key to native code. The registrations live in
// one file per format, csrc/ops/<format>_ops.cpp (static initializers of this same shared
// object); this file is only the module init. It deliberately avoids <torch/extension.h> /
// pybind11 (a ~25 s header) and exposes a plain CPython module.
#include <Python.h>

#include "cpu/bitstack_linear.h"
#include "cpu/dualbin_linear.h"
#include "cpu/lut4_linear.h"

// ---- Python module: loading it runs the static registrations in csrc/ops/*.cpp ----------
namespace {
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(quantkit::cpu::lut4_cpu_isa()); }
PyObject* bitstack_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(quantkit::cpu::bitstack_cpu_isa());
}
PyObject* dualbin_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(quantkit::cpu::dualbin_cpu_isa()); }

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Vector ISA the lut4 CPU kernels use: avx512, avx2 or scalar."},
    {"bitstack_cpu_isa", bitstack_cpu_isa, METH_NOARGS, "Vector ISA the BitStack CPU kernels use."},
    {"dualbin_cpu_isa", dualbin_cpu_isa, METH_NOARGS, "ISA of the dualbin CPU kernel: avx512 or scalar."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "quantkit native kernels; importing registers CPU impls of torch.ops.quantkit.*",
                       -1, kMethods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
