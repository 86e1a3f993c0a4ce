"""Names of the model's parameters as users write them, and as the model has them.

The MACE trunk of :class:`~metatrain_mace.model.MetaMACE` is a module of its own
(``trunk``) since model checkpoint version 5, so its parameters are
``trunk.mace.*`` and ``trunk.conditioning.*``. The names users give in the hypers
(LoRA ``target_modules`` such as ``mace.interactions.*.linear``, fine-tuning
``last_layer_modules`` such as ``mace.readouts``, ``frozen_layers``,
``lr_factors`` blocks) and those recorded in ``finetune_config`` keep the names of
the MACE model itself: :func:`user_name` and :func:`model_name` translate.
"""

from typing import Dict, TypeVar


TRUNK = "trunk."
"""Prefix of the trunk's parameters and buffers in the model."""
_MOVED = ("mace", "conditioning", "avg_num_neighbors")

Value = TypeVar("Value")


def _moved(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _MOVED)


def user_name(name: str) -> str:
    """The name users write for the parameter or module ``name`` of the model
    (``trunk.mace.readouts.0`` -> ``mace.readouts.0``)."""
    if name.startswith(TRUNK) and _moved(name[len(TRUNK) :]):
        return name[len(TRUNK) :]
    return name


def model_name(name: str) -> str:
    """The name in the model of the parameter or module users call ``name``
    (``mace.readouts.0`` -> ``trunk.mace.readouts.0``); also the version-5 name
    of a state-dict key of earlier versions."""
    return TRUNK + name if _moved(name) else name


def to_version_5(state_dict: Dict[str, Value]) -> Dict[str, Value]:
    """A state dict of model version 4 or earlier under the names of version 5,
    in the same order."""
    renamed = type(state_dict)((model_name(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # module versions, by module prefix ("" is the model)
        renamed._metadata = type(metadata)(  # type: ignore[attr-defined]
            (model_name(k) if k else k, v) for k, v in metadata.items()
        )
    return renamed
