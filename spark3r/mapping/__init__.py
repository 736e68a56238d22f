"""ROS-free streaming keyframe mapper: gate -> sliding window -> backbone -> Sim(3) stitching -> map.

Typical wiring (what the ROS node and the offline runner do)::

    mapper = Mapper(MapperConfig.from_flat(params), backbone, base_to_camera=T_base_cam_or_None)
    decision = mapper.offer(Frame(rgb_uint8, stamp_ns, K_or_None))   # cheap, any thread
    while (result := mapper.process_pending()) is not None or mapper.backlog:   # worker thread
        if result is not None:
            publish(result)            # result.keyframes[i].base_to_map / camera_to_map, result.points_*
    mapper.flush(); mapper.save(directory)   # end of stream

Backbones: :class:`~spark3r.mapping.model_backbone.ModelBackbone` (real models; imports torch,
so it is not re-exported here) and :class:`~spark3r.mapping.testing.GroundTruthBackbone` (test
double). Conventions of their output: :mod:`spark3r.mapping.backbone`.
"""
from .alignment import AlignmentResult, Sim3, robust_sim3, umeyama
from .backbone import Backbone, Prediction
from .config import BackboneConfig, BackendConfig, KeyframeConfig, MapConfig, MapperConfig, OutputConfig, WindowConfig, parameter_docs
from .frames import Frame, Keyframe
from .keyframes import KeyframeDecision, KeyframeGate
from .mapper import OPTICAL_IN_BODY, MappedKeyframe, Mapper, MapperStats, WindowResult
from .tracking import TRACKING_INITIALIZING, TRACKING_LOST, TRACKING_OK, TRACKING_RELOCALIZED
from .voxel_map import VoxelMap

__all__ = [
    "AlignmentResult", "Backbone", "BackboneConfig", "BackendConfig", "Frame", "Keyframe", "KeyframeConfig", "KeyframeDecision",
    "KeyframeGate", "MapConfig", "MappedKeyframe", "Mapper", "MapperConfig", "MapperStats", "OPTICAL_IN_BODY", "OutputConfig",
    "Prediction", "Sim3", "TRACKING_INITIALIZING", "TRACKING_LOST", "TRACKING_OK", "TRACKING_RELOCALIZED", "VoxelMap", "WindowConfig", "WindowResult", "parameter_docs", "robust_sim3", "umeyama",
]
