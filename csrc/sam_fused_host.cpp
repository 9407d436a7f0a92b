// Host-side helpers of the CPU library that Python calls per pass, where a loop in Python
// would cost more than the fused kernels themselves: plain CPython functions on the
// library's module (sam_fused._C_cpu), not dispatcher operations, since turning a Python
// list of 2000 tensors into a TensorList costs about 100 ns a tensor and reading one
// address here costs about 6 ns.
//
// same_addresses(params: list[Tensor], recorded: Tensor) -> bool
//   Whether params[i]'s data pointer equals recorded[i] for every i (recorded: a contiguous
//   CPU int64 tensor of len(params) entries). sam_fused/addresses.py calls it before every
//   fused pass: a parameter moved by model.share_memory() or p.data = ... must never be
//   written through a stale address.

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>

namespace sam_fused {
namespace {

PyObject* same_addresses(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !THPVariable_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "same_addresses(params: list[Tensor], recorded: Tensor)");
    return nullptr;
  }
  try {
    PyObject* params = args[0];
    const at::Tensor& recorded = THPVariable_Unpack(args[1]);
    const Py_ssize_t n = PyList_GET_SIZE(params);
    if (!recorded.device().is_cpu() || recorded.scalar_type() != at::kLong || !recorded.is_contiguous() ||
        recorded.numel() != static_cast<int64_t>(n)) {
      Py_RETURN_FALSE;  // recorded for another list (or never): the caller records anew
    }
    const int64_t* expected = recorded.const_data_ptr<int64_t>();
    // no early exit: the loads of different tensors then overlap (about 6 ns a tensor where
    // stopping at the first difference took 11); tensors that moved are the rare case
    bool same = true;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(item) && !THPVariable_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "same_addresses: params must hold tensors only");
        return nullptr;
      }
      // the address Tensor.data_ptr() returns: the storage's data plus the offset (read as
      // fields: TensorBase::const_data_ptr() adds checks that double the cost); a tensor
      // without storage (a wrapper subclass) never matches
      const c10::TensorImpl* impl = THPVariable_Unpack(item).unsafeGetTensorImpl();
      const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
      if (storage == nullptr) {
        Py_RETURN_FALSE;
      }
      const char* data = static_cast<const char*>(storage->data_ptr().get());
      const auto address = reinterpret_cast<int64_t>(data + impl->storage_offset() * impl->itemsize());
      same &= (impl->numel() == 0 ? 0 : address) == expected[i];  // an empty tensor's data_ptr() is 0
    }
    if (!same) {
      Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

}  // namespace
}  // namespace sam_fused

// The method table sam_fused_cpu.cpp gives the library's Python module.
PyMethodDef sam_fused_host_methods[] = {
    {"same_addresses", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&sam_fused::same_addresses)),
     METH_FASTCALL, "Whether every tensor of a list is at its recorded address."},
    {nullptr, nullptr, 0, nullptr},
};
