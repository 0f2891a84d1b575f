"""Integrations with other libraries, each optional: quantkit never requires them.

    transformers_quantizer  ``AutoModelForCausalLM.from_pretrained(OUT)`` loads any artifact
                            onto the packed modules; ``save_pretrained`` writes one back
    peft_lora               LoRA / DoRA adapters (peft) on every packed linear format; ``register_peft()``

``install()`` (run by ``import quantkit``) arranges both registrations without importing
either library: each happens right after that library is imported (``_after_import``).
"""

from __future__ import annotations

TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"


def register_transformers() -> None:
    """Register quantkit's quantizer with transformers now (imports transformers). Idempotent."""
    import sys

    partial = sys.modules.get(__name__ + ".transformers_quantizer")
    if partial is not None and not hasattr(partial, "register"):
        return  # that module is being imported (it imports transformers); it registers at its end
    from quantkit.integrations import transformers_quantizer

    transformers_quantizer.register()


def install() -> None:
    """Register with transformers and peft as soon as each is imported (now, if it already is)."""
    from quantkit.integrations._after_import import after_import
    from quantkit.integrations.peft_lora import register_peft

    after_import(TRANSFORMERS_REGISTRY, register_transformers)
    register_peft()
