"""Split computing: the device runs the first layers and sends compressed hidden states.

The strategy, the device half of the model, hidden-state codecs, partition choice and early-exit heads.
"""

from tether.edge.split._strategy import SplitOptions, SplitStats
from tether.edge.split._model import SplitModel
from tether.edge.split._hidden_codec import COMPRESSIONS
from tether.edge.split._partition import PartitionProfile, PartitionReport, choose_partition
from tether.edge.split._exit_head import CalibrationPoint, ExitData, ExitHead, collect_exit_datasets, train_exit_head

__all__ = ["COMPRESSIONS", "CalibrationPoint", "ExitData", "ExitHead", "PartitionProfile", "PartitionReport", "SplitModel", "SplitOptions", "SplitStats", "choose_partition", "collect_exit_datasets", "train_exit_head"]
