"""Integrations with other libraries, each optional: quantkit never requires them.

    peft_lora   LoRA / DoRA adapters (peft) on every packed linear format; ``register_peft()``
"""
