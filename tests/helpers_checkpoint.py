"""Reading a checkpoint whole in the test process, for comparisons of tensors across runs."""

import torch


def checkpoint_tensors(path, optimizer=False):
    """Every model tensor of a torch_dist checkpoint, whole, read in this process (``optimizer=True``: the
    optimizer's keys; ``optimizer="values"``: the optimizer's tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    md = reader.read_metadata().state_dict_metadata
    if optimizer is True:
        return sorted(k for k in md if k.startswith("optimizer"))
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
          if isinstance(m, TensorStorageMetadata) and k.startswith("optimizer") == bool(optimizer)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd
