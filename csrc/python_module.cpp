// Makes the op library importable as the Python module mosx._C: importing it loads the shared
// library, whose static initialisers register the ops with torch. It defines no Python functions;
// everything is reached through torch.ops.mosx. Only the Python build compiles this file.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
