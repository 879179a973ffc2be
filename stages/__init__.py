"""Built-in stages. Importing this package registers each stage's config model with the core.

Only light modules (config models) are imported here: heavy work lives in each stage's ``run`` module,
imported when the stage actually runs.
"""

import importlib

for _name in ("dedupe", "filter", "tokenize", "pretrain", "sft", "dpo", "evaluate"):
    try:
        importlib.import_module(f"stages.{_name}")
    except ModuleNotFoundError as e:  # a stage not written yet is simply not available
        if e.name != f"stages.{_name}":
            raise
