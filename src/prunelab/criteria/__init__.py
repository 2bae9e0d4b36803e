"""Criteria: one module per paper or baseline, each registering its methods on import.

A criterion is ``fn(model, params, *, data, generator, **options) -> {parameter name: score}`` where a
higher score means more important. It knows nothing of training, schedules or the CLI.
"""

import importlib
import pkgutil

# Import every module of this package so each registers its methods (adding a method = adding a file).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
