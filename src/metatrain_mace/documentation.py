"""
MACE (metatrain-mace)
=====================

`MACE <https://github.com/ACEsuit/mace>`_ is a message-passing neural network with
many-body equivariant messages built from atomic cluster expansion products. This
architecture is provided by the ``metatrain-mace`` package, which wraps the official
``mace-torch`` implementation: MACE's own modules compute the node features and the
energy readout, and ``metatrain-mace`` adds a linear head (equivariant targets) or a
small MLP head (invariant targets) on the node features of all MACE layers for every
other target.

The hyperparameters below are validated by metatrain before anything is built; this
module imports neither torch nor mace, so that it can be read cheaply.
"""

from typing import Annotated, Any, Dict, Literal, Optional, Union

from annotated_types import Ge, Gt, Lt
from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict


FixedWeights = Dict[str, Union[float, Dict[int, float]]]
"""Per-target fixed weights: one value for all atomic types, or one per type."""

InteractionBlockName = Literal[
    "RealAgnosticResidualInteractionBlock",
    "RealAgnosticInteractionBlock",
    "RealAgnosticDensityInteractionBlock",
    "RealAgnosticDensityResidualInteractionBlock",
    "RealAgnosticAttResidualInteractionBlock",
    "RealAgnosticResidualNonLinearInteractionBlock",
]


class LossGradientSpecification(TypedDict):
    """Loss settings for one gradient (forces, stress, virial) of a target."""

    type: NotRequired[str] = "mse"
    weight: NotRequired[float] = 1.0
    reduction: NotRequired[Literal["none", "mean", "sum"]] = "mean"


@with_config(ConfigDict(extra="allow"))
class LossSpecification(TypedDict):
    """Loss settings for one target, as understood by metatrain's ``LossAggregator``."""

    type: NotRequired[str] = "mse"
    weight: NotRequired[float] = 1.0
    reduction: NotRequired[Literal["none", "mean", "sum"]] = "mean"
    gradients: NotRequired[Dict[str, LossGradientSpecification]] = {}


class EmbeddingSpec(TypedDict):
    """How MACE embeds one per-structure quantity (an entry of mace-torch's
    ``embedding_specs``)."""

    type: Literal["categorical", "continuous"]
    """``categorical``: one learned vector per integer value (charges, spin
    multiplicities); ``continuous``: a small MLP of the value."""
    emb_dim: Annotated[int, Ge(1)]
    """Size of the embedding vector."""
    num_classes: NotRequired[Annotated[int, Ge(1)]]
    """Number of integer values a categorical quantity can take: ``value +
    offset`` must lie in ``[0, num_classes)``."""
    offset: NotRequired[int]
    """Added to a categorical value before the lookup (for example 10 for charges
    from -10 to 10 with ``num_classes: 21``). Default 0."""


class HeadsFinetuneConfig(TypedDict):
    """Which modules stay trainable with ``method: heads``."""

    head_modules: list[str]
    """Module name prefixes of the heads to train (for example ``heads``)."""
    last_layer_modules: list[str]
    """Further module name prefixes to train (for example ``mace.readouts``)."""


class NoFinetuneHypers(TypedDict):
    """No fine-tuning: train from scratch (or from ``mace_model``)."""

    read_from: None = None
    """``None`` disables fine-tuning; the other keys are then ignored."""
    method: NotRequired[Any]
    config: NotRequired[Any]
    inherit_heads: NotRequired[Any]


class FullFinetuneHypers(TypedDict):
    """Fine-tune every parameter of a trained checkpoint."""

    method: Literal["full"] = "full"
    """Fine-tuning method."""
    read_from: str
    """Path to the checkpoint to start from."""
    config: NotRequired[Any]
    """Unused for ``full``."""
    inherit_heads: Dict[str, str] = {}
    """Initialise the head of a new target (key) from an existing one (value).
    With ``mace_head_target`` as the value, the new target gets a copy of MACE's
    energy readouts (multi-head replay fine-tuning, see the fine-tuning page)."""


class HeadsFinetuneHypers(TypedDict):
    """Train only the heads (and chosen last layers); the MACE trunk is frozen."""

    method: Literal["heads"] = "heads"
    """Fine-tuning method."""
    read_from: str
    """Path to the checkpoint to start from."""
    config: HeadsFinetuneConfig = {
        "head_modules": ["heads"],
        "last_layer_modules": ["mace.readouts"],
    }
    """Trainable module prefixes."""
    inherit_heads: Dict[str, str] = {}
    """Initialise the head of a new target (key) from an existing one (value).
    With ``mace_head_target`` as the value, the new target gets a copy of MACE's
    energy readouts (multi-head replay fine-tuning, see the fine-tuning page)."""


