"""Old home of the LoRA adapters, kept for pickles only.

Checkpoints written before the package was split into subpackages pickle the MACE
trunk of file-based models whole, LoRA adapters included, under this module's name.
The adapters live in :mod:`metatrain_mace.finetune.lora`.
"""

from metatrain_mace.finetune.lora import EquivariantLoRA, LinearLoRA


__all__ = ["EquivariantLoRA", "LinearLoRA"]
