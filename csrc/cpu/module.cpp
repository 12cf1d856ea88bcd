// Python module `infertrix._C`: loading it registers every compiled kernel with the PyTorch
// dispatcher (TORCH_LIBRARY_IMPL blocks in the other files); the functions here only report and
// steer the run-time ISA choice.
#include <torch/extension.h>

#include "cpu_isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "infertrix compiled kernels";
  m.def("detected_cpu_isa", [] { return std::string(infertrix::isa_name(infertrix::detected_isa())); },
        "Best instruction set this CPU supports");
  m.def("cpu_isa", [] { return std::string(infertrix::isa_name(infertrix::active_isa())); },
        "Instruction set the CPU kernels use now");
  m.def("set_cpu_isa",
        [](const std::string& name) {
          return std::string(infertrix::isa_name(infertrix::set_requested_isa(name)));
        },
        "Request an instruction set (auto, avx512_vnni, avx2, scalar); returns the active one");
#ifdef INFERTRIX_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // torch the extension was compiled against; ops/_backend.py refuses a mismatch.
  m.attr("built_with_torch") = INFERTRIX_TORCH_VERSION;
}
