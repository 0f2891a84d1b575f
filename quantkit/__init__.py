"""quantkit: compress PyTorch language models and run them on packed-weight kernels.

Public API (small on purpose):
    quantkit.compress(model_or_path, recipe) -> nn.Module   apply a recipe's passes
    quantkit.save(model, out_dir)                             write an artifact folder
    quantkit.load(out_dir) -> nn.Module                       read it back (transformers model)
    quantkit.load_model(name_or_path) -> nn.Module            artifact, HF folder, .gguf, smollm2-135m
    quantkit.export(out_dir, to, dest)                        hf-bnb / onnx deployment export
    quantkit.generate(model, tokenizer, prompt, ...)          static-KV-cache decode loop (greedy / sampling)
    quantkit.Recipe, quantkit.load_recipe                     recipes (YAML -> frozen dataclasses)
    quantkit.qat                                              QAT: plan / prepare / step / convert
                                                              (imported on first use)
With quantkit imported, transformers' ``AutoModelForCausalLM.from_pretrained(OUT)`` loads any
artifact onto the packed modules and peft's ``get_peft_model`` puts LoRA on them
(quantkit/integrations).

Importing quantkit never initialises CUDA and works without the compiled extension.
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (must precede the native extension import in _ops)

from quantkit import _ops  # noqa: F401  (registers torch.ops.quantkit.*)
from quantkit import integrations as _integrations
from quantkit.api import compress, load_model
from quantkit.errors import QuantkitError
from quantkit.export import export
from quantkit.io.artifact import load, save
from quantkit.recipe import Recipe, load_recipe
from quantkit.runtime import generate

_integrations.install()  # transformers' from_pretrained and peft's LoRA, once those are imported


def __getattr__(name):
    # quantkit.qat is imported on first use so `import quantkit` stays light
    if name == "qat":
        import importlib

        return importlib.import_module("quantkit.qat")
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


__all__ = ["compress", "save", "load", "load_model", "export", "generate", "Recipe", "load_recipe", "QuantkitError", "__version__"]
