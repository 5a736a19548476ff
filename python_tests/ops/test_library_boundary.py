"""The library (distillm_ext, minus distillm_ext.recipe) needs torch alone: it imports and works
with the recipe, transformers and datasets made unimportable."""

import json
import subprocess
import sys

PROBE = """
import json, pkgutil, sys
for blocked in ("transformers", "datasets", "distillm_ext.recipe"):
    sys.modules[blocked] = None  # `import blocked` now raises ImportError
import importlib
import torch
import distillm_ext
library = [m.name for m in pkgutil.iter_modules(distillm_ext.__path__, "distillm_ext.")
           if m.name not in ("distillm_ext.recipe", "distillm_ext._C")]
for name in library:
    importlib.import_module(name)
student, teacher = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7)
distillm_ext.make_loss("srkl")(student, teacher).backward()
buffer = distillm_ext.ReplayBuffer(capacity=4, max_length=5)
buffer.push(torch.ones(2, 5, dtype=torch.long), torch.tensor([1, 2]), torch.tensor([5, 4]))
buffer.sample(2)
print(json.dumps({"library": library, "loaded": sorted(name for name, module in sys.modules.items()
                     if name.startswith("distillm_ext") and module is not None)}))
"""


def test_library_imports_and_works_without_the_recipe_or_its_dependencies():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"distillm_ext.ops", "distillm_ext.losses", "distillm_ext.replay"} <= set(report["library"])
    assert not [name for name in report["loaded"] if name.startswith("distillm_ext.recipe")]
