"""Test-only: the mapping node with a real vggt-tiny ModelBackbone whose weights are seeded-v1 with
the camera head's field-of-view outputs biased positive (see test_mapper_model_backbone.seeded_tiny:
plain random weights decode to fov = 0, which the mapper rightly drops, so nothing would be mapped).

    python -m vggt_tiny_node --ros-args -p image_width:=112 ...

Everything else (parameters, preprocessing, patch cache, decoder, mapper, ROS wiring) is the
production path.
"""
import sys


def factory(backbone_config, mapper_config):
    from spark3r.mapping.model_backbone import ModelBackbone
    from test_mapper_model_backbone import seeded_tiny

    window = mapper_config.window
    return ModelBackbone(seeded_tiny(), image_width=backbone_config.image_width,
                         cache_max_frames=window.window_size + window.window_stride, threads=backbone_config.threads)


if __name__ == "__main__":
    from spark3r_ros.mapping_node import main

    sys.exit(main(backbone_factory=factory))
