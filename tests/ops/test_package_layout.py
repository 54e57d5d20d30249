"""flowkern.ops: the functions are the API, each op family lives in its own module, and no function shadows a
module (`import flowkern.ops.<family>_ops as m` must give the module)."""
import importlib
import pkgutil
import types

import flowkern.ops


def test_no_function_shadows_an_op_module():
    modules = [info.name for info in pkgutil.iter_modules(flowkern.ops.__path__)]
    assert modules, "no op modules found"
    for name in modules:
        assert isinstance(getattr(flowkern.ops, name), types.ModuleType), name
        assert importlib.import_module(f"flowkern.ops.{name}") is getattr(flowkern.ops, name)
    for name in flowkern.ops.__all__:
        assert callable(getattr(flowkern.ops, name)) and name not in modules, name
