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
    vectors: List[torch.Tensor] = []
    offset = 0
    for i, system in enumerate(systems):
        n_atoms = len(system)
        neighbors = system.get_neighbor_list(options)
        types.append(system.types)
        arange = torch.arange(n_atoms, device=system.device)
        atom_index.append(arange)
        system_index.append(torch.full_like(arange, i))
        pairs = neighbors.samples.values
        first = pairs[:, 0].to(torch.int64)
        second = pairs[:, 1].to(torch.int64)
        shifts = pairs[:, 2:5].to(system.positions.dtype) @ system.cell
        vectors.append(system.positions[second] - system.positions[first] + shifts)
        senders.append(first + offset)
        receivers.append(second + offset)
        offset += n_atoms
    edge_index = torch.stack([torch.cat(senders), torch.cat(receivers)]).to(torch.int64)
    return (
        torch.cat(types),
        torch.cat(system_index),
        torch.cat(atom_index),
        edge_index,
        torch.cat(vectors),
    )
