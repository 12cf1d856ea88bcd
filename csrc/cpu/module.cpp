// Python module `infertrix._C`. Importing it loads this shared library, whose
// TORCH_LIBRARY_IMPL blocks (in the other files) register every compiled kernel with the PyTorch
// dispatcher. The functions here only report and steer the run-time ISA choice. Plain Python C
// API on purpose: pybind11/torch/extension.h would triple the build time for three functions.
#include <Python.h>

#include <stdexcept>
#include <string>

#include "cpu_isa.h"

namespace {

PyObject* detected_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(infertrix::isa_name(infertrix::detected_isa()));
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(infertrix::isa_name(infertrix::active_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    return PyUnicode_FromString(infertrix::isa_name(infertrix::set_requested_isa(name)));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"detected_cpu_isa", detected_cpu_isa, METH_NOARGS, "Best instruction set this CPU supports"},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set the CPU kernels use now"},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Request an instruction set (auto, avx512_vnni, avx2, scalar); returns the active one"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "infertrix compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // torch the extension was compiled against; ops/_extension.py refuses a mismatch.
  PyModule_AddStringConstant(m, "built_with_torch", INFERTRIX_TORCH_VERSION);
#ifdef INFERTRIX_WITH_CUDA
  PyModule_AddObject(m, "with_cuda", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "with_cuda", Py_NewRef(Py_False));
#endif
  return m;
}
