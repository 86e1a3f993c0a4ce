"""Turn a list of metatomic systems into one MACE graph, with vectorised tensor code."""

from typing import List, Tuple

import torch
from metatomic.torch import NeighborListOptions, System


def systems_to_graph(
    systems: List[System], options: NeighborListOptions
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate ``systems`` into one graph.

    :return: ``(types, system_index, atom_index, edge_index, edge_vectors)``: atomic
        types, the system and in-system index of every atom, ``edge_index`` of shape
        ``[2, n_edges]`` holding (sender, receiver) = (first_atom, second_atom), and
        the edge vectors ``r_receiver - r_sender + shift @ cell``, recomputed from
        the positions and the cell (not taken from the neighbour list) so that every
        evaluation has its own autograd graph to positions and cell.
    """
    types: List[torch.Tensor] = []
    system_index: List[torch.Tensor] = []
    atom_index: List[torch.Tensor] = []
    senders: List[torch.Tensor] = []
    receivers: List[torch.Tensor] = []
    shifts: List[torch.Tensor] = []
    edge_system: List[torch.Tensor] = []
    offset = 0
    for i, system in enumerate(systems):
        n_atoms = len(system)
        pairs = system.get_neighbor_list(options).samples.values
        types.append(system.types)
        arange = torch.arange(n_atoms, device=system.device)
        atom_index.append(arange)
        system_index.append(torch.full_like(arange, i))
        senders.append(pairs[:, 0].to(torch.int64) + offset)
        receivers.append(pairs[:, 1].to(torch.int64) + offset)
        shifts.append(pairs[:, 2:5])
        edge_system.append(torch.full_like(pairs[:, 0], i, dtype=torch.int64))
        offset += n_atoms
    positions = torch.cat([system.positions for system in systems])
    cells = torch.stack([system.cell for system in systems])
    sender = torch.cat(senders)
    receiver = torch.cat(receivers)
    # one batched product for the periodic shifts of all edges: shift @ cell
    cell_shifts = torch.bmm(
        torch.cat(shifts).to(positions.dtype).unsqueeze(1),
        cells.index_select(0, torch.cat(edge_system)),
    ).squeeze(1)
    vectors = positions[receiver] - positions[sender] + cell_shifts
    return (
        torch.cat(types),
        torch.cat(system_index),
        torch.cat(atom_index),
        torch.stack([sender, receiver]),
        vectors,
    )


def systems_for_model(model: torch.nn.Module, frames: list, dtype: torch.dtype) -> list:
    """ASE structures as metatomic systems in ``dtype``, with the neighbour lists
    ``model`` asks for (outside metatrain's data loading: benchmarks, reports).

    The neighbour lists are made from the float64 positions (metatrain makes them
    with numpy, which has no bfloat16), then the systems are cast. A model
    conditioned on total charge and spin gets them from ``atoms.info``."""
    from metatomic.torch import systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    from metatrain_mace.trunk.conditioning import ase_inputs

    names = list(model.requested_inputs())
    systems = []
    for atoms, system in zip(
        frames, systems_to_torch(frames, dtype=torch.float64), strict=True
    ):
        system = get_system_with_neighbor_lists(
            system, model.requested_neighbor_lists()
        )
        # total charge and spin multiplicity from atoms.info, as metatomic's ASE
        # calculator reads them
        for name, tensor in ase_inputs(atoms, names, torch.float64).items():
            system.add_data(name, tensor)
        systems.append(system.to(dtype=dtype))
    return systems
