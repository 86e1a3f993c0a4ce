"""Checkpoints and export of :class:`~metatrain_mace.model.MetaMACE` (a mixin)."""

import logging
import types
from typing import TYPE_CHECKING, Any, Dict, Literal, Optional

import torch
from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata
from metatrain.utils.dtype import dtype_to_str
from metatrain.utils.metadata import merge_metadata

from metatrain_mace import checkpoints
from metatrain_mace._version import __version__
from metatrain_mace.checkpoints import ARCHITECTURE_NAME, save_model_atomically
from metatrain_mace.finetune import lora
from metatrain_mace.finetune import strategies as finetuning  # RENAME
from metatrain_mace.tools import provenance
from metatrain_mace.trunk import backend
from metatrain_mace.trunk.scripting import compiled_copy, tree_copy


if TYPE_CHECKING:
    from metatrain_mace.model import MetaMACE


class CheckpointsAndExport:
    """Methods of :class:`MetaMACE` that save, load and export it."""

    def get_checkpoint(self) -> Dict[str, Any]:
        # checkpoints hold e3nn weights whatever the backend (readable without
        # cuEquivariance); 'enable_cueq' in the hypers records the backend
        source = self.e3nn_copy()
        state_dict = source.state_dict()
        return {
            "architecture_name": ARCHITECTURE_NAME,
            "implementation": f"metatrain-mace {__version__}",
            "model_ckpt_version": self.__checkpoint_version__,
            "metadata": self.metadata,
            "model_data": {
                "model_hypers": self.hypers,
                "dataset_info": self.dataset_info,
                # a trunk loaded from a MACE file travels with the checkpoint, so
                # that the file is not needed any more
                "mace_trunk": source.mace if self.from_file else None,
            },
            "epoch": None,
            "best_epoch": None,
            "model_state_dict": state_dict,
            "best_model_state_dict": state_dict,
            "finetune_config": self.finetune_config,
        }

    @classmethod
    def load_checkpoint(
        cls,
        checkpoint: Dict[str, Any],
        context: Literal["restart", "finetune", "export"],
    ) -> "MetaMACE":
        if context == "restart":
            logging.info(f"Using latest model from epoch {checkpoint['epoch']}")
            state_dict = checkpoint["model_state_dict"]
        elif context in ("finetune", "export"):
            logging.info(f"Using best model from epoch {checkpoint['best_epoch']}")
            state_dict = checkpoint["best_model_state_dict"]
            if state_dict is None:
                state_dict = checkpoint["model_state_dict"]
        else:
            raise ValueError(f"unknown checkpoint loading context {context!r}")

        model_data = checkpoint["model_data"]
        hypers = model_data["model_hypers"]
        model = cls.with_architecture(model_data, checkpoint.get("finetune_config"))
        model.set_weights(state_dict)
        model.loaded_for_restart = context == "restart"
        if hypers.get("enable_cueq") and context != "export":
            if context == "finetune" and not backend.cueq_available():
                logging.info(
                    "The checkpoint was trained with cuEquivariance, which is not "
                    "installed: fine-tuning on e3nn (same weights)"
                )
            else:
                model.set_backend(True)
        model.finetune_config = checkpoint.get("finetune_config", {})
        model.metadata = merge_metadata(model.metadata, checkpoint.get("metadata"))
        return model

    @classmethod
    def with_architecture(
        cls, model_data: Dict[str, Any], finetune_config: Optional[Dict[str, Any]]
    ) -> "MetaMACE":
        """An e3nn model of the architecture recorded in a checkpoint's
        ``model_data`` and ``finetune_config``, with fresh weights."""
        hypers = model_data["model_hypers"]
        model = cls(
            {**hypers, "enable_cueq": False},
            model_data["dataset_info"],
            mace=model_data.get("mace_trunk"),
        )
        # readout heads and LoRA adapters are modules of their own: insert them
        # before the weights (in the order fine-tuning added them)
        finetuning.restore_readout_heads(model, finetune_config)
        lora.restore_adapters(model, finetune_config or {})
        return model

    def set_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load e3nn weights (of a checkpoint or an exported model), in their dtype."""
        dtype = state_dict["avg_num_neighbors"].dtype
        self.to(dtype).load_state_dict(state_dict)
        if float(self.avg_num_neighbors) > 0:
            self.set_avg_num_neighbors(float(self.avg_num_neighbors))
        self.additive_models[0].sync_tensor_maps()
        self.scaler.sync_tensor_maps()

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        return checkpoints.upgrade(
            checkpoint, "model", cls.__checkpoint_version__, checkpoints.MODEL_UPDATES
        )

    def __prepare_scriptable__(self) -> "MetaMACE":
        """A shallow copy whose e3nn/MACE submodules are compiled as e3nn requires.

        ``torch.jit.script`` (used by metatomic to save the exported model) calls this
        first; e3nn modules cannot be scripted directly. The copy shares the
        parameters and leaves this model usable in eager mode.
        """
        return compiled_copy(self, drop=[("mace", "joint_embedding")])

    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        if self.uses_cueq:
            # TorchScript cannot compile cuEquivariance's modules in reasonable
            # time (and metatomic's engines load TorchScript): export on e3nn
            logging.info(
                "Exporting with the e3nn backend (same weights): the exported "
                "model is TorchScript, which cuEquivariance's modules are not"
            )
            e3nn = self.e3nn_copy()
            dtype = next(self.parameters()).dtype
            e3nn.check_parity(self, 1e-10 if dtype == torch.float64 else 1e-4)
            return e3nn.export(metadata)
        dtype = next(self.parameters()).dtype
        if dtype not in self.__supported_dtypes__:
            raise ValueError(f"unsupported dtype {dtype} for metatrain-mace")
        self.to(dtype)
        # the composition weights are TensorMaps that torch cannot move by itself
        self.additive_models[0].weights_to(torch.device("cpu"), torch.float64)
        capabilities = ModelCapabilities(
            outputs=self.outputs,
            atomic_types=self.atomic_types,
            interaction_range=self.num_interactions * self.r_max,
            length_unit=self.dataset_info.length_unit,
            supported_devices=self.__supported_devices__,
            dtype=dtype_to_str(dtype),
        )
        # metatomic freezes the parameters of what it wraps: give it a copy sharing
        # the weights, so that this model can still be trained afterwards
        module = tree_copy(self).eval()
        # what tools that look inside the model need to rebuild it in Python
        setattr(module, provenance.ATTRIBUTE, provenance.record(self))
        exported = AtomisticModel(
            module,
            merge_metadata(self.metadata, metadata),
            capabilities,
        )
        # whoever saves it (metatrain's mtt train and mtt export, this package)
        # writes a temporary file and renames it: a crash leaves no half model
        exported.save = types.MethodType(save_model_atomically, exported)
        return exported
