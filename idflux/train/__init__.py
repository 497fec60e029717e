"""Training: data (MultiID-2M reader, synthetic generator), schedule, trainer loop, checkpoints, distributed."""

from idflux.train.config import Phase, TrainConfig, flux_dev, paper_phases, tiny
from idflux.train.data import MultiIDDataset, collate_faces
from idflux.train.synthetic import SyntheticIdentities, write_multiid

__all__ = ["Phase", "TrainConfig", "flux_dev", "paper_phases", "tiny", "MultiIDDataset", "collate_faces",
           "SyntheticIdentities", "write_multiid"]