class LoRAFinetuneConfig(TypedDict):
    """Where the low-rank adapters go with ``method: lora``, and their size."""

    rank: int
    """Rank of the adapters (an integer >= 1): every adapted ``o3.Linear`` gets
    ``rank`` copies of each irrep it connects in its bottleneck; a
    ``torch.nn.Linear`` gets the usual rank-``rank`` update."""
    alpha: float
    """The adapters' update is scaled by ``alpha / rank``."""
    target_modules: NotRequired[list[str]]
    """Glob patterns of the names of the linear layers to adapt, matched against
    the whole module name or its last components (``linear`` matches
    ``mace.products.0.linear``). Only e3nn ``o3.Linear`` and ``torch.nn.Linear``
    layers are adapted, and every pattern must match one. Default:
    ``["mace.interactions.*.linear", "mace.products.*.linear"]``."""
    trainable_modules: NotRequired[list[str]]
    """Module name prefixes whose parameters train together with the adapters
    (everything else is frozen). Default: ``["heads"]``, the heads of the targets
    other than ``mace_head_target``; add ``mace.readouts`` to train MACE's own
    energy readout as well, or give ``[]`` to train only the adapters."""


class LoRAFinetuneHypers(TypedDict):
    """Train equivariant low-rank adapters (LoRA) on the frozen MACE trunk."""

    method: Literal["lora"] = "lora"
    """Fine-tuning method."""
    read_from: str
    """Path to the checkpoint to start from."""
    config: LoRAFinetuneConfig
    """Rank, scaling and placement of the adapters."""
    inherit_heads: Dict[str, str] = {}
    """Initialise the head of a new target (key) from an existing one (value).
    With ``mace_head_target`` as the value, the new target gets a copy of MACE's
    energy readouts (multi-head replay fine-tuning, see the fine-tuning page)."""


class LongRangeHypers(TypedDict):
    """Long-range electrostatics learned from the MACE features, with the keys and
    defaults of metatrain's ``LongRangeHypers`` (the ``pet`` architecture's
    ``long_range``), so that options files move between architectures. See
    :ref:`long-range`."""

    enable: bool = False
    """Add a long-range energy: latent charges read from the MACE scalar features
    interact through a Coulomb potential beyond ``r_max`` (Ewald/P3M for periodic
    structures, a direct sum otherwise, with torch-pme), and the resulting
    potentials give a per-atom energy added to MACE's readout. Needs
    ``pip install 'metatrain-mace[long-range]'``. Models built from these
    hyperparameters only (not ``mace_model``)."""
    use_ewald: bool = False
    """Use Ewald summation for periodic structures at evaluation; P3M otherwise.
    Training always uses Ewald (P3M is unstable in training, as in ``pet``)."""
    smearing: Annotated[float, Gt(0)] = 1.4
    """Gaussian smearing of the charges (length unit): the split between the
    real-space and the reciprocal-space parts."""
    kspace_resolution: Annotated[float, Gt(0)] = 1.33
    """Resolution of the reciprocal-space grid (length unit): the Ewald wavelength
    cut-off, or the P3M mesh spacing."""
    interpolation_nodes: Annotated[int, Ge(1)] = 5
    """Number of interpolation nodes of the P3M mesh."""


LONG_RANGE_DEFAULTS: Dict[str, Any] = {
    "enable": False,
    "use_ewald": False,
    "smearing": 1.4,
    "kspace_resolution": 1.33,
    "interpolation_nodes": 5,
}
"""The defaults of :class:`LongRangeHypers` (those of metatrain's)."""


class ModelHypers(TypedDict):
    """Hyperparameters of the MACE model and of the heads added on top of it."""

    mace_model: Optional[str] = None
    """Path to a MACE model file (a whole pickled ``torch.nn.Module`` as written by
    ``mace-torch``) to start from instead of building a new MACE from the
    hyperparameters below, or the name of a MACE foundation model known to
    mace-torch (``mace_mp:medium-mpa-0``, ``mh-1``, ``mace_off:small``,
    ``mace_omol:extra_large``; see :ref:`foundation-models`), taken from
    mace-torch's download cache or downloaded into it.

    Model files are pickles: loading one executes code stored in it. Only point this
    at files you trust.
    """
    mace_head_name: Optional[str] = None
    """Head of a multi-head MACE model file to use. Not needed for single-head
    models; when unset for a multi-head model, the head mace-torch's calculator
    would use (``omol`` for ``mace_omol`` models, else the head called
    ``default``), or an error listing the heads."""
    mace_head_target: str = "energy"
    """Target predicted by MACE's own readout (the per-atom energy readouts). Every
    other target gets a head of its own on the MACE node features."""
    mace_dipole_target: str = "mtt::dipole"
    """Target predicted by the dipole readout of a MACE file of a dipole class
    (``AtomicDipolesMACE``, ``AtomicDielectricMACE``, ``EnergyDipolesMACE``): a
    per-structure Cartesian vector (or spherical ``o3_lambda=1, o3_sigma=1``
    block). Unused for other models (the target, if any, then gets a head of its
    own). See :ref:`response-properties`."""
    mace_polarizability_target: str = "mtt::polarizability"
    """Target predicted by the polarizability readout of an ``AtomicDielectricMACE``
    file: a per-structure symmetric Cartesian rank-2 tensor. Unused for other
    models. See :ref:`response-properties`."""
    r_max: Annotated[float, Gt(0)] = 5.0
    """Cutoff radius (in the length unit of the dataset, usually Å). It sets the
    neighbour list requested from metatomic; the receptive field is
    ``num_interactions * r_max``."""
    num_radial_basis: Annotated[int, Ge(1)] = 8
    """Number of radial basis functions expanding interatomic distances."""
    radial_type: Literal["bessel", "gaussian", "chebyshev"] = "bessel"
    """Family of radial basis functions."""
    num_cutoff_basis: Annotated[int, Ge(1)] = 5
    """Exponent ``p`` of MACE's polynomial cutoff envelope."""
    max_ell: Annotated[int, Ge(0)] = 3
    """Highest degree of the spherical harmonics of the edge directions."""
    interaction: InteractionBlockName = "RealAgnosticResidualInteractionBlock"
    """Interaction block used in every layer but the first."""
    interaction_first: InteractionBlockName = "RealAgnosticResidualInteractionBlock"
    """Interaction block of the first layer."""
    num_interactions: Annotated[int, Ge(1)] = 2
    """Number of message-passing layers."""
    hidden_irreps: str = "128x0e + 128x1o"
    """Irreducible representations of the node features, e.g. ``"128x0e + 128x1o"``
    (all multiplicities must be equal). More channels give more accurate and slower
    models; higher degrees (``2e``, ``3o``) give richer equivariant features.
    Equivariant targets need their irreps here and in the features MACE actually
    fills: the last layer keeps only scalars (so ``num_interactions`` >= 2), degrees
    above ``max_ell`` come from products of order ``correlation``, and irreps of
    unusual parity (``0o``, ``1e``) need ``0o`` here and three interactions. Targets
    needing irreps the features never carry are refused before training."""
    edge_irreps: Optional[str] = None
    """Irreps of the edge features inside the interaction blocks. ``None`` uses the
    MACE default (the full tensor product)."""
    apply_cutoff: bool = True
    """Multiply the radial features by the cutoff envelope."""
    avg_num_neighbors: Optional[Annotated[float, Gt(0)]] = None
    """Normalisation of the neighbour sum. ``None`` computes the average number of
    neighbours within ``r_max`` from the training set when training starts."""
    pair_repulsion: bool = False
    """Add MACE's ZBL pair repulsion to the energy readout."""
    distance_transform: Literal["None", "Agnesi", "Soft"] = "None"
    """Transform applied to distances before the radial basis."""
    correlation: Annotated[int, Ge(1)] = 3
    """Body order of the symmetric product (correlation ``ν`` gives ``ν+1``-body
    messages)."""
    gate: Literal["silu", "tanh", "abs", "None"] = "silu"
    """Non-linearity of the MLP readout of the energy."""
    MLP_irreps: str = "16x0e"
    """Irreps of the hidden layer of the last (non-linear) energy readout."""
    radial_MLP: list[int] = [64, 64, 64]
    """Hidden layer widths of the MLP mapping radial features to weights."""
    embedding_specs: Optional[
        Dict[Literal["total_charge", "total_spin"], EmbeddingSpec]
    ] = None
    """Condition the model on the total charge and/or the spin multiplicity (2S+1)
    of each structure, as mace-torch's ``embedding_specs`` (MACE-OMOL): each is
    embedded and added to the element embedding before the first layer. The model
    then reads the per-system inputs ``charge`` and ``spin_multiplicity`` (from
    ``extra_data`` in training and ``mtt eval``, from ``atoms.info`` in ASE);
    structures without them get MACE's defaults 0 and 1. See
    :ref:`charge-and-spin`. Only per-structure quantities are supported."""
    use_embedding_readout: bool = False
    """Add an energy read out of the charge/spin embedding (MACE's
    ``use_embedding_readout``); needs ``embedding_specs``."""
    use_last_readout_only: bool = False
    """Read the energy out of the last layer only (instead of summing a readout of
    every layer)."""
    use_agnostic_product: bool = False
    """Use element-agnostic weights in the symmetric product."""
    long_range: LongRangeHypers = LONG_RANGE_DEFAULTS
    """Long-range electrostatics (see
    :class:`~metatrain_mace.documentation.LongRangeHypers` and
    :ref:`long-range`)."""
    head_hidden_sizes: list[int] = [64, 64]
    """Hidden layer widths of the MLP heads of invariant targets other than
    ``mace_head_target``. Equivariant targets always use a linear head."""
    enable_cueq: bool = False
    """Run the MACE trunk (its linears, tensor products and symmetric
    contractions) on NVIDIA's cuEquivariance instead of e3nn, as MACE's own
    ``--enable_cueq``: several times faster on GPUs, the same numbers. Needs
    ``pip install 'metatrain-mace[cueq]'`` (and cuequivariance-ops-torch-cu12 or
    -cu13 for the GPU kernels; without them cuEquivariance runs a slow pure-torch
    path). Works for models built from these hyperparameters and from MACE files.
    Checkpoints store e3nn weights and record this setting; the exported model
    always runs e3nn (see :ref:`precision-and-speed`)."""


