"""One driver per paradigm behind one protocol (see :mod:`datasteer.drivers.base`)."""

from datasteer.drivers.base import Driver, RunInfo, TrainedBatch
from datasteer.drivers.mix import MixDriver
from datasteer.drivers.select import SelectDriver, digest
from datasteer.drivers.weight import WeightDriver

#: The driver of each paradigm, in composition order.
DRIVERS: dict[str, type[Driver]] = {"mix": MixDriver, "select": SelectDriver, "weight": WeightDriver}

__all__ = ["DRIVERS", "Driver", "MixDriver", "RunInfo", "SelectDriver", "TrainedBatch", "WeightDriver", "digest"]
