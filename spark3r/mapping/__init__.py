"""ROS-free streaming keyframe mapper: gate -> sliding window -> backbone -> Sim(3) stitching -> map.

The ROS node wires messages to :class:`Mapper` (``offer`` from the image callback,
``process_pending`` from a worker thread) and publishes what :class:`WindowResult` returns.
"""
from .alignment import AlignmentResult, Sim3, robust_sim3, umeyama
from .backbone import Backbone, Prediction
from .config import BackboneConfig, KeyframeConfig, MapConfig, MapperConfig, WindowConfig, parameter_docs
from .frames import Frame, Keyframe
from .keyframes import KeyframeDecision, KeyframeGate
from .mapper import OPTICAL_IN_BODY, MappedKeyframe, Mapper, MapperStats, WindowResult
from .voxel_map import VoxelMap

__all__ = [
    "AlignmentResult", "Backbone", "BackboneConfig", "Frame", "Keyframe", "KeyframeConfig", "KeyframeDecision",
    "KeyframeGate", "MapConfig", "MappedKeyframe", "Mapper", "MapperConfig", "MapperStats", "OPTICAL_IN_BODY",
    "Prediction", "Sim3", "VoxelMap", "WindowConfig", "WindowResult", "parameter_docs", "robust_sim3", "umeyama",
]