class TrainerHypers(TypedDict):
    """Hyperparameters of the MACE trainer."""

    optimizer: Literal["adam", "adamw"] = "adam"
    """Optimizer: ``adam`` (L2 penalty) or ``adamw`` (decoupled weight decay)."""
    learning_rate: Annotated[float, Gt(0)] = 1e-2
    """Initial learning rate."""
    weight_decay: Annotated[float, Ge(0)] = 5e-7
    """Weight decay applied, as in MACE, to the weights of the interaction linears,
    the symmetric products and the heads; never to biases, embeddings, radial MLPs
    and readouts."""
    frozen_layers: Annotated[int, Ge(0)] = 0
    """Number of leading MACE layers to keep fixed (fine-tuning): with ``N`` > 0,
    the element embedding (and the charge/spin embedding), and the interaction and
    product blocks of the first ``N`` layers are frozen. Readouts and heads stay
    trainable. Works with full and LoRA fine-tuning (the adapters of frozen layers
    are frozen too). See :ref:`frozen-layers`."""
    lr_factors: Dict[
        Literal["embedding", "interactions", "products", "readouts", "heads"],
        Annotated[float, Ge(0)],
    ] = {}
    """Factors on ``learning_rate`` for the parameters of each block of the model
    (as mace-torch's ``lr_params_factors``): ``embedding`` (element and
    charge/spin embeddings), ``interactions``, ``products``, ``readouts`` (MACE's
    energy readouts) and ``heads`` (the heads of the other targets); 1 for blocks
    not given. A factor of 0 keeps a block fixed. The learning-rate schedule
    scales all blocks alike."""
    amsgrad: bool = True
    """Use the AMSGrad variant of Adam."""
    beta: Annotated[float, Ge(0)] = 0.9
    """First-moment coefficient ``beta1`` of Adam (``beta2`` is 0.999)."""
    lr_scheduler: Literal["ReduceLROnPlateau", "ExponentialLR"] = "ReduceLROnPlateau"
    """Learning-rate schedule. ``ReduceLROnPlateau`` watches the validation loss;
    ``ExponentialLR`` multiplies the rate by ``lr_scheduler_gamma`` every epoch."""
    lr_scheduler_gamma: Annotated[float, Gt(0)] = 0.9993
    """Decay factor per epoch of ``ExponentialLR``."""
    lr_factor: Annotated[float, Gt(0)] = 0.8
    """Factor applied to the learning rate by ``ReduceLROnPlateau``."""
    lr_scheduler_patience: Annotated[int, Ge(0)] = 50
    """Epochs without improvement of the validation loss before
    ``ReduceLROnPlateau`` lowers the learning rate."""
    distributed: NotRequired[bool]
    """Distributed data-parallel training. When not set, training is distributed
    exactly when several processes were started by ``torchrun`` (``WORLD_SIZE`` >
    1) or by SLURM (more than one task); see :ref:`training-at-scale`. Setting it
    is deprecated by metatrain but accepted: ``true`` without such a launcher and
    ``false`` with one are refused with an error."""
    distributed_port: int = 39591
    """Port on the first node for the communication of a distributed run started by
    SLURM (``torchrun`` chooses its own port)."""
    batch_size: Annotated[int, Ge(1)] = 8
    """Number of structures per batch (ignored for training and validation when
    ``max_atoms_per_batch`` is set)."""
    max_atoms_per_batch: Optional[Annotated[int, Ge(1)]] = None
    """If set, pack structures into batches of at most this many atoms instead of
    ``batch_size`` structures."""
    num_epochs: Annotated[int, Ge(0)] = 100
    """Number of epochs. ``0`` fits the baselines and exports without training."""
    log_interval: Annotated[int, Ge(1)] = 1
    """Epochs between two logs of the training and validation metrics."""
    checkpoint_interval: Annotated[int, Ge(1)] = 25
    """Epochs between two checkpoints (``model_<epoch>.ckpt``)."""
    scale_targets: bool = True
    """Normalise every target to unit standard deviation during training."""
    atomic_baseline: FixedWeights | str = {}
    """Fixed per-type baselines for chosen targets (fitted by least squares
    otherwise), or a path to a composition-model checkpoint."""
    fixed_scaling_weights: FixedWeights | str = {}
    """Fixed scales for chosen targets (fitted otherwise), or a path to a scaler
    checkpoint."""
    per_structure_targets: list[str] = []
    """Targets whose loss and metrics are per structure instead of per atom."""
    num_workers: Optional[Annotated[int, Ge(0)]] = None
    """Data-loading worker processes; ``None`` chooses automatically."""
    log_mae: bool = True
    """Log MAE next to RMSE."""
    log_separate_blocks: bool = False
    """Log metrics of every block of multi-block targets separately."""
    best_model_metric: Literal["rmse_prod", "mae_prod", "loss"] = "loss"
    """Validation metric that selects the best model (the one exported): the
    validation loss (as ``mace_run_train`` does), or the product of the RMSEs or
    MAEs of all targets and gradients. The products can keep an early epoch when
    one error (often the stress) grows while the others improve. A ``--restart``
    with another metric than its run recorded tracks the best model afresh."""
    grad_clip_norm: Annotated[float, Gt(0)] = 10.0
    """Maximum norm of the gradient of all parameters (clipping)."""
    loss: Union[str, Dict[str, Union[LossSpecification, str]]] = "mse"
    """Loss of every target and gradient: a name (``mse``, ``mae``, ``huber``...)
    for all, or one entry per target with ``weight`` and per-gradient
    (``forces``, ``stress``, ``virial``) settings."""
    ema_decay: Optional[Annotated[float, Gt(0), Lt(1)]] = 0.99
    """Decay of an exponential moving average (EMA) of the weights, updated after
    every optimizer step (mace-torch's ``--ema --ema_decay``, with MACE's usual
    value); ``null`` turns it off. On by default (trainer checkpoints version 4 on):
    it lowered the test force errors on most sets of the accuracy benchmark (see
    :ref:`tuning-defaults`); a ``--restart`` of a run begun without it continues
    without it. As in mace-torch (``torch_ema``), update
    ``t`` uses ``min(ema_decay, (1 + t) / (10 + t))``, so that the average does not
    hold on to the initial weights. With it, validation, the choice of the
    best model, the best weights in the checkpoints and the exported model use the
    averaged weights, while training goes on with the raw ones; checkpoints keep
    the average, and ``--restart`` continues it."""
    stage_two_epoch: Optional[Annotated[int, Ge(0)]] = None
    """First epoch of stage two (mace-torch's ``--swa`` / ``--stage_two``, which
    starts at 75% of the epochs); ``null`` turns it off. From this epoch on the loss
    is ``stage_two_loss`` and the learning rate goes to ``stage_two_learning_rate``
    (``torch.optim.swa_utils.SWALR``; the plateau scheduler stops), and the best
    model is tracked afresh, since the loss changed."""
    stage_two_loss: Optional[Union[str, Dict[str, Any]]] = None
    """Loss of stage two, in the format of ``loss``, put over it: only what
    changes (mace-torch: ``{energy: {weight: 1000.0, forces: {weight: 100.0}}}``);
    ``null`` keeps ``loss``."""
    stage_two_learning_rate: Annotated[float, Gt(0)] = 1e-3
    """Learning rate of stage two (times ``lr_factors``), reached within one epoch
    (mace-torch's ``--swa_lr``)."""
    finetune: Union[
        NoFinetuneHypers, FullFinetuneHypers, HeadsFinetuneHypers, LoRAFinetuneHypers
    ] = {
        "read_from": None,
        "method": "full",
        "config": {},
        "inherit_heads": {},
    }
    """Fine-tuning of a trained checkpoint: ``full`` trains everything, ``heads``
    trains only the heads and chosen last layers, ``lora`` trains equivariant
    low-rank adapters on chosen linear layers (and the heads)."""
